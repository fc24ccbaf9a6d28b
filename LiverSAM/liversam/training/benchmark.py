"""Training throughput on synthetic data (for the benchmark suite): slices per second and peak RSS."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch

from .config import PromptSimulationConfig, autocast_dtype, resolve_precision
from .prompt_simulation import simulate_prompt
from .step_speedups import speed_up_decoder_training
from .trainer import accumulate_gradients, micro_batch_size, set_trainable


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
    )  # bytes on macOS, KiB on Linux


def benchmark_training_throughput(
    model: str | object = "litemedsam",
    device: str = "cpu",
    train_encoder: str = "none",
    batch_size: int = 8,
    steps: int = 10,
    warmup_steps: int = 2,
    precision: str = "auto",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time ``steps`` optimiser steps of LiverSAMTrain's training step on synthetic slices.

    With ``train_encoder="none"`` (the default, CPU-practical mode) the step is what a cached-embedding
    epoch runs: prompt simulation, prompt encoder + mask decoder forward/backward, AdamW. Otherwise the
    image encoder runs forward/backward on synthetic input images too. Returns a dict with
    ``slices_per_second``, ``seconds_per_step``, ``peak_rss_mb`` (the process's peak resident set size so
    far, MB), and the settings used. The model's weights are modified; pass a name to load a fresh one.
    """
    from ..models import load_model

    if threads:
        torch.set_num_threads(int(threads))
    loaded = load_model(model, device=device) if isinstance(model, str) else model
    network = loaded.network
    dev = loaded.device
    chosen = resolve_precision(precision, dev)
    amp_dtype = autocast_dtype(chosen)
    speed_up_decoder_training(network)  # as the trainer does
    params = set_trainable(network, train_encoder)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    rng = np.random.default_rng(seed)
    low_res = loaded.low_res_mask_size
    size = loaded.input_size
    prompt_config = PromptSimulationConfig()
    yy, xx = np.mgrid[:low_res, :low_res]
    targets = []
    for _ in range(batch_size):
        cy, cx, r = (
            rng.uniform(0.3, 0.7) * low_res,
            rng.uniform(0.3, 0.7) * low_res,
            rng.uniform(0.1, 0.25) * low_res,
        )
        targets.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    target_tensor = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32)).to(dev)
    weights = torch.ones(batch_size, device=dev)
    with torch.no_grad():
        probe = network.image_encoder(torch.rand(1, 3, size, size, device=dev))
    # in channels-last memory, as the training data gives them (CachedSlices.embeddings)
    embeddings = torch.randn(batch_size, *probe.shape[1:], device=dev)
    embeddings = embeddings.contiguous(memory_format=torch.channels_last)
    network.train()
    network.image_encoder.eval()

    def step() -> None:
        with torch.autocast(
            device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            emb = embeddings
            if train_encoder != "none":
                emb = network.image_encoder(torch.rand(batch_size, 3, size, size, device=dev))
            prompts = [simulate_prompt(t, rng, prompt_config, size) for t in targets]
        optimizer.zero_grad(set_to_none=True)  # the trainer's step: parts of a batch on a CPU (frozen encoder)
        accumulate_gradients(network, emb, prompts, None, target_tensor, weights, 0.1,
                             micro_batch_size(dev, batch_size, emb.requires_grad), amp_dtype,
                             lambda part: part.backward())
        optimizer.step()

    for _ in range(warmup_steps):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "model": loaded.spec.name,
        "device": str(dev),
        "precision": chosen,
        "train_encoder": train_encoder,
        "batch_size": batch_size,
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "slices_per_second": batch_size * steps / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }

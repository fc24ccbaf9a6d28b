"""LiverSAM speed and memory benchmark (not a unit test).

Measures, on the lits117 example CT (128 axial slices of 128 x 128 voxels):

- image-encoder time per slice (median and 95th percentile over repeated runs, after warm-up);
- prompt time with a cached embedding: the model's prompt encoder + mask decoder alone, and the whole
  ``SlicePredictor.predict`` call (decoder + mapping the mask back onto the slice);
- time to segment a liver of ``--volume-slices`` slices (default 100) from one box on its largest slice,
  cold embedding cache (every slice encoded), through ``liversam.pipeline.segment_volume`` with propagation:
  the median of ``--volume-runs`` runs (default 3);
- peak resident memory of the process (``ru_maxrss``), and the memory target's own figure: the peak of
  ``benchmarks/large_ct.py`` (a case beside ``--data``, ircadb17 by default, stacked to 595 slices of 512 x 512,
  through ``liversam segment``'s settings) in a process of its own;
- training throughput (slices/s of decoder steps) when ``liversam.training`` offers
  ``benchmark_training_throughput``, otherwise "not available"; the embedding-cache build of ``liversam
  train`` per slice (frozen encoder, the encoder ``auto`` chose) and how a 30-epoch run splits between the two;
- this machine's floor, measured in the same run (at the start and at the end): a 2048^3 matrix multiply
  in fp32, and in bf16 / int8 where the CPU does them natively. Every figure is also printed as a ratio
  to the fp32 floor (the figure's time over the time the floor needs for the figure's nominal FLOPs), so
  runs on different machines, or under different load, compare;
- the backend and precision chosen by ``--accelerate auto`` and their mask agreement with fp32 PyTorch.

The header records model, device, torch threads, torch and LiverSAM versions and the machine. Default
settings finish in under 5 minutes on 2 CPU cores.

Run:  python benchmarks/run_benchmarks.py --output benchmark.json   (or ``liversam benchmark``)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO.parent / "shared" / "data")) / "lits117"


def _ensure_importable() -> None:
    """Make ``import liversam`` work from a source checkout without installation."""
    try:
        import liversam  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO / "LiverSAM"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timings(fn: Callable[[], object], runs: int, warmup: int) -> dict:
    """Run ``fn`` ``warmup`` times unmeasured, then ``runs`` times; seconds: median, p95, mean, min, max."""
    import numpy as np

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "runs": runs,
        "warmup": warmup,
        "median_s": statistics.median(samples),
        "p95_s": float(np.percentile(samples, 95)),
        "mean_s": statistics.fmean(samples),
        "min_s": min(samples),
        "max_s": max(samples),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _bounding_box(mask_ji) -> tuple[int, int, int, int]:
    import numpy as np

    rows = np.flatnonzero(mask_ji.any(axis=1))
    cols = np.flatnonzero(mask_ji.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _backend_name(model) -> str:
    try:
        from liversam.acceleration import current_backend

        return str(current_backend(model))
    except ImportError:
        return "plain"


# Nominal work per unit, GFLOP (torch.utils.flop_counter, 2 per multiply-add; docs/PERFORMANCE.md).
ENCODER_GFLOP = 74.9
DECODER_GFLOP = 3.62
TRAIN_GFLOP_PER_SLICE = 3 * DECODER_GFLOP  # frozen encoder: decoder forward + backward (about 2x forward)
TARGETS = {"encoder_s": 0.20, "decoder_s": 0.015, "liver_100_s": 22.0, "train_slices_per_s": 12.0,
           "peak_bytes_595_slices": 2.5e9}


def gemm_floor(threads: int | None, size: int = 2048, runs: int = 5) -> dict:
    """This machine's matrix-multiply speed *now*, GFLOP/s (median of ``runs``): fp32 always; bf16 and
    int8 (int32 accumulation) only where the CPU does them natively. Measured in the same run as the
    figures, so each figure can be given as a ratio to it and compared across machines and load."""
    import torch

    from liversam.acceleration import cpu_features

    if threads:
        torch.set_num_threads(threads)
    features = cpu_features()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    kinds: dict[str, Callable[[], object]] = {"fp32": lambda: torch.mm(a, b)}
    if features.native_bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        kinds["bf16"] = lambda: torch.mm(a16, b16)
    if features.int8_dot and hasattr(torch, "_int_mm"):
        a8 = (a * 30).clamp(-127, 127).to(torch.int8)
        b8 = (b * 30).clamp(-127, 127).to(torch.int8)
        kinds["int8"] = lambda: torch._int_mm(a8, b8)
    flop = 2.0 * size**3
    out = {}
    for name, fn in kinds.items():
        try:
            timing = _timings(fn, runs, warmup=1)
        except RuntimeError:  # e.g. no int8 GEMM kernel in this torch build
            continue
        out[name] = round(flop / timing["median_s"] / 1e9, 1)
    return out


def floor_ratio(seconds: float, gflop: float, floor_gflops: float) -> float:
    """``seconds`` as a multiple of the time the fp32 GEMM floor needs for ``gflop`` of work."""
    return seconds / (gflop / floor_gflops)


def run_benchmarks(
    data: Path = DEFAULT_DATA,
    model_name: str = "litemedsam",
    device: str = "cpu",
    accelerate: str = "auto",
    threads: int | None = 2,
    encoder_runs: int = 10,
    decoder_runs: int = 30,
    volume_slices: int = 100,
    skip_volume: bool = False,
    volume_runs: int = 3,
    log: Callable[[str], None] = print,
    readahead: bool | None = None,
    skip_training: bool = False,
    large_ct_case: str | None = "ircadb17",
) -> dict:
    """Run every benchmark and return the JSON-ready result. ``large_ct_case``: the case (a folder beside
    ``data``) that ``benchmarks/large_ct.py`` stacks to 595 slices for the memory target; None skips it."""
    _ensure_importable()
    import numpy as np
    import torch

    import liversam
    from liversam.ct_io import read_ct
    from liversam.evaluate import read_label
    from liversam.models import load_model
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SlicePrompts

    if threads:
        torch.set_num_threads(threads)
    # First, while this process holds no model or CT: the child's peak is the figure, the machine holds both.
    large_ct = _large_ct_memory(data.parent, large_ct_case, accelerate, threads, log)
    ct_path, label_path = data / "ct.nii.gz", data / "label.nii.gz"
    volume = read_ct(ct_path)
    label = read_label(label_path, volume.geometry, ct_path)
    liver = np.isin(label, (1, 2))

    t0 = time.perf_counter()
    model = load_model(model_name, device=device, accelerate=accelerate)
    load_s = time.perf_counter() - t0
    header = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "liversam_version": liversam.__version__,
        "model": model.name,
        "model_source": model.source,
        "device": str(model.device),
        "encoder_backend": _backend_name(model),
        "acceleration": _acceleration(model),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "data": str(data),
        "volume_shape_kji": list(volume.geometry.shape_kji),
    }
    log(
        f"LiverSAM {header['liversam_version']} | model {header['model']} on {header['device']} | "
        f"torch {header['torch_version']}, {header['torch_threads']} threads | {header['machine']['cpu']}"
    )
    log(f"chosen: {header['acceleration']['summary']} (model load incl. checks {load_s:.1f} s)")
    results: dict = {"header": header, "model_load_s": load_s}
    floor_start = gemm_floor(threads)
    log("GEMM floor (2048^3, median of 5) at start: " + ", ".join(f"{k} {v} GFLOP/s" for k, v in floor_start.items()))

    # Image encoder, one slice at a time (the slice with the largest liver area, as in interactive use).
    areas = liver.sum(axis=(1, 2))
    k_big = int(np.argmax(areas))
    predictor = SlicePredictor(model, volume)
    model_input = predictor.model_input(k_big)
    results["image_encoder_per_slice"] = _timings(lambda: model.encode(model_input), encoder_runs, warmup=2)
    log(
        "image encoder per slice: median {median_s:.3f} s, p95 {p95_s:.3f} s ({runs} runs)".format(
            **results["image_encoder_per_slice"]
        )
    )
    results["preprocess_per_slice"] = _timings(lambda: predictor.model_input(k_big), 20, warmup=2)

    # Prompt -> mask with the embedding cached.
    box = _bounding_box(liver[k_big])
    prompts = SlicePrompts(boxes_ij=[box])
    embedding = predictor.embedding(k_big)
    box_xyxy = predictor.transform.box_to_model(box)
    results["decoder_per_prompt"] = _timings(
        lambda: model.decode(embedding, None, None, box_xyxy, None, False), decoder_runs, warmup=3
    )
    results["predict_per_prompt_cached"] = _timings(
        lambda: predictor.predict(k_big, prompts), decoder_runs, warmup=3
    )
    log(
        "decoder per prompt (cached embedding): median {median_s:.4f} s, p95 {p95_s:.4f} s".format(
            **results["decoder_per_prompt"]
        )
        + " | whole predict() median {median_s:.4f} s".format(**results["predict_per_prompt_cached"])
    )

    # A liver of `volume_slices` slices from one box, cold cache.
    if skip_volume:
        results["segment_liver_one_box"] = "skipped"
    else:
        runs = [_segment_from_one_box(volume, label, model, volume_slices, log, readahead)
                for _ in range(max(1, volume_runs))]
        results["segment_liver_one_box"] = median_run(runs, log)
        # The opt-in `--skip-thin-slices` (every other thin slice interpolated), beside the default, cold cache again.
        results["segment_liver_one_box_skip_thin_slices"] = _segment_from_one_box(
            volume, label, model, volume_slices, log, readahead, skip_thin_slices_mm=2.0)

    if skip_training:
        results["training_throughput"] = results["training_cache_build"] = "skipped"
    else:
        results["training_cache_build"] = _training_cache_build(data, model, log)
        results["training_throughput"] = _training_throughput(model_name, device, log)
        _training_split(results, log)
    results["peak_rss_mb"] = peak_rss_mb()
    log(f"peak resident memory of this process: {results['peak_rss_mb']:.0f} MiB (training included)")
    results["large_ct"] = large_ct
    floor_end = gemm_floor(threads)
    results["gemm_floor_gflops"] = {"start": floor_start, "end": floor_end}
    results["floor_ratios"] = _floor_summary(results, floor_start, floor_end, log)
    if hasattr(os, "getloadavg"):
        header["machine"]["load_average_at_end"] = list(os.getloadavg())
    return results


def _large_ct_memory(data_root: Path, case: str | None, accelerate: str, threads: int | None,
                     log: Callable[[str], None]) -> dict | str:
    """The memory target's own figure: ``benchmarks/large_ct.py`` (``case`` stacked to 595 slices of its
    size, one liver box, ``liversam segment``'s settings and cache bound, the bundled LiteMedSAM on the CPU
    whatever ``--model`` / ``--device`` say) in a process of its own."""
    if case is None:
        return "skipped"
    if not (data_root / case / "ct.nii.gz").is_file():
        reason = f"not run: no {data_root / case / 'ct.nii.gz'} (give --large-ct-case, or --skip-large-ct)"
        log(f"595-slice CT: {reason}")
        return reason
    import subprocess
    import tempfile

    log(f"595-slice CT ({case} stacked; benchmarks/large_ct.py in its own process) ...")
    with tempfile.TemporaryDirectory(prefix="liversam-bench-") as tmp:
        figures_path = Path(tmp) / "large_ct.json"
        command = [sys.executable, str(REPO / "benchmarks" / "large_ct.py"), "--case", case, "--slices", "595",
                   "--cache-mb", "2048", "--accelerate", accelerate, "--threads", str(threads or 0),
                   "--json", str(figures_path)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "LIVERSAM_TEST_DATA": str(data_root)})
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            output = f"benchmarks/large_ct.py stopped after {exc.timeout:.0f} s"
        if not figures_path.is_file():  # (exit code 1 with figures: the cache went over its bound; still a figure)
            tail = " | ".join(str(output).strip().splitlines()[-5:])
            log(f"595-slice CT: failed: {tail}")
            return f"failed: {tail}"
        figures = json.loads(figures_path.read_text())
    log(f"595-slice CT: peak {figures['peak_rss_mb']} MiB ({figures['peak_rss_mb'] * 2**20 / 1e9:.2f} GB), "
        f"{figures['wall_seconds']} s, {figures['liver_slices_segmented']} liver slices")
    return figures


def _acceleration(model) -> dict:
    try:
        from liversam.acceleration import current_decoder_backend, current_precision, describe_acceleration
    except ImportError:
        return {"summary": "plain PyTorch fp32", "encoder": "plain", "precision": "fp32"}
    agreement = getattr(model.encoder_override, "agreement", None)
    return {
        "summary": describe_acceleration(model),
        "encoder": _backend_name(model),
        "precision": current_precision(model),
        "decoder": current_decoder_backend(model),
        "agreement": None if agreement is None else {"mean_dice": agreement.mean_dice, "min_dice": agreement.min_dice,
                                                     "masks": len(agreement.dice)},
    }


def _floor_summary(results: dict, floor_start: dict, floor_end: dict, log: Callable[[str], None]) -> dict:
    """Each figure as a multiple of the fp32 GEMM floor's time for the same nominal work, and the targets."""
    floor = (floor_start["fp32"] + floor_end["fp32"]) / 2.0
    log(
        f"GEMM floor at end: {', '.join(f'{k} {v} GFLOP/s' for k, v in floor_end.items())}; "
        f"ratios below use the fp32 mean {floor:.1f} GFLOP/s (x1.0 = as fast as a large fp32 GEMM)"
    )
    rows: dict = {}
    encoder = results["image_encoder_per_slice"]["median_s"]
    rows["encoder"] = (encoder, floor_ratio(encoder, ENCODER_GFLOP, floor), f"{encoder:.3f} s/slice",
                       encoder <= TARGETS["encoder_s"], f"<= {TARGETS['encoder_s']} s")
    decoder = results["decoder_per_prompt"]["median_s"]
    rows["decoder"] = (decoder, floor_ratio(decoder, DECODER_GFLOP, floor), f"{decoder * 1000:.1f} ms/prompt",
                       decoder <= TARGETS["decoder_s"], f"<= {TARGETS['decoder_s'] * 1000:.0f} ms")
    volume = results.get("segment_liver_one_box")
    if isinstance(volume, dict):
        work = volume["slices_encoded"] * (ENCODER_GFLOP + DECODER_GFLOP)  # one box prompt per encoded slice
        total = volume["total_s"]
        rows["liver_one_box"] = (total, floor_ratio(total, work, floor),
                                 f"{total:.1f} s for {volume['slices_in_volume']} slices",
                                 total <= TARGETS["liver_100_s"], f"<= {TARGETS['liver_100_s']:.0f} s (100 slices)")
    skipping = results.get("segment_liver_one_box_skip_thin_slices")
    if isinstance(skipping, dict):  # opt-in, so never counted as meeting the default's target
        work = skipping["slices_encoded"] * (ENCODER_GFLOP + DECODER_GFLOP)
        total = skipping["total_s"]
        rows["liver_skip_thin"] = (total, floor_ratio(total, work, floor),
                                   f"{total:.1f} s, Dice {skipping['liver_dice']:.3f}", None,
                                   "none (opt-in --skip-thin-slices)")
    cache = results.get("training_cache_build")
    if isinstance(cache, dict):
        per = cache["seconds_per_slice"]
        rows["training_cache"] = (per, floor_ratio(per, ENCODER_GFLOP, floor), f"{per:.3f} s/slice", None,
                                  "none (once per slice)")
    training = results.get("training_throughput")
    if isinstance(training, dict) and training.get("slices_per_second"):
        rate = training["slices_per_second"]
        rows["training"] = (rate, floor_ratio(1.0 / rate, TRAIN_GFLOP_PER_SLICE, floor), f"{rate:.1f} slices/s",
                            rate >= TARGETS["train_slices_per_s"], f">= {TARGETS['train_slices_per_s']:.0f} slices/s")
    out = {}
    for name, (value, ratio, shown, met, target) in rows.items():
        log(f"  {name:14s} {shown:28s} x{ratio:5.1f} the GEMM floor   target {target}{'' if met is None else ': met' if met else ': NOT met'}")
        out[name] = {"value": value, "floor_ratio": round(ratio, 2), "target": target,
                     "met": None if met is None else bool(met)}
    large = results.get("large_ct")
    if isinstance(large, dict):  # memory: no GEMM floor to compare with
        peak = large["peak_rss_mb"]
        met = peak * 2**20 <= TARGETS["peak_bytes_595_slices"]
        shown = f"{peak:.0f} MiB = {peak * 2**20 / 1e9:.2f} GB"
        log(f"  {'memory_595':14s} {shown:28s} {'':22s} target <= 2.5 GB (595-slice CT): {'met' if met else 'NOT met'}")
        out["memory_595"] = {"value": peak, "floor_ratio": None, "target": "<= 2.5 GB (595-slice CT)", "met": met}
    return out


def median_run(runs: list[dict | str], log: Callable[[str], None] = print) -> dict | str:
    """The run with the median ``total_s`` of ``runs`` (the lower middle one of an even count: a run that happened),
    with every run's seconds in ``runs_total_s``; a run that could not be made (a string) is returned as it is."""
    if any(not isinstance(run, dict) for run in runs):
        return next(run for run in runs if not isinstance(run, dict))
    seconds = [run["total_s"] for run in runs]
    chosen = dict(runs[seconds.index(statistics.median_low(seconds))])
    chosen["runs_total_s"] = [round(s, 2) for s in seconds]
    if len(runs) > 1:
        log(f"segment liver from one box: median of {len(runs)} runs {chosen['total_s']:.1f} s "
            f"(runs: {', '.join(f'{s:.1f}' for s in seconds)} s)")
    return chosen


def _segment_from_one_box(
    volume, label, model, n_slices: int, log: Callable[[str], None], readahead: bool | None = None,
    skip_thin_slices_mm: float | None = None,
) -> dict | str:
    """Segment the liver on ``n_slices`` slices from one box on its largest slice, with a cold cache
    (``skip_thin_slices_mm``: the opt-in skipping of every other thin slice, ``liversam segment --skip-thin-slices``)."""
    import numpy as np

    from liversam.evaluate import crop_slices
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SegmentPrompts, SlicePrompts

    try:
        from liversam.pipeline import PipelineSettings, segment_volume
        from liversam.propagation import OrganTrackSettings
    except ModuleNotFoundError as exc:
        log(f"segment liver from one box: not available ({exc.name} missing)")
        return f"not available ({exc.name} missing)"
    from liversam.metrics import dice

    liver = np.isin(label, (1, 2))
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    # n_slices consecutive slices centred on the liver (all liver slices of lits117 lie within 128).
    centre = int((present[0] + present[-1]) // 2)
    k0 = max(0, min(centre - n_slices // 2, volume.num_slices - n_slices))
    k1 = min(volume.num_slices, k0 + n_slices)
    sub_volume, sub_label, _ = crop_slices(volume, label, (k0, k1))
    sub_liver = np.isin(sub_label, (1, 2))
    k_big = int(np.argmax(sub_liver.sum(axis=(1, 2))))
    box = _bounding_box(sub_liver[k_big])
    from liversam.progress import ProgressReporter

    predictor = SlicePredictor(model, sub_volume, readahead=readahead)
    seg = SegmentPrompts(name="liver", label=1, slices={k_big: SlicePrompts(boxes_ij=[box])}, propagate=True)
    start = time.perf_counter()
    with ProgressReporter() as progress:
        settings = PipelineSettings(organ_track=OrganTrackSettings(skip_max_thickness_mm=skip_thin_slices_mm))
        result = segment_volume(sub_volume, [seg], predictor, settings, progress=progress)
    seconds = time.perf_counter() - start
    predictor.close()
    mask = result.segment("liver").mask_kji
    out = {
        "skip_thin_slices_mm": skip_thin_slices_mm,
        "slices_in_volume": int(k1 - k0),
        "slice_range": [int(k0), int(k1)],
        "liver_slices_in_reference": int(sub_liver.any(axis=(1, 2)).sum()),
        "slices_segmented": int(mask.any(axis=(1, 2)).sum()),
        "slices_encoded": len(set(predictor.encoded_slices)),
        "slices_read_ahead": len(predictor.readahead_slices),
        "encode_seconds": predictor.encode_seconds,
        "total_s": seconds,
        "seconds_per_segmented_slice": seconds / max(1, int(mask.any(axis=(1, 2)).sum())),
        "liver_dice": dice(mask, sub_liver),
    }
    skipping = f", every other slice <= {skip_thin_slices_mm:g} mm interpolated" if skip_thin_slices_mm else ""
    log(
        f"segment liver from one box{skipping}: {out['total_s']:.1f} s for {out['slices_segmented']} slices "
        f"({out['slices_encoded']} encoded, {out['slices_read_ahead']} of them read ahead in the background, "
        f"Dice {out['liver_dice']:.3f})"
    )
    return out


def _training_cache_build(data: Path, model, log: Callable[[str], None], slices: int = 8) -> dict:
    """Seconds per slice to build ``liversam train``'s embedding cache (frozen encoder) with the encoder
    ``auto`` chose for this model, as the trainer does (``build_study_cache``: windowing, encoding, HDF5)."""
    import tempfile

    from liversam.training import TrainingConfig
    from liversam.training.cache import build_study_cache
    from liversam.training.studies import TrainingStudy

    study = TrainingStudy("benchmark", data / "ct.nii.gz", data / "label.nii.gz", "labelmap")
    with tempfile.TemporaryDirectory(prefix="liversam-bench-cache-") as tmp:
        config = TrainingConfig(data=str(data), out=tmp, max_slices_per_case=slices, cache_dir=tmp)
        started = time.perf_counter()
        build_study_cache(study, config, model, "benchmark", progress=False)
        seconds = time.perf_counter() - started
    out = {"slices": slices, "seconds": seconds, "seconds_per_slice": seconds / slices,
           "encoder": _acceleration(model)["summary"]}
    log(f"training cache build: {seconds / slices:.3f} s/slice ({slices} lits117 slices, CT read included; "
        f"{out['encoder']})")
    return out


def _training_split(results: dict, log: Callable[[str], None], epochs: int = 30) -> None:
    """Where a training run's time goes: the cache (once per slice) against the decoder steps (every epoch,
    at the default 30 epochs)."""
    cache, steps = results.get("training_cache_build"), results.get("training_throughput")
    if not (isinstance(cache, dict) and isinstance(steps, dict) and steps.get("slices_per_second")):
        return
    cache_s, step_s = cache["seconds_per_slice"], epochs / steps["slices_per_second"]
    results["training_time_split"] = {"epochs": epochs, "cache_s_per_slice": cache_s, "steps_s_per_slice": step_s,
                                      "cache_share": cache_s / (cache_s + step_s)}
    log(f"training time per slice of data over {epochs} epochs: cache {cache_s:.2f} s once + steps {step_s:.2f} s "
        f"({100 * cache_s / (cache_s + step_s):.0f} % cache)")


def _training_throughput(model_name: str, device: str, log: Callable[[str], None]) -> dict | str:
    """Call ``liversam.training.benchmark_training_throughput`` when it exists (a fresh model: it trains)."""
    try:
        from liversam import training
    except ImportError:
        log("training throughput: not available (no liversam.training)")
        return "not available"
    hook = getattr(training, "benchmark_training_throughput", None)
    if hook is None:
        log("training throughput: not available (liversam.training has no benchmark_training_throughput)")
        return "not available"
    # As `liversam train` runs: freed activations kept for reuse instead of page-faulted in again each step. The
    # setting is process-wide: every figure before this one is measured without it; the peak memory and the GEMM
    # floor at the end are read after it (the end floor moved by 0.1 %, fp32 184.8 -> 185.0 GFLOP/s, in session 14).
    try:
        from liversam.training.allocator import keep_freed_memory_for_reuse
    except ImportError:
        allocator = False
    else:
        allocator = keep_freed_memory_for_reuse()
    value = hook(model=model_name, device=device)
    if isinstance(value, dict):
        value["allocator_thresholds_set"] = allocator
    if isinstance(value, dict) and "slices_per_second" in value:
        log(
            f"training throughput: {value['slices_per_second']:.1f} slices/s (mode: {value.get('train_encoder', '?')})"
        )
    else:
        log(f"training throughput: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")  # liversam CLI adds its own
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from liversam.commands.arg_types import positive_int  # the command line's own check

    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with ct.nii.gz + label.nii.gz"
    )
    parser.add_argument("--model", default="litemedsam", help="model name or checkpoint path")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    parser.add_argument("--accelerate", default="auto", help="encoder backend: auto, plain, openvino, onnxruntime, torch")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2; 0 = torch's choice)"
    )
    parser.add_argument("--encoder-runs", type=int, default=10, help="measured encoder runs (default 10)")
    parser.add_argument("--decoder-runs", type=int, default=30, help="measured decoder runs (default 30)")
    parser.add_argument(
        "--volume-slices", type=int, default=100, help="slices of the one-box liver run (default 100)"
    )
    parser.add_argument(
        "--volume-runs", type=positive_int, default=3,
        help="one-box liver runs, each with a cold cache; the median is the figure (default 3)",
    )
    parser.add_argument("--skip-volume", action="store_true", help="skip the one-box liver segmentation")
    parser.add_argument(
        "--readahead",
        choices=("auto", "on", "off"),
        default="auto",
        help="one-box liver: background encoding of the next slice (auto: as LiverSAM decides, only on a GPU)",
    )
    parser.add_argument(
        "--no-readahead", action="store_true", help="the same as --readahead off"
    )
    parser.add_argument("--skip-training", action="store_true", help="skip the training throughput")
    parser.add_argument("--large-ct-case", default="ircadb17",
                        help="case beside --data stacked to a 595-slice CT for the memory target (default ircadb17)")
    parser.add_argument("--skip-large-ct", action="store_true", help="skip the 595-slice CT's memory")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmark.json"), help="JSON output (default benchmark.json)"
    )


def main(args: argparse.Namespace) -> int:
    _ensure_importable()
    if getattr(args, "quiet", False):
        from liversam.progress import configure

        configure(quiet=True)
    results = run_benchmarks(
        data=args.data,
        model_name=args.model,
        device=args.device,
        accelerate=args.accelerate,
        threads=args.threads or None,
        encoder_runs=args.encoder_runs,
        decoder_runs=args.decoder_runs,
        volume_slices=args.volume_slices,
        skip_volume=args.skip_volume,
        volume_runs=getattr(args, "volume_runs", 3),
        readahead=False if args.no_readahead else {"auto": None, "on": True, "off": False}[args.readahead],
        skip_training=args.skip_training,
        large_ct_case=None if getattr(args, "skip_large_ct", False) else getattr(args, "large_ct_case", "ircadb17"),
    )
    _ensure_importable()
    from liversam.atomic_write import write_text_atomically
    from liversam.metrics import json_safe

    write_text_atomically(args.output, json.dumps(json_safe(results), indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))

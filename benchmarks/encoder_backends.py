"""Image-encoder backends compared: speed per slice and accuracy against the plain fp32 PyTorch path.

For each backend (``plain`` PyTorch fp32, ``torch`` with Conv+BN folded and channels-last, ``onnxruntime``,
``openvino``; plus ``bf16-emulated``, an accuracy-only simulation of bf16 hardware):

- encoder time per slice: median / p95 over ``--runs`` timed runs after warm-up, the backends measured in
  interleaved rounds so that load from other processes hits all of them alike; the 1-minute load average
  is recorded with every round (the machine may be shared);
- effective GFLOP/s: the encoder's FLOP count (counted with ``torch.utils.flop_counter``) / median time;
- accuracy on lits117: on ``--slices`` liver slices (evenly spaced), one box from the reference label
  (liver = labels 1+2; tumour = bounding box of the slice's largest lesion), masks from each backend
  compared with the plain fp32 masks (Dice) and with the reference label;
- the prompt-decoder time per box prompt on a cached embedding (each exported backend also runs the
  decoder, see ``enable_fast_decoder``) and the implied time to segment a ``--volume-slices`` liver from one
  box (encoder + decoder per slice; ``--volume`` runs the real pipeline with the fastest backend through
  ``run_benchmarks._segment_from_one_box``).

Run:  python benchmarks/encoder_backends.py --output encoder_backends.json --markdown encoder_backends.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO.parent / "shared" / "data")) / "lits117"
TIMED_BACKENDS = ("plain", "torch", "onnxruntime", "openvino")


def _ensure_importable() -> None:
    try:
        import liversam  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO / "LiverSAM"))


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def count_encoder_gflop(model) -> float:
    """FLOPs of one encoder pass on one slice (2 per multiply-add), in GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.input_size, model.input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.network.image_encoder(x)
    return counter.get_total_flops() / 1e9


def count_decoder_gflop(model) -> float:
    """FLOPs of one box prompt through the PyTorch prompt encoder + mask decoder, in GFLOP."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    embedding = torch.zeros(1, 256, 64, 64)
    box = np.array([10.0, 10.0, 100.0, 100.0], np.float32)
    with FlopCounterMode(display=False) as counter:
        model.decode(embedding, None, None, box, None, False)
    return counter.get_total_flops() / 1e9


def bf16_emulated_encoder(encoder) -> Callable:
    """fp32 encoder whose Linear/Conv inputs and weights are rounded to bf16 (fp32 accumulation), as on
    AVX512-BF16 / AMX hardware. Accuracy only: it runs at fp32 speed. Attention matmuls stay fp32."""
    import copy

    import torch

    module = copy.deepcopy(encoder).eval()

    def round_input(_mod, args):
        return tuple(a.to(torch.bfloat16).float() if torch.is_tensor(a) else a for a in args)

    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.weight.copy_(mod.weight.to(torch.bfloat16).float())
                mod.register_forward_pre_hook(round_input)

    def run(images):
        with torch.inference_mode():
            return module(images.float())

    run.name = "bf16-emulated"  # type: ignore[attr-defined]
    return run


def _box(mask_ji):
    import numpy as np

    rows = np.flatnonzero(mask_ji.any(axis=1))
    cols = np.flatnonzero(mask_ji.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _largest_component(mask_ji):
    import numpy as np
    from scipy import ndimage

    labels, n = ndimage.label(mask_ji)
    if n <= 1:
        return mask_ji
    sizes = ndimage.sum(mask_ji, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def run(args: argparse.Namespace) -> dict:
    _ensure_importable()
    import numpy as np
    import torch

    from liversam.acceleration import cpu_features, enable_fast_encoder
    from liversam.ct_io import read_ct
    from liversam.evaluate import read_label
    from liversam.metrics import dice
    from liversam.models import load_model
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SlicePrompts

    torch.set_num_threads(args.threads)
    ct_path, label_path = args.data / "ct.nii.gz", args.data / "label.nii.gz"
    volume = read_ct(ct_path)
    label = read_label(label_path, volume.geometry, ct_path)
    liver = np.isin(label, (1, 2))
    tumour = label == 2

    models: dict[str, object] = {}
    chosen: dict[str, str] = {}
    enable_s: dict[str, float] = {}
    for name in args.backends:
        model = load_model("litemedsam", "cpu")
        start = time.perf_counter()
        if name == "bf16-emulated":
            model.encoder_override = bf16_emulated_encoder(model.network.image_encoder)
            got = name
        else:
            got = enable_fast_encoder(model, name, cache_dir=args.cache_dir, precision="fp32")
        enable_s[name] = time.perf_counter() - start
        if got != name:
            print(f"backend {name}: not available here (got {got}); skipped")
            continue
        models[name] = model
        chosen[name] = got
        print(f"backend {name}: ready in {enable_s[name]:.1f} s")

    reference_model = models.get("plain") or load_model("litemedsam", "cpu")
    gflop = count_encoder_gflop(reference_model)
    features = cpu_features()
    header = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": features.summary(),
        "native_bf16": features.native_bf16,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "encoder_gflop_per_slice": round(gflop, 2),
        "decoder_gflop_per_box": round(count_decoder_gflop(reference_model), 2),
        "load_average_at_start": _load(),
    }
    print(
        f"{header['cpu']} | torch {header['torch']}, {header['threads']} threads | encoder {gflop:.1f} GFLOP/slice"
    )

    # --- speed: interleaved rounds (encoder, then decoder with a cached embedding) ------------------------
    from liversam.acceleration import current_decoder_backend

    k_big = int(np.argmax(liver.sum(axis=(1, 2))))
    helper = SlicePredictor(reference_model, volume)
    x = helper.model_input(k_big)
    box_xyxy = helper.transform.box_to_model(_box(liver[k_big]))
    timed = [n for n in models if n in TIMED_BACKENDS]
    embeddings = {n: models[n].encode(x) for n in timed}  # also the warm-up run
    for name in timed:
        for _ in range(max(0, args.warmup - 1)):
            models[name].encode(x)
        for _ in range(3):
            models[name].decode(embeddings[name], None, None, box_xyxy, None, False)
    samples: dict[str, list[float]] = {n: [] for n in timed}
    cpu_samples: dict[str, list[float]] = {n: [] for n in timed}
    dec_samples: dict[str, list[float]] = {n: [] for n in timed}
    loads: list[float | None] = []
    for _ in range(args.runs):
        loads.append(_load())
        for name in timed:
            cpu0, start = time.process_time(), time.perf_counter()
            models[name].encode(x)
            samples[name].append(time.perf_counter() - start)
            cpu_samples[name].append(time.process_time() - cpu0)
            for _ in range(max(1, args.decoder_runs // args.runs)):
                start = time.perf_counter()
                models[name].decode(embeddings[name], None, None, box_xyxy, None, False)
                dec_samples[name].append(time.perf_counter() - start)
    speed = {}
    for name in timed:
        med = statistics.median(samples[name])
        speed[name] = {
            "median_s": med,
            "p95_s": float(np.percentile(samples[name], 95)),
            "min_s": min(samples[name]),
            "samples_s": samples[name],
            "process_cpu_median_s": statistics.median(cpu_samples[name]),
            "effective_gflop_per_s": gflop / med,
            "enable_s": enable_s[name],
            "decoder_backend": current_decoder_backend(models[name]),
            "decoder_median_s": statistics.median(dec_samples[name]),
            "decoder_p95_s": float(np.percentile(dec_samples[name], 95)),
            "decoder_min_s": min(dec_samples[name]),
        }
    base = speed.get("plain", {}).get("median_s")
    for name in timed:
        speed[name]["speedup_vs_plain"] = (base / speed[name]["median_s"]) if base else None
        print(
            f"  {name:12s} encoder median {speed[name]['median_s']:.3f} s/slice (min {speed[name]['min_s']:.3f}, "
            f"CPU {speed[name]['process_cpu_median_s']:.3f} s) {speed[name]['effective_gflop_per_s']:.0f} GFLOP/s "
            f"x{speed[name]['speedup_vs_plain'] or 0:.2f} | decoder ({speed[name]['decoder_backend']}) "
            f"median {speed[name]['decoder_median_s'] * 1000:.0f} ms"
        )
    decoder = {name: speed[name]["decoder_median_s"] for name in timed}

    # --- accuracy on lits117 slices with label-derived boxes ------------------------------------------------
    liver_slices = np.flatnonzero(liver.sum(axis=(1, 2)) >= 50)
    picks = np.unique(np.linspace(liver_slices[0], liver_slices[-1], args.slices).round().astype(int))
    picks = [int(k) for k in picks if liver[k].sum() >= 50]
    prompts_by_target: dict[str, dict[int, tuple]] = {"liver": {}, "tumour": {}}
    for k in picks:
        prompts_by_target["liver"][k] = _box(liver[k])
        if tumour[k].sum() >= 10:
            prompts_by_target["tumour"][k] = _box(_largest_component(tumour[k]))
    masks: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    for name, model in models.items():
        pred = SlicePredictor(model, volume)
        masks[name] = {}
        for target, boxes in prompts_by_target.items():
            for k, box in boxes.items():
                masks[name][(target, k)] = pred.predict(k, SlicePrompts(boxes_ij=[box])).mask_ji
        print(f"  accuracy pass {name}: {len(pred.encoded_slices)} slices encoded")
    accuracy = {}
    ref_masks = masks.get("plain")
    for name in models:
        row: dict[str, object] = {}
        for target, truth in (("liver", liver), ("tumour", tumour)):
            keys = [(target, k) for k in prompts_by_target[target]]
            if not keys:
                continue
            vs_label = [dice(masks[name][key], truth[key[1]]) for key in keys]
            row[f"{target}_dice_vs_label_mean"] = float(np.mean(vs_label))
            if ref_masks is not None:
                vs_plain = [dice(masks[name][key], ref_masks[key]) for key in keys]
                row[f"{target}_dice_vs_plain_mean"] = float(np.mean(vs_plain))
                row[f"{target}_dice_vs_plain_min"] = float(np.min(vs_plain))
                row[f"{target}_label_dice_change_vs_plain"] = float(
                    np.mean(vs_label) - np.mean([dice(ref_masks[key], truth[key[1]]) for key in keys])
                )
            row[f"{target}_slices"] = len(keys)
        accuracy[name] = row
        print("  " + name + ": " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))

    volume_estimate = {}
    for name in timed:
        per_slice = speed[name]["median_s"] + speed[name]["decoder_median_s"]
        volume_estimate[name] = {"slices": args.volume_slices, "estimated_s": per_slice * args.volume_slices}

    result = {
        "header": header,
        "backends_chosen": chosen,
        "encoder_per_slice": speed,
        "load_average_per_round": loads,
        "decoder_per_prompt_median_s": decoder,
        "accuracy_slices": picks,
        "accuracy": accuracy,
        "volume_estimate_encoder_plus_decoder": volume_estimate,
        "load_average_at_end": _load(),
    }
    if args.volume and timed:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_benchmarks import _segment_from_one_box

        fastest = min(timed, key=lambda n: speed[n]["median_s"])
        result["segment_liver_one_box"] = {
            "backend": fastest,
            "load_average_before": _load(),
            **_segment_from_one_box(volume, label, models[fastest], args.volume_slices, print),
        }
    return result


def to_markdown(result: dict) -> str:
    h = result["header"]
    lines = [
        "| backend | encoder median s/slice | min s | CPU s | GFLOP/s | speed-up | decoder median ms "
        "| liver Dice vs fp32 (mean / min) | tumour Dice vs fp32 (mean / min) | liver / tumour Dice vs label (change) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, acc in result["accuracy"].items():
        sp = result["encoder_per_slice"].get(name)
        timing = (
            f"{sp['median_s']:.3f} | {sp['min_s']:.3f} | {sp['process_cpu_median_s']:.3f} | "
            f"{sp['effective_gflop_per_s']:.0f} | x{sp['speedup_vs_plain']:.2f} | "
            f"{sp['decoder_median_s'] * 1000:.0f} ({sp['decoder_backend']})"
            if sp and sp.get("speedup_vs_plain")
            else "accuracy only | | | | |"
        )

        def pair(target: str, acc: dict = acc) -> str:
            if f"{target}_dice_vs_plain_mean" not in acc:
                return "-"
            return f"{acc[f'{target}_dice_vs_plain_mean']:.4f} / {acc[f'{target}_dice_vs_plain_min']:.4f}"

        change = " / ".join(
            f"{acc.get(f'{t}_dice_vs_label_mean', float('nan')):.4f} ({acc.get(f'{t}_label_dice_change_vs_plain', 0.0):+.4f})"
            for t in ("liver", "tumour")
        )
        lines.append(f"| {name} | {timing} | {pair('liver')} | {pair('tumour')} | {change} |")
    loads = [x for x in result["load_average_per_round"] if x is not None]
    lines += [
        "",
        f"CPU {h['cpu']}, {h['threads']} threads, torch {h['torch']}; encoder {h['encoder_gflop_per_slice']} GFLOP "
        f"per slice, decoder {h['decoder_gflop_per_box']} GFLOP per box; decoder: one box prompt on a cached embedding; "
        f"1-min load average during the timed rounds {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
        f"on {h['logical_cpus']} logical CPUs; accuracy on {len(result['accuracy_slices'])} lits117 slices.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with ct.nii.gz + label.nii.gz"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["plain", "torch", "onnxruntime", "openvino", "bf16-emulated"],
        help="backends to compare (plain first: it is the reference)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed encoder runs per backend")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decoder-runs", type=int, default=30, help="timed decoder runs per backend")
    parser.add_argument("--slices", type=int, default=20, help="lits117 slices for the accuracy check")
    parser.add_argument("--volume-slices", type=int, default=100)
    parser.add_argument(
        "--volume", action="store_true", help="also segment a liver from one box, fastest backend"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="exported-encoder cache (default: user cache)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write a markdown table here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    _ensure_importable()
    from liversam.atomic_write import write_text_atomically

    if args.output:
        write_text_atomically(args.output, json.dumps(result, indent=2))
    table = to_markdown(result)
    if args.markdown:
        write_text_atomically(args.markdown, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

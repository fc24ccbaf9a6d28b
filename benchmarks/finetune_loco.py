"""Leave-one-case-out fine-tuning study (issue 13): does fine-tuning the mask decoder pay on a case it
was not trained on?

For each labelled case (fold): ``liversam train`` on the other cases (image encoder frozen, decoder only,
Dice + BCE with tumour weight, cosine schedule, propagation-like prompts), the final epoch registered in
the user's model registry as ``loco-<case>`` (``$LIVERSAM_HOME/models``); then the held-out case is
scored with ``liversam evaluate``'s one-box protocol (tight box on the largest slice of the liver and of
each lesion, lesions in one ``tumor`` segment, LiverSAM propagation with intensity refinement) for the
fine-tuned and the bundled model, on the same embeddings and the same decoder path. Prints the table.

    python benchmarks/finetune_loco.py --data ../shared/data --out runs/loco

Rerunning the command resumes: finished training runs and evaluations are reused (``--out``).
Costs on 2 shared CPU cores: see docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("lits117", "ircadb17", "hcc0697", "hcc2144")
# The study's training settings, fixed before any held-out result was seen.
TRAIN_ARGS = (
    "--freeze-prompt-encoder", "--select", "last", "--propagation-prompts", "0.7", "--propagation-offset", "1",
    "--point-prob", "0", "--refine-prob", "0", "--epochs", "3", "--batch-size", "8", "--lr", "1e-4",
    "--lr-min", "1e-6", "--tumor-weight", "2",
)


def write_fold_files(out: Path, data: Path, cases: list[str], held_out: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "cases.json"
    entries = [{"id": c, "ct": str(data / c / "ct.nii.gz"), "label": str(data / c / "label.nii.gz")} for c in cases]
    manifest.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    split = out / f"split_{held_out}.json"
    # The held-out case is the validation case of a --select last run: its per-epoch exact-box Dice is
    # reported in history.csv but chooses nothing (no early stopping, the final epoch is kept).
    split.write_text(json.dumps({"train": [c for c in cases if c != held_out], "val": [held_out], "test": []}),
                     encoding="utf-8")
    return manifest, split


def train_fold(args, cases: list[str], held_out: str) -> dict:
    """Train (or resume / reuse) the fold's model; returns its name, run folder and training seconds
    (sum of the epochs' wall times, caches excluded)."""
    manifest, split = write_fold_files(args.out, args.data, cases, held_out)
    run_dir = args.out / "runs" / f"loco-{held_out}"
    name = f"{args.prefix}{held_out}"
    command = [sys.executable, "-m", "liversam", "train", "--data", str(manifest), "--split-file", str(split),
               "--out", str(run_dir), "--name", name, "--cache-dir", str(args.out / "cache"), "--no-test-report",
               "--no-progress", "--threads", str(args.threads), *TRAIN_ARGS, *args.train_arg]
    if args.seed_embeddings:
        command += ["--seed-embeddings", str(args.seed_embeddings)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    with open(run_dir / "history.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    epoch_seconds = sum(float(r["seconds"]) for r in rows if int(r["epoch"]) > 0 and r["seconds"])
    return {"model": name, "run_dir": str(run_dir), "train_seconds": epoch_seconds, "last_call_seconds": wall,
            "epochs": len(rows) - 1, "history": rows}


def _seeded_factory(model, case_id: str, embeddings_dir: Path | None, cache_dir: Path):
    """SlicePredictor factory whose embedding cache is filled from ``emb_<case>.npz`` (when given) and
    the training cache of the case (liver slices); other slices are encoded on demand."""
    import h5py
    import numpy as np
    import torch

    from liversam.predictor import SlicePredictor

    seeds: dict[int, np.ndarray] = {}
    for path in sorted(cache_dir.glob(f"{case_id}-*.h5")):
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete", False) or "embedding" not in handle:
                continue
            for row, (k, copy) in enumerate(zip(handle["k"][:], handle["copy"][:], strict=True)):
                if copy == 0:
                    seeds[int(k)] = handle["embedding"][row].astype(np.float32)
    if embeddings_dir is not None and (embeddings_dir / f"emb_{case_id}.npz").is_file():
        data = np.load(embeddings_dir / f"emb_{case_id}.npz")
        for k, e in zip(data["ks"], data["embs"], strict=True):
            seeds[int(k)] = np.asarray(e, dtype=np.float32).reshape(-1, *e.shape[-3:])[0]

    def factory(volume):
        predictor = SlicePredictor(model, volume, cache_mb=8000)
        for k, e in seeds.items():
            predictor.cache.put(predictor._key(k), torch.from_numpy(e)[None])
        return predictor

    return factory


def evaluate_fold(args, held_out: str, model_name: str) -> dict:
    """One-box Dice (liver, tumour) of ``model_name`` on the held-out case; cached in ``--out``."""
    result_path = args.out / "eval" / f"{held_out}--{model_name}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    from liversam import evaluate as ev
    from liversam.models import load_model

    settings = ev.EvaluationSettings(protocols=("one-box",), propagation_methods=("liversam",),
                                     box_styles=("tight",), intensity_refinement=True, lesion_segments="one")
    model = load_model(model_name, device="cpu", accelerate=args.accelerate)
    case = ev.discover_cases(args.data / held_out)[0]
    factory = _seeded_factory(model, held_out, args.eval_embeddings, args.out / "cache")
    started = time.perf_counter()
    r = ev.evaluate_case(case, settings, factory)
    key = ev.run_keys(settings)[0]
    result = {"case": held_out, "model": model_name, "liver": r["protocols"][key]["liver"]["dice"],
              "tumor": r["protocols"][key]["tumor"]["dice"], "seconds": time.perf_counter() - started}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def table(rows: list[dict]) -> str:
    lines = ["| held-out case | training (s) | liver fine-tuned | liver bundled | tumour fine-tuned | tumour bundled |",
             "|---|---|---|---|---|---|"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['case']} | {r['train_seconds']:.0f} | {f(r['ft_liver'])} | {f(r['base_liver'])} | "
                     f"{f(r['ft_tumor'])} | {f(r['base_tumor'])} |")
    if rows:
        def mean(key):
            values = [r[key] for r in rows if r[key] is not None]
            return sum(values) / len(values) if len(values) == len(rows) else None

        lines.append(f"| mean | {sum(r['train_seconds'] for r in rows):.0f} (total) | {f(mean('ft_liver'))} | "
                     f"{f(mean('base_liver'))} | {f(mean('ft_tumor'))} | {f(mean('base_tumor'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with one sub-folder (ct + label) per case")
    p.add_argument("--out", type=Path, required=True, help="study folder (manifest, runs, cache, results)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case folders (default: the four)")
    p.add_argument("--folds", default=None, help="held-out cases to run (default: every case)")
    p.add_argument("--seed-embeddings", type=Path, help="emb_<case>.npz folder to fill the training cache from")
    p.add_argument("--eval-embeddings", type=Path, help="emb_<case>.npz folder for the evaluation embeddings")
    p.add_argument("--accelerate", default="plain", help="decoder/encoder path of both models (default plain)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefix", default="loco-", help="registered model name prefix (default loco-)")
    p.add_argument("--no-bundled", action="store_true", help="do not evaluate the bundled model")
    p.add_argument("--train-arg", action="append", default=[], help="extra `liversam train` argument")
    args = p.parse_args(argv)
    args.data = args.data.resolve()
    args.out = args.out.resolve()
    cases = [c for c in args.cases.split(",") if c]
    folds = [c for c in (args.folds or args.cases).split(",") if c]
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for held_out in folds:
        fold = train_fold(args, cases, held_out)
        ft = evaluate_fold(args, held_out, fold["model"])
        base = None if args.no_bundled else evaluate_fold(args, held_out, "litemedsam")
        row = {"case": held_out, "train_seconds": fold["train_seconds"], "epochs": fold["epochs"],
               "ft_liver": ft["liver"], "ft_tumor": ft["tumor"],
               "base_liver": base["liver"] if base else None, "base_tumor": base["tumor"] if base else None,
               "eval_seconds": ft["seconds"]}
        rows.append(row)
        print(f"fold {held_out}: {json.dumps(row)}", flush=True)
        (args.out / "loco.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    text = table(rows)
    (args.out / "loco.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

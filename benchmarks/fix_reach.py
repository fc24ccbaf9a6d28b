"""Simulated reader fixes and re-propagation, on the labelled cases of ../shared/data.

For each case: the liver is propagated from one box on its largest slice (the defaults, then the dense CRF, as
`liversam segment` does); then each of the N worst slices (by slice Dice against the label, at least 4 slices
from the seed, liver area over 15 % of the largest) is fixed on its own with a box 3 mm around the label, and
``liversam.propagation.repropagate`` runs from it. Prints, per fix, the fixed slice's Dice before / after, the
slices changed and the 3D liver Dice before / after; then the mean change per case and overall.

    python benchmarks/fix_reach.py --data ../shared/data [--fixes 6] [--embeddings DIR]

``--embeddings DIR``: reuse slice embeddings saved as DIR/emb_<case>.npz (arrays ``ks``, ``embs``) instead of
running the encoder (the figures are the same; it only saves time).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LiverSAM"))

from liversam import propagation  # noqa: E402
from liversam.ct_io import read_ct  # noqa: E402
from liversam.dense_crf import ORGAN_CRF, refine_with_crf  # noqa: E402
from liversam.evaluate import read_label  # noqa: E402
from liversam.models import load_model  # noqa: E402
from liversam.predictor import SlicePredictor  # noqa: E402
from liversam.prompts import SegmentPrompts, SlicePrompts  # noqa: E402

CASES = ("lits117", "ircadb17", "hcc0697", "hcc2144")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def box_around(mask_ji: np.ndarray, pad: int = 0) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    nj, ni = mask_ji.shape
    return (float(max(is_.min() - pad, 0)), float(max(js.min() - pad, 0)),
            float(min(is_.max() + pad, ni - 1)), float(min(js.max() + pad, nj - 1)))


def run_case(case: str, data: Path, model, fixes: int, embeddings: Path | None) -> list[float]:
    volume = read_ct(data / case / "ct.nii.gz")
    liver = read_label(data / case / "label.nii.gz", volume.geometry) > 0
    predictor = SlicePredictor(model, volume, cache_mb=16000)
    if embeddings is not None and (embeddings / f"emb_{case}.npz").is_file():
        saved = np.load(embeddings / f"emb_{case}.npz")
        for k, emb in zip(saved["ks"], saved["embs"], strict=True):
            predictor.cache.put(predictor._key(int(k)), torch.from_numpy(emb))
    areas = liver.sum(axis=(1, 2))
    seed = int(np.argmax(areas))
    seg = SegmentPrompts("liver", 1, slices={seed: SlicePrompts(boxes_ij=[box_around(liver[seed])])}, propagate=True)
    first = propagation.propagate_segment(seg, predictor, propagation.PropagationSettings())
    sx, sy, sz = volume.geometry.spacing_mm
    existing = refine_with_crf(volume.array_kji, first.mask_kji, (sz, sy, sx), ORGAN_CRF)
    before = dice(existing, liver)
    pad = max(1, round(3.0 / sx))
    candidates = [k for k in range(len(areas)) if areas[k] > 0.15 * areas.max() and abs(k - seed) >= 4]
    candidates.sort(key=lambda k: dice(existing[k], liver[k]))
    changes = []
    for k_fix in candidates[:fixes]:
        started = time.perf_counter()
        outcome = propagation.repropagate(existing, copy.deepcopy(seg), k_fix,
                                          SlicePrompts(boxes_ij=[box_around(liver[k_fix], pad)]), predictor,
                                          propagation.PropagationSettings())
        changed = [k for k in range(len(areas)) if not np.array_equal(outcome.mask_kji[k], existing[k])]
        after = dice(outcome.mask_kji, liver)
        changes.append(after - before)
        span = f"{changed[0]}..{changed[-1]} ({len(changed)})" if changed else "none"
        print(f"{case} seed {seed} fix {k_fix}: slice Dice {dice(existing[k_fix], liver[k_fix]):.3f} -> "
              f"{dice(outcome.mask_kji[k_fix], liver[k_fix]):.3f}, changed {span}, 3D {before:.4f} -> {after:.4f} "
              f"({after - before:+.4f}), {time.perf_counter() - started:.1f} s", flush=True)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--fixes", type=int, default=6)
    parser.add_argument("--embeddings", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("litemedsam", device="cpu", accelerate="auto")
    per_case = {case: run_case(case, args.data, model, args.fixes, args.embeddings) for case in args.cases.split(",")}
    every = [c for changes in per_case.values() for c in changes]
    print("mean 3D Dice change per case: " + ", ".join(f"{c} {np.mean(v):+.4f}" for c, v in per_case.items()))
    print(f"overall mean {np.mean(every):+.4f}, worst {np.min(every):+.4f}, fixes that lower it "
          f"{sum(c < -1e-4 for c in every)}/{len(every)} (REPROPAGATION_MAX_REACH = "
          f"{propagation.REPROPAGATION_MAX_REACH})")


if __name__ == "__main__":
    main()

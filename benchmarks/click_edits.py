"""Corrective clicks after a box on the labelled cases of ../shared/data: what a point does to the mask.

For each case, up to 8 liver slices (liver area over 20 % of the largest) and up to 8 lesion slices (the
largest lesion on the slice): a box 5 mm around the reference, then clicks at the centre of the largest error
region (``liversam.click_simulation.next_click``: + on a missed region, - on a wrong one), each click added
to the slice's prompts and ``SlicePredictor.predict`` run again. Prints the mean Dice after 0..N clicks for:

- ``model``: the model's own answer to box + points (no point rules);
- ``R<r>``: the point rules with a reach of r mm (``POINT_REACH_MM``) and the default disk radius;
- ``D<r>``: reach and disk radius both r mm (``D3`` is the default).

    python benchmarks/click_edits.py --data ../shared/data [--variants model,D3] [--clicks 5] [--embeddings DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LiverSAM"))

import liversam.predictor as predictor_module  # noqa: E402
from liversam.click_simulation import next_click  # noqa: E402
from liversam.ct_io import read_ct  # noqa: E402
from liversam.evaluate import read_label  # noqa: E402
from liversam.models import load_model  # noqa: E402
from liversam.prompts import SlicePrompts  # noqa: E402

CASES = ("lits117", "ircadb17", "hcc0697", "hcc2144")
DEFAULTS = (predictor_module.honour_points, predictor_module.local_changes, predictor_module.POINT_RADIUS_MM,
            predictor_module.POINT_REACH_MM)


def use_variant(name: str) -> None:
    m = predictor_module
    m.honour_points, m.local_changes, m.POINT_RADIUS_MM, m.POINT_REACH_MM = DEFAULTS
    if name == "model":
        m.honour_points = lambda mask, *args, **kwargs: mask.copy()
        m.local_changes = lambda reference, changed, *args, **kwargs: changed.copy()
    elif name.startswith("R"):
        m.POINT_REACH_MM = float(name[1:])
    elif name.startswith("D"):
        m.POINT_REACH_MM = m.POINT_RADIUS_MM = float(name[1:])
    else:
        raise SystemExit(f"unknown variant {name!r}: model, R<mm> or D<mm>")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def box_around(mask_ji: np.ndarray, pad: int) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    nj, ni = mask_ji.shape
    return (float(max(is_.min() - pad, 0)), float(max(js.min() - pad, 0)),
            float(min(is_.max() + pad, ni - 1)), float(min(js.max() + pad, nj - 1)))


def slices_of(case: str, data: Path, model, embeddings: Path | None):
    volume = read_ct(data / case / "ct.nii.gz")
    label = read_label(data / case / "label.nii.gz", volume.geometry)
    predictor = predictor_module.SlicePredictor(model, volume, cache_mb=16000, readahead=False)
    if embeddings is not None and (embeddings / f"emb_{case}.npz").is_file():
        saved = np.load(embeddings / f"emb_{case}.npz")
        for k, emb in zip(saved["ks"], saved["embs"], strict=True):
            predictor.cache.put(predictor._key(int(k)), torch.from_numpy(emb))
    for structure, reference in (("liver", label > 0), ("tumor", label == 2)):
        areas = reference.sum(axis=(1, 2))
        ks = [k for k in range(len(areas)) if areas[k] > 0.2 * areas.max()]
        for k in ks[:: max(1, len(ks) // 8)][:8]:
            ref = reference[k]
            if structure == "tumor":
                parts, n = ndimage.label(ref)
                ref = parts == 1 + int(np.argmax(ndimage.sum(ref, parts, range(1, n + 1))))
            yield predictor, structure, k, ref, volume.geometry.spacing_mm


def session(predictor, k: int, ref: np.ndarray, spacing, clicks: int) -> list[float]:
    box = box_around(ref, max(1, round(5.0 / spacing[0])))
    mask = predictor.predict(k, SlicePrompts([box])).mask_ji
    curve, done = [dice(mask, ref)], []
    for _ in range(clicks):
        click = next_click(mask, ref, (spacing[1], spacing[0]), done)
        if click is None:
            curve.append(curve[-1])
            continue
        done.append(click)
        positive = [(c.i, c.j) for c in done if c.positive]
        negative = [(c.i, c.j) for c in done if not c.positive]
        mask = predictor.predict(k, SlicePrompts([box], positive, negative)).mask_ji
        curve.append(dice(mask, ref))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default="model,D3")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--embeddings", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("litemedsam", device="cpu", accelerate="auto")
    variants = args.variants.split(",")
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for case in args.cases.split(","):
        for predictor, structure, k, ref, spacing in slices_of(case, args.data, model, args.embeddings):
            for variant in variants:
                use_variant(variant)
                curves.setdefault((variant, structure), []).append(session(predictor, k, ref, spacing, args.clicks))
        print(f"{case}: done", flush=True)
    use_variant("D3")
    for (variant, structure), rows in curves.items():
        table = np.array(rows)
        worse = float(np.mean(table[:, 1] < table[:, 0] - 0.02))
        print(f"{variant:6s} {structure:5s} n={len(rows)} mean Dice after 0..{args.clicks} clicks: "
              f"{' '.join(f'{x:.3f}' for x in table.mean(axis=0))}; first click lowers it by > 0.02: {worse:.2f}")


if __name__ == "__main__":
    main()

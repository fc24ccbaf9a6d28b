"""Shared pytest fixtures: real CT from ../shared/data, the bundled LiteMedSAM model, one shared predictor.

The model and the lits117 predictor are session-scoped: every test that segments lits117 slices shares one
embedding cache, so a slice is encoded at most once per test run (each encode costs over a second on CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "LiverSAM"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _data_dir() -> Path:
    return Path(os.environ.get("LIVERSAM_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "lits117" / "ct.nii.gz").is_file():
        raise RuntimeError(
            f"Test data not found at '{path}'. Set LIVERSAM_TEST_DATA to the shared data folder (see README)."
        )
    return path


@pytest.fixture(scope="session")
def lits117_ct_path(data_dir: Path) -> Path:
    return data_dir / "lits117" / "ct.nii.gz"


@pytest.fixture(scope="session")
def lits117_volume(lits117_ct_path: Path):
    from liversam.ct_io import read_ct

    return read_ct(lits117_ct_path)


@pytest.fixture(scope="session")
def lits117_label(data_dir: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "lits117" / "label.nii.gz")))


@pytest.fixture(scope="session")
def litemedsam():
    import torch

    from liversam.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def lits117_predictor(litemedsam, lits117_volume):
    from liversam.predictor import SlicePredictor

    return SlicePredictor(litemedsam, lits117_volume, cache_mb=2048)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def box_of(mask_ji: np.ndarray, pad: int = 0) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    return (float(is_.min() - pad), float(js.min() - pad), float(is_.max() + pad), float(js.max() + pad))

"""Shared pytest fixtures: real CT from ../shared/data, the bundled LiteMedSAM model, one shared predictor.

The model and the lits117 predictor are session-scoped: every test that segments lits117 slices shares one
embedding cache, so a slice is encoded at most once per test run (each encode costs over a second on CPU).

The slow accuracy tests (whole tracks on real CT) run on ``litemedsam_openvino_fp32``: the same weights with the
image encoder and prompt decoder in OpenVINO fp32, the path ``liversam segment --accelerate auto`` takes on a CPU
without native bf16, chosen only after its masks agree with plain PyTorch's. Every figure those tests print was
the same with plain PyTorch (session 33: e.g. hcc2144 liver 0.9265, ircadb17 thick 0.9606), at about a fifth of
the encoder time; test_skip_thin_slices_lits117.py checks the masks agree on real slices.
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


@pytest.fixture(scope="session")
def litemedsam_openvino_fp32():
    """LiteMedSAM with its encoder and decoder in OpenVINO fp32 (export and mask verdict cached in the user's
    encoder cache, as ``setup.sh`` prepares them). Its own instance: ``litemedsam`` stays plain PyTorch."""
    import torch

    from liversam.acceleration import current_decoder_backend, current_precision, enable_fast_encoder
    from liversam.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_model("litemedsam", device="cpu")
    backend = enable_fast_encoder(model, "openvino", precision="fp32")
    decoder_precision = getattr(model.decoder_override, "precision", None)
    chosen = (backend, current_precision(model), current_decoder_backend(model), decoder_precision)
    if chosen != ("openvino", "fp32", "openvino", "fp32"):
        raise RuntimeError(
            f"The accuracy tests need LiteMedSAM on OpenVINO fp32 (encoder and decoder), got {chosen}: run "
            "`bash setup.sh` (installs the [fast] extra and prepares the encoder cache); the log above says why."
        )
    return model


@pytest.fixture(scope="session")
def lits117_openvino_predictor(litemedsam_openvino_fp32, lits117_volume):
    """The lits117 predictor of the accuracy tests (one embedding cache for all of them, read-only tensors)."""
    from liversam.predictor import SlicePredictor

    return SlicePredictor(litemedsam_openvino_fp32, lits117_volume, cache_mb=2048)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def box_of(mask_ji: np.ndarray, pad: int = 0) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    return (float(is_.min() - pad), float(js.min() - pad), float(is_.max() + pad), float(js.max() + pad))

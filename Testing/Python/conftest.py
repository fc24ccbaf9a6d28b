"""Shared pytest fixtures: real CT from ../shared/data, the bundled LiteMedSAM model, one shared predictor.

The model and the lits117 predictor are session-scoped: every test that segments lits117 slices shares one
embedding cache, so a slice is encoded at most once per test run (each encode costs over a second on CPU).

The slow accuracy tests (whole tracks on real CT) run on ``litemedsam_openvino_fp32``: the same weights with the
image encoder and prompt decoder in OpenVINO fp32, the path ``liversam segment --accelerate auto`` takes on a CPU
without native bf16, chosen only after its masks agree with plain PyTorch's. Every figure those tests print was
the same with plain PyTorch (session 33: e.g. hcc2144 liver 0.9265, ircadb17 thick 0.9606), at about a fifth of
the encoder time; test_skip_thin_slices_lits117.py checks the masks agree on real slices.

That model's encoder is wrapped in :class:`ExactEncoderMemo`: many tests encode the same lits117 slices through
predictors of their own (in-process ``liversam segment`` runs, a sagittal copy of a case, crops), and each distinct
slice input is now encoded once per test session. In-process commands get that model through :func:`cli_model`
instead of loading and accelerating one of their own (tests of loading and of the acceleration choice do not).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
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
def dcmqi_ct(data_dir: Path) -> Path:
    """The 3-slice GE CT DICOM series that dcmqi's DICOM SEG references."""
    return data_dir / "dcmqi_ct3slice" / "ct"


@pytest.fixture(scope="session")
def totalseg_dicom(data_dir: Path) -> Path:
    """TotalSegmentator's 20-slice 512 x 512 CT DICOM series (JPEG 2000)."""
    return data_dir / "totalseg_small" / "ct_dicom"


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
    model.encoder_override = ExactEncoderMemo(model.encoder_override)  # after its checks: they ran the encoder
    return model


@pytest.fixture(scope="session")
def lits117_openvino_predictor(litemedsam_openvino_fp32, lits117_volume):
    """The lits117 predictor of the accuracy tests (one embedding cache for all of them, read-only tensors)."""
    from liversam.predictor import SlicePredictor

    return SlicePredictor(litemedsam_openvino_fp32, lits117_volume, cache_mb=2048)


class ExactEncoderMemo:
    """An image encoder that remembers its outputs by input: an input whose bytes it encoded before gets a copy of
    that output back without running the encoder again. OpenVINO's CPU encoder is deterministic (the same bytes in
    give the same bytes out: test_skip_thin_slices_lits117.py checks it on a real slice), so a hit is exactly what
    encoding again would return. The key is the whole input (shape, dtype and a SHA-256 of its bytes), so another
    slice, window, crop or orientation of the pixels is a miss and is encoded. Least recently used outputs go
    beyond ``max_mb``. Other attributes (name, precision, agreement) are the encoder's.

    Test code only: an encoder that serves embeddings from elsewhere must never judge a backend (the mask-agreement
    check refuses one, ``liversam.acceleration.agreement._candidate_masks``); it wraps the session model after its
    checks."""

    def __init__(self, encoder, max_mb: float = 1024.0) -> None:
        self.encoder = encoder
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._outputs: OrderedDict[tuple, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(images) -> tuple:
        array = images.detach().cpu().contiguous().numpy()
        return tuple(array.shape), str(array.dtype), hashlib.sha256(array.tobytes()).digest()

    def __call__(self, images):
        key = self.key(images)
        with self._lock:
            known = self._outputs.get(key)
            if known is not None:
                self._outputs.move_to_end(key)
                self.hits += 1
                return known.clone()  # a copy: what a caller does with it never reaches the memo
        output = self.encoder(images)
        stored = output.detach().clone()
        with self._lock:
            self.misses += 1
            if key not in self._outputs:
                self._outputs[key] = stored
                self._bytes += stored.element_size() * stored.nelement()
            while self._bytes > self.max_bytes and len(self._outputs) > 1:
                _, old = self._outputs.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()
        return output

    def __getattr__(self, name: str):
        if name == "encoder":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)


@contextlib.contextmanager
def cli_model(model, calls: list[dict] | None = None) -> Iterator[None]:
    """In-process ``liversam`` commands run with ``model`` (the session's, already loaded, accelerated and with its
    encoder memo) instead of loading and accelerating one of their own: ``liversam.models.load_model`` returns it
    for LiteMedSAM on the CPU. Each call's arguments are appended to ``calls`` (for a test to check what the
    command asked for); any other model or device fails the test instead of being swapped silently."""
    import liversam.models as models

    def load(name_or_path="litemedsam", device="auto", accelerate="plain"):
        if calls is not None:
            calls.append({"model": str(name_or_path), "device": str(device), "accelerate": accelerate})
        if str(name_or_path) != "litemedsam" or str(device) not in ("auto", "cpu"):
            raise AssertionError(f"cli_model stands in for LiteMedSAM on the CPU, not {name_or_path} on {device}")
        return model

    original = models.load_model
    models.load_model = load
    try:
        yield
    finally:
        models.load_model = original


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def box_of(mask_ji: np.ndarray, pad: int = 0) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    return (float(is_.min() - pad), float(js.min() - pad), float(is_.max() + pad), float(js.max() + pad))

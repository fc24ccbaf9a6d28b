"""Accept a fast backend by what users see: its masks on real CT slices against plain fp32 PyTorch masks.

An accelerated encoder / decoder (OpenVINO, ONNX Runtime, fused PyTorch; fp32 or bf16) is *accepted* when the
masks it gives on a fixed set of real slices and box prompts agree with the masks of the unmodified fp32
PyTorch model: Dice >= :data:`MIN_DICE` on every mask and >= :data:`MIN_MEAN_DICE` on average. The fixed set
is the lits117 example CT shipped in the repository (``examples/lits117``): :data:`CHECK_SLICES` axial slices
with one box around the liver and one around the slice's largest lesion (from ``label.nii.gz``).

The check runs once per (weights SHA-256, backend, precision, runtime library version, CPU) and its verdict is
kept as JSON in the user cache (``<cache>/agreement/``); the reference masks of the fp32 PyTorch model are
kept there too (per weights SHA-256), so plain PyTorch encodes the check slices once per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage

from .. import __version__
from ..atomic_write import atomic_path, write_text_atomically
from ..embedding_cache import FP32_STORAGE as EMBEDDING_STORAGE
from .cpu import cpu_features

log = logging.getLogger(__name__)

AGREEMENT_FORMAT = "liversam-mask-agreement/1"
EMBEDDING_STORAGE_NAME = str(EMBEDDING_STORAGE).removeprefix("torch.")  # in the verdict's key
MIN_DICE = 0.98  # every mask
MIN_MEAN_DICE = 0.99  # mean over the masks
CHECK_SLICES = (10, 30, 50, 70, 90, 110)  # lits117 axial slices (128 x 128 x 128, liver on every slice)
MIN_LESION_PIXELS = 100  # a tumour box only where the largest lesion is big enough for a stable Dice

#: The repository's example CT (a source checkout); ``$LIVERSAM_AGREEMENT_DATA`` overrides it.
EXAMPLE_DIR = Path(__file__).resolve().parents[3] / "examples" / "lits117"


@dataclass(frozen=True)
class CheckCase:
    """One prompt of the fixed set: a box (i0, j0, i1, j1 voxels) on axial slice ``k``."""

    k: int
    structure: str  # "liver" or "tumor"
    box_ij: tuple[float, float, float, float]


@dataclass
class AgreementResult:
    """The verdict on one backend / precision, as cached."""

    backend: str
    precision: str
    accepted: bool
    dice: list[float]
    min_dice: float
    mean_dice: float
    seconds_per_slice: float  # encode + decode of the candidate during the check (load-dependent)
    key: str
    reason: str = ""

    def summary(self) -> str:
        verdict = "accepted" if self.accepted else "refused"
        return (
            f"{self.backend} {self.precision} {verdict}: mask Dice vs PyTorch fp32 mean {self.mean_dice:.4f}, "
            f"min {self.min_dice:.4f} on {len(self.dice)} masks (limits {MIN_MEAN_DICE} / {MIN_DICE})"
        )


def example_dir() -> Path | None:
    """Folder with ``ct.nii.gz`` + ``label.nii.gz`` of the check set, or None when not available."""
    folder = Path(os.environ.get("LIVERSAM_AGREEMENT_DATA") or EXAMPLE_DIR)
    if (folder / "ct.nii.gz").is_file() and (folder / "label.nii.gz").is_file():
        return folder
    return None


def _bbox(mask_ji: np.ndarray) -> tuple[float, float, float, float]:
    js, is_ = np.nonzero(mask_ji)
    return float(is_.min()), float(js.min()), float(is_.max()), float(js.max())


def check_cases(label_kji: np.ndarray, slices: tuple[int, ...]) -> list[CheckCase]:
    """Liver box (labels 1+2) and largest-lesion box (label 2, >= MIN_LESION_PIXELS) on each slice."""
    cases: list[CheckCase] = []
    for k in slices:
        liver = np.isin(label_kji[k], (1, 2))
        if liver.any():
            cases.append(CheckCase(int(k), "liver", _bbox(liver)))
        lesions, count = ndimage.label(label_kji[k] == 2)
        if count:
            sizes = ndimage.sum_labels(np.ones_like(lesions), lesions, index=range(1, count + 1))
            if sizes.max() >= MIN_LESION_PIXELS:
                cases.append(CheckCase(int(k), "tumor", _bbox(lesions == 1 + int(np.argmax(sizes)))))
    return cases


def load_check_set(slices: tuple[int, ...] | None = None):
    """(CT volume, cases) of the example CT on ``slices`` (default :data:`CHECK_SLICES`), or None when the
    example is not installed."""
    slices = CHECK_SLICES if slices is None else slices
    folder = example_dir()
    if folder is None:
        return None
    from ..ct_io import read_ct
    from ..evaluate import read_label

    volume = read_ct(folder / "ct.nii.gz")
    label = read_label(folder / "label.nii.gz", volume.geometry, folder / "ct.nii.gz")
    return volume, check_cases(label, slices)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@contextmanager
def plain_model(model) -> Iterator[None]:
    """Temporarily run ``model`` with its own PyTorch encoder and decoder (overrides restored after)."""
    encoder, decoder = model.encoder_override, getattr(model, "decoder_override", None)
    model.encoder_override = None
    if hasattr(model, "decoder_override"):
        model.decoder_override = None
    try:
        yield
    finally:
        model.encoder_override = encoder
        if hasattr(model, "decoder_override"):
            model.decoder_override = decoder


def predict_masks(model, volume, cases: list[CheckCase]) -> tuple[list[np.ndarray], float]:
    """The masks ``model`` gives for ``cases`` (as ``SlicePredictor.predict`` makes them) and the seconds
    per slice (encode + all of the slice's prompts). The slice embeddings are kept as every run keeps them (fp16,
    :mod:`liversam.embedding_cache`), for the fp32 PyTorch reference too: the check compares what a user gets from
    the candidate with what the same user gets from plain PyTorch."""
    from ..embedding_cache import SliceEmbeddingCache
    from ..predictor import SlicePredictor
    from ..prompts import SlicePrompts

    predictor = SlicePredictor(model, volume, cache=SliceEmbeddingCache(256.0, store_fp32_as=EMBEDDING_STORAGE))
    masks = []
    started = time.perf_counter()
    for case in cases:
        masks.append(predictor.predict(case.k, SlicePrompts(boxes_ij=[case.box_ij])).mask_ji.copy())
    slices = max(1, len({c.k for c in cases}))
    return masks, (time.perf_counter() - started) / slices


class _CountingEncoder:
    """Wraps a candidate's encoder and counts the images it encodes (other attributes pass through)."""

    def __init__(self, encoder) -> None:
        self.encoder, self.images = encoder, 0

    def __call__(self, images):
        self.images += int(images.shape[0]) if getattr(images, "ndim", 0) == 4 else 1
        return self.encoder(images)

    def __getattr__(self, name: str):
        if name == "encoder":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)


def _candidate_masks(model, volume, cases: list[CheckCase], backend: str, precision: str):
    """``predict_masks`` with the candidate's encoder; refuses to judge masks its encoder did not make.

    A verdict must come from the candidate's own embeddings: embeddings served from elsewhere (a cache layered
    over the predictor, as a development harness once did) would judge the decoder alone and keep the verdict.
    So the candidate must encode at least one image per slice of the check set."""
    from .backends import BackendUnavailable

    encoder = getattr(model, "encoder_override", None)
    if encoder is None:
        return predict_masks(model, volume, cases)
    counting = _CountingEncoder(encoder)
    model.encoder_override = counting
    try:
        masks, seconds = predict_masks(model, volume, cases)
    finally:
        model.encoder_override = encoder
    slices = len({case.k for case in cases})
    if counting.images < slices:
        raise BackendUnavailable(
            f"the {backend} {precision} encoder encoded {counting.images} of the mask check's {slices} slices (the "
            "other embeddings came from somewhere else); no verdict was recorded"
        )
    return masks, seconds


class VerdictFolders(Protocol):
    """Verdict folders read in order (a read-only shared cache's first), and the one written, asked for only when
    something is written (:class:`~liversam.acceleration.backends.CacheSubfolder`: its fallback is made only then)."""

    def read_folders(self) -> tuple[Path, ...]: ...

    def write_folder(self) -> Path: ...


Folders = Path | Sequence[Path] | VerdictFolders


def _folders(folder: Folders) -> tuple[Path, ...]:
    """The verdict folders read, in order: the one given, several (the last one is also written), or those of a
    :class:`VerdictFolders`."""
    if isinstance(folder, (str, Path)):
        return (Path(folder),)
    if hasattr(folder, "read_folders"):
        return folder.read_folders()
    return tuple(Path(f) for f in folder)


def _write_folder(folder: Folders) -> Path:
    """The verdict folder written: the one given, the last of several, or that of a :class:`VerdictFolders` (which
    may make it now: call only when something is written)."""
    if isinstance(folder, (str, Path)):
        return Path(folder)
    if hasattr(folder, "write_folder"):
        return folder.write_folder()
    return Path(folder[-1])


def _reference_masks(model, volume, cases, folder: Folders, weights_sha: str) -> list[np.ndarray]:
    """fp32 PyTorch masks of ``cases`` (embeddings kept as every run keeps them), from the cache or computed (and
    cached) now."""
    tag = cases_tag(cases)
    name = f"{weights_sha[:32]}-reference-masks-f32-{tag}.npz"
    for path in (f / name for f in _folders(folder)):
        if not path.is_file():
            continue
        try:
            with np.load(path) as data:
                if str(data["tag"]) == tag:
                    shape = tuple(int(v) for v in data["shape"])
                    bits = np.unpackbits(data["bits"])[: int(np.prod(shape))]
                    return [m.astype(bool) for m in bits.reshape(shape)]
        except (OSError, KeyError, ValueError):
            pass  # unreadable: compute again
    log.info("Computing the fp32 PyTorch reference masks of the agreement check (once per model) ...")
    with plain_model(model):
        masks, _ = predict_masks(model, volume, cases)
    stack = np.stack(masks)
    folder = _write_folder(folder)
    path = folder / name
    try:  # a cache: a folder that cannot be written costs this computation again next time, not the candidate
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, tag=np.array(tag), shape=np.array(stack.shape), bits=np.packbits(stack))
    except OSError as exc:
        log.info("Could not cache the reference masks in %s: %s", folder, exc)
    return masks


def runtime_version(backend: str) -> str:
    """Version of the library that runs ``backend`` (part of the cache key: a new runtime is re-checked).

    ``backend`` may name the encoder and decoder runtimes as ``encoder+decoder``, each with its graph's version
    (``openvino-e2+openvino-g3``); the encoder's runtime counts."""
    backend = backend.split("+")[0].split("-")[0]
    try:
        if backend == "openvino":
            import openvino

            return f"openvino-{openvino.__version__}"
        if backend == "onnxruntime":
            import onnxruntime

            return f"onnxruntime-{onnxruntime.__version__}"
    except ImportError:
        return f"{backend}-missing"
    import torch

    return f"torch-{torch.__version__}"


def cases_tag(cases: list[CheckCase]) -> str:
    """A short hash of the check set (slices, structures, boxes): another set gets its own verdict."""
    text = ";".join(f"{c.k}:{c.structure}:{','.join(f'{v:g}' for v in c.box_ij)}" for c in cases)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def agreement_key(weights_sha: str, backend: str, precision: str, tag: str = "") -> str:
    """File-name-safe key: weights, backend(s) and precision in clear, the runtime's version (OpenVINO's holds
    '/' and a build hash), LiverSAM's version, the check set and the CPU (:meth:`CPUFeatures.numerics_id`: its
    model and the instruction sets kernels are chosen by) as one short hash, so the name stays far below
    the file system's 255 characters (the atomic write's temporary name holds it twice)."""
    varying = (f"{runtime_version(backend)}|liversam-{__version__}|set{tag}|embeddings-{EMBEDDING_STORAGE_NAME}"
               f"|cpu-{cpu_features().numerics_id()}")
    key = f"{weights_sha[:32]}-{backend}-{precision}-{hashlib.sha256(varying.encode()).hexdigest()[:12]}"
    return re.sub(r"[^A-Za-z0-9+_-]", "_", key)


def cached_agreement(folder: Folders, key: str) -> AgreementResult | None:
    """The verdict ``key`` stored in ``folder`` (or the first of several folders that holds a readable one)."""
    for path in (f / f"{key}.json" for f in _folders(folder)):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("format", None) != AGREEMENT_FORMAT:
                continue
            known = {f.name for f in fields(AgreementResult)}  # "runtime", "liversam" and "cpu" are for readers
            return AgreementResult(**{name: value for name, value in data.items() if name in known})
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_agreement(
    model,
    backend: str,
    precision: str,
    weights_sha: str,
    folder: Folders,
    check_set=None,
    use_cache: bool = True,
) -> AgreementResult:
    """Compare ``model``'s masks (with its current overrides) with fp32 PyTorch masks; cache the verdict.

    ``folder``: where verdicts are kept; several folders are read in order and the last one is written, or a
    :class:`VerdictFolders` (a read-only shared cache, then its fallback, made only when written). ``check_set``:
    (volume, cases), default :func:`load_check_set`. Raises ``FileNotFoundError`` when there is no check set (an
    installation without ``examples/lits117``).
    """
    check_set = check_set if check_set is not None else load_check_set()
    if check_set is None:
        raise FileNotFoundError(
            f"the mask agreement check needs the example CT ({EXAMPLE_DIR}); set LIVERSAM_AGREEMENT_DATA"
        )
    volume, cases = check_set
    key = agreement_key(weights_sha, backend, precision, cases_tag(cases))
    if use_cache:
        cached = cached_agreement(folder, key)
        if cached is not None:
            return cached
    reference = _reference_masks(model, volume, cases, folder, weights_sha)
    log.info("Checking %s %s masks against PyTorch fp32 on %d prompts ...", backend, precision, len(cases))
    masks, seconds = _candidate_masks(model, volume, cases, backend, precision)
    scores = [dice(a, b) for a, b in zip(masks, reference, strict=True)]
    low, mean = min(scores), statistics.fmean(scores)
    accepted = bool(low >= MIN_DICE and mean >= MIN_MEAN_DICE)
    result = AgreementResult(
        backend=backend,
        precision=precision,
        accepted=accepted,
        dice=[round(s, 5) for s in scores],
        min_dice=round(low, 5),
        mean_dice=round(mean, 5),
        seconds_per_slice=round(seconds, 4),
        key=key,
        reason="" if accepted else f"mask Dice mean {mean:.4f} / min {low:.4f} below {MIN_MEAN_DICE} / {MIN_DICE}",
    )
    if use_cache:
        folder = _write_folder(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            payload = {"format": AGREEMENT_FORMAT, **asdict(result), "runtime": runtime_version(backend),
                       "liversam": __version__, "cpu": cpu_features().summary()}
            write_text_atomically(folder / f"{key}.json", json.dumps(payload, indent=2))
        except OSError as exc:
            log.info("Could not cache the agreement verdict in %s: %s", folder, exc)
    log.info("%s", result.summary())
    return result


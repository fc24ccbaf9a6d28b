"""int8 image encoder: OpenVINO NNCF post-training quantisation, calibrated on real CT slices.

Offered by ``enable_fast_encoder`` only on CPUs with int8 dot-product instructions (VNNI / AMX-INT8 /
Arm dotprod) and with the optional ``nncf`` package (``pip install 'liversam[fast]'``); like every other
candidate it is kept only when its masks pass the agreement check against fp32 PyTorch (``agreement.py``).

The quantised graph is made once per exported encoder and calibration set and cached beside the export
(``<cache>/<weights sha>-<S>px/encoder_int8-<tag>.xml`` + ``.bin``), never at import and never in the
install folder. Calibration: :data:`CALIBRATION_SLICES` liver slices, evenly spaced, from the first two
labelled cases (``ct.nii.gz`` + ``label.nii.gz``) in ``$LIVERSAM_CALIBRATION_DATA`` (default
``$LIVERSAM_TEST_DATA``) other than the check set's case, so that calibration and check see different
patients; without such a folder, the example CT's liver slices that the check does not use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..atomic_write import atomic_path
from .backends import BackendUnavailable, ExportEntry, _PerImageRunner, openvino_core, openvino_cpu_config

log = logging.getLogger(__name__)

CALIBRATION_SLICES = 30  # in all, split evenly over the calibration cases
CALIBRATION_CASES = 2
#: Left in float: the encoder's stem (patch embedding + first stage), where bf16 rounding already moved the
#: masks most (docs/PERFORMANCE.md); the rest of the encoder is quantised.
FLOAT_SCOPE = (r".*/patch_embed/.*", r".*/layers\.0/.*")


def nncf_available() -> bool:
    try:
        return importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def _labelled_cases(folder: Path, exclude: Path | None) -> list[Path]:
    cases = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (case / "ct.nii.gz").is_file() and (case / "label.nii.gz").is_file():
            same = exclude is not None and (case / "ct.nii.gz").resolve() == exclude.resolve()
            if not same and case.name != "lits117":  # the check set's patient (its example copy)
                cases.append(case)
    return cases[:CALIBRATION_CASES]


def calibration_plan() -> list[tuple[Path, tuple[int, ...] | None]]:
    """(case folder, slices to skip or None) for the calibration: other patients when available."""
    from .agreement import CHECK_SLICES, example_dir

    example = example_dir()
    root = os.environ.get("LIVERSAM_CALIBRATION_DATA") or os.environ.get("LIVERSAM_TEST_DATA")
    if root and Path(root).is_dir():
        cases = _labelled_cases(Path(root), example / "ct.nii.gz" if example else None)
        if cases:
            return [(case, None) for case in cases]
    if example is not None:
        return [(example, CHECK_SLICES)]
    return []


def calibration_tag(plan=None) -> str:
    """A short hash naming the calibration set (cases, file sizes, slice count), without reading the CT:
    part of the quantised model's file name and of its agreement verdict's key."""
    plan = calibration_plan() if plan is None else plan
    text = ";".join(
        f"{folder.name}:{(folder / 'ct.nii.gz').stat().st_size}:{skip}" for folder, skip in plan
    )
    return hashlib.sha256(f"{text}|{CALIBRATION_SLICES}|{FLOAT_SCOPE}".encode()).hexdigest()[:10]


def calibration_inputs(model, plan=None) -> list[np.ndarray]:
    """Model inputs (1, 3, S, S) float32 of the calibration slices, preprocessed as for segmentation.
    Raises BackendUnavailable without data."""
    from ..ct_io import read_ct
    from ..evaluate import read_label
    from ..predictor import SlicePredictor

    plan = calibration_plan() if plan is None else plan
    if not plan:
        raise BackendUnavailable("no real CT slices to calibrate int8 on (set LIVERSAM_CALIBRATION_DATA)")
    per_case = max(1, CALIBRATION_SLICES // len(plan))
    inputs = []
    for folder, skip in plan:
        volume = read_ct(folder / "ct.nii.gz")
        label = read_label(folder / "label.nii.gz", volume.geometry, folder / "ct.nii.gz")
        ks = [int(k) for k in np.flatnonzero(np.isin(label, (1, 2)).sum(axis=(1, 2)) > 0) if k not in (skip or ())]
        picks = [ks[i] for i in np.unique(np.round(np.linspace(0, len(ks) - 1, min(per_case, len(ks)))).astype(int))]
        predictor = SlicePredictor(model, volume, cache_mb=1.0)  # only its preprocessing is used
        inputs += [predictor.model_input(k).numpy().astype(np.float32) for k in picks]
    return inputs


def quantized_path(entry: ExportEntry, tag: str) -> Path:
    """The int8 model's ``.xml`` (its ``.bin`` beside it): beside the export, or in the entry's scratch folder when
    the export is in a cache folder that cannot be written (:meth:`ExportEntry.derived`)."""
    return entry.derived(f"encoder_int8-{tag}.xml", f"encoder_int8-{tag}.bin")[0]


def quantize_encoder(entry: ExportEntry, inputs: list[np.ndarray], tag: str) -> Path:
    """NNCF post-training quantisation of the exported encoder (int8 weights and activations, per-channel
    weights, transformer preset: SmoothQuant where it applies, softmax / layer norm kept in float; the stem
    :data:`FLOAT_SCOPE` in float),
    calibrated on ``inputs``; saved once as ``encoder_int8-<tag>.xml`` / ``.bin``. Returns the path."""
    path = quantized_path(entry, tag)
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable("int8 needs the 'nncf' and 'openvino' packages") from exc
    log.info("Quantising the image encoder to int8 once (%d calibration slices; cached in %s) ...",
             len(inputs), path.parent)
    started = time.perf_counter()
    try:
        model = openvino_core().read_model(str(entry.onnx_path))
        quantized = nncf.quantize(
            model,
            nncf.Dataset(inputs),
            subset_size=len(inputs),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(patterns=list(FLOAT_SCOPE), validate=False),
        )
        # ov.save_model writes <name>.xml + <name>.bin: write both in a scratch folder, move .bin first.
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            tmp_xml = Path(scratch) / path.name
            ov.save_model(quantized, str(tmp_xml))
            with atomic_path(path.with_suffix(".bin")) as tmp:
                shutil.move(str(tmp_xml.with_suffix(".bin")), tmp)
            with atomic_path(path) as tmp:
                shutil.move(str(tmp_xml), tmp)
    except BackendUnavailable:
        raise
    except Exception as exc:  # nncf / OpenVINO raise many types
        raise BackendUnavailable(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    log.info("Encoder quantised to int8 in %.1f s.", time.perf_counter() - started)
    return path


class OpenVINOInt8Encoder(_PerImageRunner):
    """The NNCF-quantised encoder compiled by OpenVINO (int8 convolutions and matrix multiplies on VNNI /
    AMX; the operations left in float run in fp32)."""

    name = "openvino"
    precision = "int8"

    def __init__(self, entry: ExportEntry, threads: int, model) -> None:
        super().__init__(entry.input_size)
        if not nncf_available():
            raise BackendUnavailable("int8 needs the 'nncf' package (pip install 'liversam[fast]')")
        plan = calibration_plan()
        if not plan:
            raise BackendUnavailable("no real CT slices to calibrate int8 on (set LIVERSAM_CALIBRATION_DATA)")
        path = quantized_path(entry, calibration_tag(plan))
        if not (path.is_file() and path.with_suffix(".bin").is_file()):
            path = quantize_encoder(entry, calibration_inputs(model, plan), calibration_tag(plan))
        try:
            core = openvino_core()
            config = openvino_cpu_config(threads, "f32", entry)  # the int8 graph keeps its float parts in f32
            self._request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
        except Exception as exc:
            raise BackendUnavailable(f"OpenVINO could not compile '{path}': {exc}") from exc

    def _run_one(self, image: np.ndarray) -> np.ndarray:
        self._request.infer({0: image})
        return self._request.get_output_tensor(0).data

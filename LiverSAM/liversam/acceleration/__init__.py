"""Fast image encoders for ordinary CPUs, chosen automatically, and background pre-encoding.

``enable_fast_encoder(model)`` swaps the model's image encoder for the fastest accuracy-preserving
implementation available on this machine (``model.encoder_override``); the prompt encoder and mask decoder
are untouched. Order tried by ``backend="auto"`` on a CPU model:

1. ``openvino``    - the encoder exported to ONNX once and compiled by OpenVINO (optional package)
2. ``onnxruntime`` - the same ONNX graph run by ONNX Runtime (optional package)
3. ``torch``       - PyTorch with Conv+BatchNorm folded and channels-last layout (always available)

Precision is fp32 by default (accuracy first); bf16 is opt-in and only honoured on CPUs that multiply
bf16 natively (AVX512-BF16 / AMX / Arm BF16). On a GPU (CUDA / MPS) nothing is changed: the plain PyTorch path stays.
Every exported backend is checked against plain PyTorch on a fixed test image each time it is loaded;
any failure (package missing, export error, output mismatch) falls back to the next backend with a log
message, ending at the plain path. Nothing runs at import and nothing is downloaded.

``BackgroundPrefetcher(predictor).focus(k)`` encodes slices k, k+-1, ... on a worker thread while the
user works on slice k.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ModelError
from .backends import (
    TOLERANCE,
    BackendUnavailable,
    OnnxRuntimeEncoder,
    OpenVINOEncoder,
    TorchFusedEncoder,
    check_against_reference,
    clear_cache,
    default_cache_dir,
    encoder_weights_sha256,
    fold_conv_batchnorm,
    prepare_export,
    reference_image,
    relative_error,
)
from .cpu import CPUFeatures, cpu_features
from .decoder import FastPromptDecoder, check_decoder, export_decoder_onnx
from .prefetch import BackgroundPrefetcher, neighbour_order

log = logging.getLogger(__name__)

#: Backend names accepted by :func:`enable_fast_encoder` (``auto`` picks; ``plain`` is unmodified PyTorch).
BACKENDS = ("auto", "openvino", "onnxruntime", "torch", "plain")
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
PRECISIONS = ("auto", "fp32", "bf16")

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "PRECISIONS",
    "TOLERANCE",
    "BackendUnavailable",
    "BackgroundPrefetcher",
    "CPUFeatures",
    "OnnxRuntimeEncoder",
    "OpenVINOEncoder",
    "TorchFusedEncoder",
    "available_backends",
    "clear_cache",
    "cpu_features",
    "current_backend",
    "current_decoder_backend",
    "default_cache_dir",
    "FastPromptDecoder",
    "disable_fast_decoder",
    "disable_fast_encoder",
    "enable_fast_decoder",
    "enable_fast_encoder",
    "encoder_weights_sha256",
    "fold_conv_batchnorm",
    "neighbour_order",
    "prepare_export",
    "reference_image",
    "relative_error",
    "resolve_precision",
]


def available_backends() -> list[str]:
    """CPU backends whose packages are installed here, in ``auto`` order (``torch`` is always there).

    OpenVINO and ONNX Runtime also need the ``onnx`` package (for the one-time export).
    """
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: module set to None in sys.modules (blocked)
            return False

    if not installed("onnx"):  # torch.onnx.export needs it: no export, no runtime
        return ["torch"]
    return [*(name for name in ("openvino", "onnxruntime") if installed(name)), "torch"]


def resolve_precision(precision: str = "auto", features: CPUFeatures | None = None) -> str:
    """The precision the encoder will run in: ``fp32`` or ``bf16``.

    ``auto`` is fp32 everywhere. With bf16 rounding of the encoder's matrix inputs (what AVX512-BF16 / AMX
    hardware does, emulated on lits117) the masks agreed with fp32 only to a mean Dice of 0.993 (liver) and
    0.986 (tumour), and the label Dice moved by -0.007 to +0.020: as large as the 0.005 LiverSAM allows,
    so bf16 is opt-in (docs/PERFORMANCE.md). ``bf16`` on a CPU without native bf16 would be emulated and
    ~30x slower: it falls back to fp32 with a warning.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"Unknown encoder precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    if precision == "bf16":
        features = features or cpu_features()
        if not features.native_bf16:
            log.warning(
                "bf16 was requested but this CPU (%s) has no native bf16 (AVX512-BF16 / AMX): it would run "
                "about 30x slower than fp32. Using fp32.",
                features.summary(),
            )
            return "fp32"
        return "bf16"
    return "fp32"


def current_backend(model) -> str:
    """Name of the encoder implementation a :class:`LoadedModel` uses now (``plain`` when not overridden)."""
    override = getattr(model, "encoder_override", None)
    return "plain" if override is None else str(getattr(override, "name", "custom"))


def disable_fast_encoder(model) -> None:
    """Go back to the model's own PyTorch encoder."""
    model.encoder_override = None


def disable_fast_decoder(model) -> None:
    """Go back to the model's own PyTorch prompt encoder + mask decoder."""
    if hasattr(model, "decoder_override"):
        model.decoder_override = None


def current_decoder_backend(model) -> str:
    """Name of the prompt-decoder implementation in use (``plain`` when not overridden)."""
    override = getattr(model, "decoder_override", None)
    return "plain" if override is None else str(getattr(override, "name", "custom"))


def enable_fast_decoder(
    model,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> str:
    """Run the prompt encoder + mask decoder as one exported graph (OpenVINO / ONNX Runtime), fp32.

    Exported once per decoder-weights SHA-256 into ``<cache_dir>/<sha>-decoder/``; checked against the
    PyTorch decoder on fixed prompts (box, box + points, points with multimask, box + mask) every time it
    is loaded. Returns the backend used, or ``plain`` (GPU models, no package, failed export or check).
    """
    if backend not in BACKENDS:
        raise ModelError(f"Unknown decoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    disable_fast_decoder(model)
    if backend in ("plain", "torch") or not hasattr(model, "decoder_override"):
        return "plain"
    if torch.device(model.device).type != "cpu":
        return "plain"
    threads = int(threads or torch.get_num_threads())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parts = torch.nn.ModuleDict(
        {"prompt_encoder": model.network.prompt_encoder, "mask_decoder": model.network.mask_decoder}
    )
    candidates = [backend] if backend != "auto" else [b for b in AUTO_ORDER if b != "torch"]
    for name in candidates:
        try:
            if name not in available_backends():
                raise BackendUnavailable(f"the '{name}' package is not installed")
            folder = root / f"{encoder_weights_sha256(parts)}-decoder"
            onnx_path = folder / "decoder.onnx"
            if not onnx_path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                log.info("Exporting the prompt decoder to ONNX once (cached in %s) ...", folder)
                export_decoder_onnx(model.network, onnx_path)
            fast = FastPromptDecoder(onnx_path, name, threads, fallback=model.decode)
            entry = prepare_export(model.network.image_encoder, model.input_size, cache_dir)
            error = check_decoder(fast, model, entry)
        except (BackendUnavailable, OSError) as exc:
            log.info("Decoder backend '%s' not used: %s.", name, exc)
            continue
        model.decoder_override = fast
        log.info("Prompt decoder backend: %s (matches PyTorch to %.1e).", name, error)
        return name
    return "plain"


def _build(backend: str, model, precision: str, threads: int, cache_dir: Path | None, verify: bool):
    encoder = model.network.image_encoder
    if backend == "torch":
        return TorchFusedEncoder(encoder, bf16=precision == "bf16")
    if backend not in available_backends():
        raise BackendUnavailable(
            f"the '{backend}' package (or 'onnx', needed to export) is not installed; "
            "pip install 'liversam[fast]' to use it"
        )
    entry = prepare_export(encoder, model.input_size, cache_dir)
    if backend == "openvino":
        fn = OpenVINOEncoder(entry, threads, precision)
    elif backend == "onnxruntime":
        fn = OnnxRuntimeEncoder(entry, threads)  # always fp32 (its CPU provider has no bf16 kernels here)
    else:
        raise ModelError(f"Unknown encoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    if verify:
        error = check_against_reference(fn, entry, fn.precision, backend)
        log.info("%s encoder (%s) matches PyTorch fp32 to %.1e (relative L2).", backend, fn.precision, error)
    return fn


def enable_fast_encoder(
    model,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    precision: str = "auto",
    threads: int | None = None,
    verify: bool = True,
    decoder: bool = True,
) -> str:
    """Make ``model.encode`` use a faster encoder implementation; returns the backend now in use.

    ``model``: a :class:`liversam.models.LoadedModel`. ``backend``: one of :data:`BACKENDS`. A named
    backend that cannot run here falls back to ``auto``'s remaining choices and finally ``plain`` (logged,
    never an error: the plain path always works). ``cache_dir``: where exported graphs are kept (default
    :func:`default_cache_dir`, never the install folder). ``precision``: ``auto`` | ``fp32`` | ``bf16``
    (see :func:`resolve_precision`). ``threads``: CPU threads for the backend (default: torch's setting).
    ``verify``: compare each exported backend with PyTorch fp32 on a test image before using it.
    ``decoder``: when an exported backend is chosen, also run the prompt decoder through it
    (:func:`enable_fast_decoder`); the decoder's backend is reported by :func:`current_decoder_backend`.

    Models on a GPU are left on the plain PyTorch path (returns ``plain``).
    """
    if backend not in BACKENDS:
        raise ModelError(f"Unknown encoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    resolved_precision = resolve_precision(precision)
    if backend == "plain":
        disable_fast_encoder(model)
        disable_fast_decoder(model)
        return "plain"
    if torch.device(model.device).type != "cpu":
        if backend != "auto":
            log.info(
                "Encoder backend '%s' is for CPUs; the model runs on %s, keeping PyTorch.",
                backend,
                model.device,
            )
        disable_fast_encoder(model)
        disable_fast_decoder(model)
        return "plain"
    threads = int(threads or torch.get_num_threads())
    cache = Path(cache_dir) if cache_dir is not None else None
    candidates = (
        [backend] + [b for b in AUTO_ORDER if b != backend] if backend != "auto" else list(AUTO_ORDER)
    )
    for name in candidates:
        try:
            fn = _build(name, model, resolved_precision, threads, cache, verify)
        except (BackendUnavailable, OSError) as exc:  # OSError: cache folder not writable, disk full
            level = logging.WARNING if name == backend else logging.INFO
            log.log(level, "Encoder backend '%s' not used: %s.", name, exc)
            continue
        model.encoder_override = fn
        log.info("Image encoder backend: %s (%s, %d threads).", name, fn.precision, threads)
        if decoder and name in ("openvino", "onnxruntime"):
            enable_fast_decoder(model, name, cache_dir=cache, threads=threads)
        else:
            disable_fast_decoder(model)
        return name
    disable_fast_encoder(model)
    disable_fast_decoder(model)
    log.warning("No fast encoder backend could be used; keeping plain PyTorch.")
    return "plain"

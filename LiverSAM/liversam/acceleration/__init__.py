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
from .agreement import (
    AgreementResult,
    agreement_key,
    cached_agreement,
    cases_tag,
    check_agreement,
    load_check_set,
)
from .backends import (
    ENCODER_GRAPH_VERSION,
    STEM_SPLITS,
    TOLERANCE,
    BackendUnavailable,
    CacheSubfolder,
    EncoderCache,
    OnnxRuntimeEncoder,
    OpenVINOEncoder,
    OpenVINOStemFP32Encoder,
    TorchFusedEncoder,
    check_against_reference,
    clear_cache,
    default_cache_dir,
    encoder_cache,
    encoder_weights_sha256,
    fallback_cache_dir,
    fold_conv_batchnorm,
    prepare_export,
    reference_image,
    relative_error,
)
from .cpu import CPUFeatures, cpu_features
from .decoder import DECODER_GRAPH_VERSION, FastPromptDecoder, check_decoder, export_decoder_onnx
from .prefetch import BackgroundPrefetcher, neighbour_order

log = logging.getLogger(__name__)

#: Backend names accepted by :func:`enable_fast_encoder` (``auto`` picks; ``plain`` is unmodified PyTorch).
BACKENDS = ("auto", "openvino", "onnxruntime", "torch", "plain")
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
PRECISIONS = ("auto", "fp32", "bf16", "int8")

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
    "AgreementResult",
    "available_backends",
    "candidates",
    "int8_offered",
    "check_agreement",
    "current_precision",
    "describe_acceleration",
    "clear_cache",
    "cpu_features",
    "current_backend",
    "current_decoder_backend",
    "default_cache_dir",
    "encoder_cache",
    "fallback_cache_dir",
    "EncoderCache",
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
    """The precision to try first: ``fp32`` or ``bf16``.

    ``auto`` is bf16 on CPUs that multiply bf16 natively (AVX512-BF16, AMX, Arm BF16) and fp32 elsewhere;
    a bf16 candidate is still only used when its masks pass the agreement check (``agreement.py``), else
    the same backend in fp32 is used. ``bf16`` on a CPU without native bf16 would be emulated and ~30x
    slower: it falls back to fp32 with a warning.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"Unknown encoder precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return "fp32"
    features = features or cpu_features()
    if precision == "int8":  # int8 first (int8_offered), then what auto would try
        precision = "auto"
    if not features.native_bf16:
        if precision == "bf16":
            log.warning(
                "bf16 was requested but this CPU (%s) has no native bf16 (AVX512-BF16 / AMX): it would run "
                "about 30x slower than fp32. Using fp32.",
                features.summary(),
            )
        return "fp32"
    return "bf16"


def int8_offered(precision: str = "auto", features: CPUFeatures | None = None) -> bool:
    """int8 is tried (first) when asked for (``precision="int8"``), the CPU has int8 dot-product instructions
    (VNNI / AMX-INT8 / Arm dotprod) and ``nncf`` + ``openvino`` are installed.

    Not part of ``auto``: on the AVX-512 + bf16 + VNNI test machine every int8 variant failed the mask check
    by a wide margin (mean Dice 0.93-0.975 against the 0.99 needed, docs/PERFORMANCE.md) and was only
    1.1-1.2x faster than the accepted ``bf16-rest``, so trying it in ``auto`` would cost every new
    installation a quantisation (minutes) for a refusal."""
    from .int8 import nncf_available

    if precision != "int8":
        return False
    return bool((features or cpu_features()).int8_dot) and nncf_available()


def candidates(backend: str, precision: str, int8: bool = False) -> list[tuple[str, str]]:
    """(backend, precision) pairs to try, fastest first.

    Measured order on a 2-core AVX-512 + bf16 EPYC (encode + decode per slice, docs/PERFORMANCE.md):
    OpenVINO bf16 < ``bf16-block1`` (patch embedding + the first MBConv block fp32, the rest of the encoder and
    the decoder bf16; on an AMX Xeon, session 35) < ``bf16-rest`` (encoder stem fp32, rest and decoder bf16) <
    ``bf16-mid`` (encoder stem and neck fp32, stages 1-3 and decoder bf16; on AVX512-BF16 without AMX, session 41) <
    ``mixed`` (fp32 encoder, bf16 prompt decoder) < OpenVINO fp32 < ONNX Runtime
    fp32 < fused PyTorch fp32; with ``int8`` (:func:`int8_offered`, opt-in) the NNCF-quantised OpenVINO encoder
    is tried first. A bf16 candidate that fails falls back to the *same* backend first, never to
    a slower backend. ONNX Runtime and the fused PyTorch path run in fp32 only (no bf16 speed-up measured).
    """
    backends = [backend] + [b for b in AUTO_ORDER if b != backend] if backend != "auto" else list(AUTO_ORDER)
    order = []
    for name in backends:
        if int8 and name == "openvino":
            order.append((name, "int8"))
        if precision == "bf16" and name == "openvino":
            order += [(name, "bf16"), (name, "bf16-block1"), (name, "bf16-rest"), (name, "bf16-mid"), (name, "mixed")]
        order.append((name, "fp32"))
    return order


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


def current_precision(model) -> str:
    """Precision of the image encoder in use (``fp32`` for the plain path)."""
    return str(getattr(getattr(model, "encoder_override", None), "precision", "fp32"))


def describe_acceleration(model) -> str:
    """One line for logs and reports, e.g. ``encoder openvino bf16, decoder openvino bf16 (masks agree ...)``."""
    encoder = getattr(model, "encoder_override", None)
    decoder = getattr(model, "decoder_override", None)
    text = f"encoder {current_backend(model)} {current_precision(model)}, decoder {current_decoder_backend(model)}"
    text += f" {getattr(decoder, 'precision', 'fp32')}"
    agreement = getattr(encoder, "agreement", None)
    if agreement is not None:
        text += (
            f" (masks vs PyTorch fp32: mean Dice {agreement.mean_dice:.4f}, min {agreement.min_dice:.4f}, "
            f"{len(agreement.dice)} masks)"
        )
    return text


def enable_fast_decoder(
    model,
    backend: str = "auto",
    cache_dir: str | Path | EncoderCache | None = None,
    threads: int | None = None,
    precision: str = "fp32",
) -> str:
    """Run the prompt encoder + mask decoder as one exported graph (OpenVINO / ONNX Runtime).

    Exported once per decoder-weights SHA-256 into ``<cache_dir>/<sha>-decoder/``; checked against the
    PyTorch decoder on fixed prompts (box, box + points, points with multimask, box + mask) every time it
    is loaded (fp32: relative error <= 1e-3; bf16, OpenVINO only: a sanity bound, the masks are checked by
    :func:`enable_fast_encoder`). OpenVINO compiles the graph with static shapes for each prompt size.
    Returns the backend used, or ``plain`` (GPU models, no package, failed export or check).
    """
    if backend not in BACKENDS:
        raise ModelError(f"Unknown decoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    disable_fast_decoder(model)
    if backend in ("plain", "torch") or not hasattr(model, "decoder_override"):
        return "plain"
    if torch.device(model.device).type != "cpu":
        return "plain"
    threads = int(threads or torch.get_num_threads())
    cache = encoder_cache(cache_dir)
    parts = torch.nn.ModuleDict(
        {"prompt_encoder": model.network.prompt_encoder, "mask_decoder": model.network.mask_decoder}
    )
    names = [backend] if backend != "auto" else [b for b in AUTO_ORDER if b != "torch"]
    for name in names:
        try:
            if name not in available_backends():
                raise BackendUnavailable(f"the '{name}' package is not installed")
            relative = Path(f"{encoder_weights_sha256(parts)}-decoder") / f"decoder-g{DECODER_GRAPH_VERSION}.onnx"
            onnx_path = cache.find(relative)
            if onnx_path is None:
                onnx_path = cache.to_write(relative)
                onnx_path.parent.mkdir(parents=True, exist_ok=True)
                log.info("Exporting the prompt decoder to ONNX once (cached in %s) ...", onnx_path.parent)
                export_decoder_onnx(model.network, onnx_path)
            written = cache.folder if cache.problem is None else cache.fallback
            if onnx_path.parent.parent == written:  # never in a read-only shared cache
                _remove_stale_decoder_exports(onnx_path.parent, onnx_path)
            fast = FastPromptDecoder(onnx_path, name, threads, fallback=model.decode, precision=precision)
            entry = prepare_export(model.network.image_encoder, model.input_size, cache)
            error = check_decoder(fast, model, entry, TOLERANCE[fast.precision])
            fast.release_click_graph()  # compiled again at the first click; box-only runs never need it
        except (BackendUnavailable, OSError) as exc:
            log.info("Decoder backend '%s' not used: %s.", name, exc)
            continue
        model.decoder_override = fast
        log.info("Prompt decoder backend: %s %s (logits within %.1e of PyTorch).", name, fast.precision, error)
        return name
    return "plain"


def _remove_stale_decoder_exports(folder: Path, current: Path) -> None:
    """Delete earlier graph versions' decoder exports beside ``current`` (best effort: a file that cannot be
    removed is left, never an error)."""
    for stale in folder.glob("decoder*.onnx"):
        if stale != current:
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                log.debug("Could not remove the stale decoder export %s: %s", stale, exc)


def _build(backend: str, model, precision: str, threads: int, cache: EncoderCache, verify: bool):
    encoder = model.network.image_encoder
    if backend == "torch":
        return TorchFusedEncoder(encoder, bf16=precision == "bf16")
    if backend not in available_backends():
        raise BackendUnavailable(
            f"the '{backend}' package (or 'onnx', needed to export) is not installed; "
            "pip install 'liversam[fast]' to use it"
        )
    entry = prepare_export(encoder, model.input_size, cache)
    if backend == "openvino" and precision == "int8":
        from .int8 import OpenVINOInt8Encoder

        fn = OpenVINOInt8Encoder(entry, threads, model)
    elif backend == "openvino" and precision in STEM_SPLITS:
        fn = OpenVINOStemFP32Encoder(entry, threads, precision)
    elif backend == "openvino":
        fn = OpenVINOEncoder(entry, threads, precision)
    elif backend == "onnxruntime":
        fn = OnnxRuntimeEncoder(entry, threads)  # always fp32 (its CPU provider has no bf16 kernels here)
    else:
        raise ModelError(f"Unknown encoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    if verify:
        error = check_against_reference(fn, entry, fn.precision, backend)
        log.info("%s encoder (%s) within %.1e of PyTorch fp32 (relative L2).", backend, fn.precision, error)
    return fn


def _verdict_label(encoder_backend: str, decoder_backend: str) -> str:
    """The backends in a verdict's key; an exported encoder or decoder with its graph's version (a new graph is
    checked again)."""
    if encoder_backend in ("openvino", "onnxruntime"):
        encoder_backend += f"-e{ENCODER_GRAPH_VERSION}"
    if decoder_backend != "plain":
        decoder_backend += f"-g{DECODER_GRAPH_VERSION}"
    return f"{encoder_backend}+{decoder_backend}"


def _verdict_folders(cache: EncoderCache) -> CacheSubfolder:
    """The mask-check verdict folders: read in order; written where the cache writes (the fallback is made only
    when a verdict or the reference masks are stored)."""
    return cache.subfolder("agreement")


def _note_fallback_verdict(cache: EncoderCache, key: str) -> None:
    """A verdict not in the cache folder was read from or stored in the fallback: the run depends on it."""
    if cache.fallback is not None and cached_agreement(cache.folder / "agreement", key) is None:
        cache.fallback_used = True


def _cached_refusal(model, name: str, precision: str, decoder: bool, cache: EncoderCache, check_set) -> str:
    """The reason of a cached refusal of this candidate (same weights, runtime, check set), else ''."""
    check_set = check_set if check_set is not None else load_check_set()
    if check_set is None:
        return ""
    decoder_name = name if decoder and name in ("openvino", "onnxruntime") else "plain"
    key = agreement_key(
        encoder_weights_sha256(model.network), _verdict_label(name, decoder_name), precision, cases_tag(check_set[1])
    )
    verdict = cached_agreement(_verdict_folders(cache), key)
    if verdict is None or verdict.accepted:
        return ""
    _note_fallback_verdict(cache, key)
    return verdict.reason


def _try_candidate(
    model, name: str, precision: str, threads: int, cache: EncoderCache, verify: bool, decoder: bool, check_set
):
    """Install one candidate on ``model`` and check its masks; raises BackendUnavailable when refused.

    ``precision``: ``fp32``, ``bf16`` (encoder and decoder), ``bf16-block1`` / ``bf16-rest`` (the encoder's
    patch embedding and first block / its whole stem fp32, the rest of
    the encoder and the decoder bf16), ``bf16-mid`` (the stem and the neck fp32, stages 1-3 and the decoder bf16)
    or ``mixed`` (fp32 encoder, bf16 decoder)."""
    encoder_precision = "fp32" if precision == "mixed" else precision
    decoder_precision = "fp32" if precision == "fp32" else "bf16"
    verdict_precision = precision  # the key of the cached verdict
    if precision == "int8":  # bf16 decoder only where bf16 is native; the verdict names the calibration set
        from .int8 import calibration_tag

        decoder_precision = "bf16" if cpu_features().native_bf16 else "fp32"
        verdict_precision = f"int8-{calibration_tag()}"
    if verify:  # a refusal on record: skip the candidate without compiling (or quantising) it
        refused = _cached_refusal(model, name, verdict_precision, decoder, cache, check_set)
        if refused:
            raise BackendUnavailable(f"{refused} (cached verdict)")
    fn = _build(name, model, encoder_precision, threads, cache, verify)
    model.encoder_override = fn
    if decoder and name in ("openvino", "onnxruntime"):
        enable_fast_decoder(model, name, cache_dir=cache, threads=threads, precision=decoder_precision)
        if decoder_precision != "fp32" and getattr(model.decoder_override, "precision", "fp32") == "fp32":
            raise BackendUnavailable(f"no {decoder_precision} prompt decoder")  # the fp32 candidate follows
    else:
        disable_fast_decoder(model)
    if not verify:
        return fn
    sha = encoder_weights_sha256(model.network)
    label = _verdict_label(name, current_decoder_backend(model))
    try:
        result = check_agreement(model, label, verdict_precision, sha, _verdict_folders(cache), check_set=check_set)
    except FileNotFoundError as exc:
        if precision != "fp32":  # no real slices to check a lower precision on: refuse it
            raise BackendUnavailable(f"{precision} cannot be checked here ({exc})") from exc
        log.info("Mask agreement check skipped (%s); the fp32 embedding check passed.", exc)
        return fn
    _note_fallback_verdict(cache, result.key)
    if not result.accepted:
        raise BackendUnavailable(result.reason)
    fn.agreement = result
    return fn


def enable_fast_encoder(
    model,
    backend: str = "auto",
    cache_dir: str | Path | EncoderCache | None = None,
    precision: str = "auto",
    threads: int | None = None,
    verify: bool = True,
    decoder: bool = True,
    check_set=None,
) -> str:
    """Make ``model.encode`` (and ``model.decode``) use a faster implementation; returns the encoder backend.

    ``model``: a :class:`liversam.models.LoadedModel`. ``backend``: one of :data:`BACKENDS`. Candidates
    (backend, precision) are tried fastest first (:func:`candidates`); a named backend that cannot run
    here falls back to ``auto``'s remaining choices and finally ``plain`` (logged, never an error).
    ``cache_dir``: where exported graphs and check verdicts are kept (default :func:`default_cache_dir`,
    never the install folder; when it cannot be written, new ones go to :func:`fallback_cache_dir` and what it
    holds is still used, with one warning naming both folders). ``precision``: ``auto`` | ``fp32`` | ``bf16`` (see
    :func:`resolve_precision`). ``threads``: CPU threads for the backend (default: torch's setting).
    ``verify``: check each candidate before using it: its embedding of a synthetic image on every load,
    and its *masks* on real CT slices against fp32 PyTorch once per weights / backend / precision /
    runtime version (:mod:`liversam.acceleration.agreement`, verdict cached). ``decoder``: when an
    exported backend is chosen, run the prompt decoder through it too (same precision).
    ``check_set``: (volume, cases) for the mask check (default: the lits117 example).

    Models on a GPU are left on the plain PyTorch path (returns ``plain``).
    """
    if backend not in BACKENDS:
        raise ModelError(f"Unknown encoder backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    first_precision = resolve_precision(precision)
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
    cache = encoder_cache(cache_dir)
    denied: OSError | None = None  # a candidate lost because the cache folder cannot be written
    for name, candidate_precision in candidates(backend, first_precision, int8_offered(precision)):
        try:
            _try_candidate(model, name, candidate_precision, threads, cache, verify, decoder, check_set)
        except (BackendUnavailable, OSError) as exc:  # OSError: cache folder not writable, disk full
            level = logging.WARNING if name == backend else logging.INFO
            log.log(level, "Encoder backend '%s' (%s) not used: %s.", name, candidate_precision, exc)
            denied = denied or _write_denied(exc)
            disable_fast_encoder(model)
            disable_fast_decoder(model)
            continue
        log.info("Accelerated (%d threads): %s.", threads, describe_acceleration(model))
        if cache.fallback_used:
            log.warning("%s", _fallback_cache_message(cache))
        elif denied is not None:
            used = describe_acceleration(model).split(" (")[0]  # "encoder torch fp32, decoder plain fp32"
            log.warning("%s", _unwritable_cache_message(cache, denied, used))
        return name
    disable_fast_encoder(model)
    disable_fast_decoder(model)
    if cache.fallback_used:
        log.warning("%s", _fallback_cache_message(cache))
    if denied is not None and not cache.fallback_used:
        log.warning("%s", _unwritable_cache_message(cache, denied, "plain PyTorch"))
    else:
        log.warning("No fast encoder backend could be used; keeping plain PyTorch.")
    return "plain"


def _write_denied(exc: BaseException) -> OSError | None:
    """The permission error (no write permission, read-only file system) behind ``exc``, if one is."""
    import errno

    seen: BaseException | None = exc
    for _ in range(8):  # a short chain: the error, what it was raised from
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unwritable_cache_message(cache: EncoderCache, denied: OSError, used: str) -> str:
    """What a user reads when the encoder cache folder cannot be written and there is no fallback: which folder, why
    the fallback cannot be used, what it costs, what to do."""
    folder = cache.folder
    cause = f"{denied.strerror or denied}: '{denied.filename}'" if denied.filename else str(denied.strerror or denied)
    fallback = (f", nor can its fallback '{fallback_cache_dir()}' be used ({cache.fallback_problem})"
                if cache.fallback_problem else "")  # fmt: skip
    return (
        f"The encoder cache folder '{folder}' cannot be written ({cause}){fallback}. The fast encoders (OpenVINO / "
        f"ONNX Runtime) are exported and checked there once, so this run uses {used} instead, and is slower. Set "
        "LIVERSAM_CACHE_DIR to a folder you can write to (the encoders go into its 'encoders' subfolder), or make "
        f"'{folder}' writable."
    )


def _fallback_cache_message(cache: EncoderCache) -> str:
    """What a user reads when this run stored (or found) exports or verdicts in the fallback folder."""
    return (
        f"The encoder cache folder '{cache.folder}' cannot be written ({cache.problem}); the encoder exports and "
        f"check verdicts this run needed and did not find there are kept in '{cache.fallback}' instead. That "
        "folder is in the system temporary folder, which may be emptied (at a restart): the next run would export "
        "and check them again (about a minute). Set LIVERSAM_CACHE_DIR to a folder you can write to (the encoders "
        f"go into its 'encoders' subfolder), or make '{cache.folder}' writable, to keep them."
    )

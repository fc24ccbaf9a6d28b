"""Faster implementations of a SAM image encoder on the CPU, each taking and returning the same tensors.

- ``TorchFusedEncoder``: PyTorch with every Conv+BatchNorm pair folded into one convolution and
  channels-last memory layout (needs nothing beyond torch; bf16 autocast only on CPUs with native bf16).
- ``OpenVINOEncoder`` / ``OnnxRuntimeEncoder``: the encoder exported once to ONNX and run by OpenVINO or
  ONNX Runtime (optional packages: ``pip install liversam[fast]``).

Exported graphs live in a per-user cache folder keyed by the SHA-256 of the encoder weights (never in the
install folder); when that folder cannot be written, new files go to a per-user fallback in the system temporary
folder (made only when something is stored there) and what the folder already holds is still used
(:class:`EncoderCache`). Each export stores the plain-PyTorch embedding of a fixed synthetic test image; every time
a backend is loaded its output on that image is compared with it, so a broken export can never be used.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..atomic_write import atomic_path, write_text_atomically
from ..models.token_major_encoder import use_token_major_layout
from ..output_paths import folder_write_problem

log = logging.getLogger(__name__)

#: Version of the exported encoder graph, part of the cache entry's format and of the mask-agreement verdict's key
#: (a changed graph is exported and checked again). Version 2: TinyViT's token <-> image changes stated as
#: channels-last views (:mod:`liversam.models.token_major_encoder`).
ENCODER_GRAPH_VERSION = 2

#: Format of a cache entry; changes when the files written by :func:`prepare_export` change meaning.
EXPORT_FORMAT = f"liversam-encoder-export/{ENCODER_GRAPH_VERSION}"

class EncoderSplit(NamedTuple):
    """Where a split precision cuts the exported encoder: its fp32 stem (the nodes named with ``stem_prefixes``,
    saved as ``stem``), the bf16 part after it (``rest``) and, when ``tail_prefixes`` is given, an fp32 tail (the
    nodes named so, saved as ``tail``) that the bf16 part feeds. Each cut is one tensor."""

    stem_prefixes: tuple[str, ...]
    stem: str
    rest: str
    tail_prefixes: tuple[str, ...] = ()
    tail: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        return (self.stem, self.rest, self.tail) if self.tail else (self.stem, self.rest)


#: The encoder's fp32 parts for each split precision (:class:`EncoderSplit`). ``bf16-rest``: patch embedding + all
#: of stage 0 in fp32. ``bf16-block1``: patch embedding + stage 0's first MBConv block in fp32, its second block and
#: the downsampling on in bf16 (about 12 ms a slice faster on an AMX Xeon; on lits117 min Dice 0.981 there and 0.977
#: with AVX512-BF16 alone, docs/PERFORMANCE.md, session 35). ``bf16-mid``: ``bf16-rest``'s stem and the neck (the
#: convolutions and layer norms that make the 256-channel embedding) in fp32, stages 1-3 in bf16: with AVX512-BF16
#: alone (AMD EPYC Zen 4 and Zen 5) min Dice 0.9811 where ``bf16-rest`` gave 0.9791, in about 0.65x the fp32 encoder's
#: time (0.38 against 0.59 s a slice on a Zen 4; docs/PERFORMANCE.md, session 41).
STEM_SPLITS = {
    "bf16-block1": EncoderSplit(("/patch_embed/", "/layers.0/blocks.0/"), "encoder_stem_block0.onnx",
                                "encoder_rest_block1.onnx"),
    "bf16-rest": EncoderSplit(("/patch_embed/", "/layers.0/"), "encoder_stem.onnx", "encoder_rest.onnx"),
    "bf16-mid": EncoderSplit(("/patch_embed/", "/layers.0/"), "encoder_stem.onnx", "encoder_mid.onnx",
                             ("/neck/",), "encoder_neck.onnx"),
}

#: Files made from ``encoder.onnx`` (the parts of each split precision, the int8 model): removed when it is
#: exported again, so none of them outlives the graph it was cut or quantised from.
DERIVED_EXPORT_FILES = (*dict.fromkeys(name for split in STEM_SPLITS.values() for name in split.files),
                        "encoder_int8-*.xml", "encoder_int8-*.bin")

#: Largest relative L2 error of a backend's embedding on the synthetic reference image against plain fp32
#: PyTorch, checked every time a backend is loaded, by precision. fp32 backends differ only by summation
#: order (measured ~4e-6). For bf16 (measured 9.4e-2: every product input is rounded) this is only a sanity
#: bound against a broken runtime; what decides is the mask agreement check (``agreement.py``).
#: int8 (calibrated on CT, measured 0.2-0.8 on this synthetic image) only gets a bound against garbage output.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "bf16-block1": 0.25, "bf16-rest": 0.25, "bf16-mid": 0.25, "int8": 0.9}

EncoderFn = Callable[[torch.Tensor], torch.Tensor]


class BackendUnavailable(Exception):
    """A backend cannot be used here (package missing, export failed, output check failed)."""


def default_cache_dir() -> Path:
    """Per-user folder for exported encoders.

    ``$LIVERSAM_CACHE_DIR`` if set; else ``%LOCALAPPDATA%\\liversam\\cache`` (Windows),
    ``~/Library/Caches/liversam`` (macOS) or ``$XDG_CACHE_HOME/liversam`` (default ``~/.cache/liversam``).
    The ``encoders`` subfolder holds one folder per encoder weights hash.
    """
    if os.environ.get("LIVERSAM_CACHE_DIR"):
        return Path(os.environ["LIVERSAM_CACHE_DIR"]) / "encoders"
    system = platform.system()
    if system == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "liversam" / "cache"
    elif system == "Darwin":
        base = Path.home() / "Library" / "Caches" / "liversam"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "liversam"
    return base / "encoders"


def fallback_cache_dir() -> Path:
    """Where exports and verdicts go when the cache folder cannot be written: ``liversam-cache-<uid>/encoders`` in
    the system temporary folder (``tempfile.gettempdir()``: ``$TMPDIR``, else ``/tmp``), one per user."""
    user = str(os.geteuid()) if hasattr(os, "geteuid") else _safe_name(os.environ.get("USERNAME", "user"))
    return Path(tempfile.gettempdir()) / f"liversam-cache-{user}" / "encoders"


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "user"


def prepare_fallback_cache_dir() -> tuple[Path | None, str | None]:
    """:func:`fallback_cache_dir`, its user folder made with mode 0700 when missing; ``(None, why)`` when it cannot be
    used: not a folder (a symbolic link, a file), another user's, writable by other users (group / others 'w': they
    could put an export there), or not writable."""
    path = fallback_cache_dir()
    base = path.parent
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return None, f"'{base}' cannot be created ({exc.strerror or exc})"
    try:
        st = os.lstat(base)
    except OSError as exc:
        return None, f"'{base}' cannot be read ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return None, f"'{base}' is not a folder ({'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'a file'})"
    if hasattr(os, "geteuid"):
        if st.st_uid != os.geteuid():
            return None, f"'{base}' belongs to another user (uid {st.st_uid})"
        if st.st_mode & 0o022:
            return None, f"'{base}' can be written by other users (mode {stat.filemode(st.st_mode)}; it must be 0700)"
    problem = folder_write_problem(path)
    return (path, None) if problem is None else (None, problem)


@dataclass
class EncoderCache:
    """Where exported encoders, decoder graphs and check verdicts are looked for, and where new ones are stored.

    ``folder``: the cache folder (:func:`default_cache_dir`, or the ``cache_dir`` given). When it cannot be written
    (``problem`` says why), new files go to the fallback (:func:`fallback_cache_dir`) and what ``folder`` holds is
    still read first: a shared, pre-filled read-only cache is used as it is, nothing is exported again.
    The fallback is opened lazily (:meth:`open_fallback`): read when it exists already, made only when something must
    be written, so a complete read-only cache leaves nothing in the temporary folder. ``fallback``: the fallback once
    opened (found or made, and checked by :func:`prepare_fallback_cache_dir`), else None. ``fallback_problem``: why
    there is no fallback either, once that is known (then only what ``folder`` holds can be used).
    ``fallback_used``: a file was read from or stored in the fallback (the run depends on it: it is warned about)."""

    folder: Path
    problem: str | None = None
    fallback: Path | None = None
    fallback_problem: str | None = None
    fallback_used: bool = False

    def open_fallback(self, create: bool) -> Path | None:
        """The fallback, checked, when ``folder`` cannot be written and the fallback is not refused; ``create``: its
        user folder is made (mode 0700) when missing, else None while it does not exist (nothing is made). A refusal
        (another user's, a link, writable by others, not writable) is kept in ``fallback_problem``."""
        if self.problem is None or self.fallback_problem is not None:
            return None
        if self.fallback is None:
            if not create and not os.path.lexists(fallback_cache_dir().parent):
                return None
            self.fallback, self.fallback_problem = prepare_fallback_cache_dir()
        return self.fallback

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders read, in order (the fallback only when it exists already; it is not made)."""
        fallback = self.open_fallback(create=False)
        return (self.folder,) if fallback is None else (self.folder, fallback)

    def write_folder(self) -> Path:
        """Where new files go: ``folder``, or when it cannot be written the fallback, made now when missing (the
        cache folder again when the fallback is refused: writing there then fails, as it would without one)."""
        return self.open_fallback(create=True) or self.folder

    def find(self, relative: str | Path, valid: Callable[[Path], bool] = os.path.isfile) -> Path | None:
        """The first ``<folder>/relative`` for which ``valid`` holds, the cache folder first."""
        for root in self.folders:
            if valid(root / relative):
                self.fallback_used = self.fallback_used or root == self.fallback
                return root / relative
        return None

    def to_write(self, relative: str | Path) -> Path:
        """Where a new ``relative`` is stored (the fallback is made when it is the place)."""
        root = self.write_folder()
        self.fallback_used = self.fallback_used or (self.fallback is not None and root == self.fallback)
        return root / relative

    def subfolder(self, name: str) -> CacheSubfolder:
        """``name`` in each of the folders: read in order, written where this cache writes (made only then)."""
        return CacheSubfolder(self, name)


@dataclass(frozen=True, eq=False)
class CacheSubfolder:
    """A subfolder (``agreement``) of an :class:`EncoderCache`'s folders: :meth:`read_folders` never makes the
    fallback, :meth:`write_folder` does when it is where new files go. Does not count as using the fallback."""

    cache: EncoderCache
    name: str

    def read_folders(self) -> tuple[Path, ...]:
        return tuple(root / self.name for root in self.cache.folders)

    def write_folder(self) -> Path:
        return self.cache.write_folder() / self.name


def encoder_cache(cache_dir: str | Path | EncoderCache | None = None) -> EncoderCache:
    """The :class:`EncoderCache` of ``cache_dir`` (default :func:`default_cache_dir`). Nothing is made here: the
    fallback is only looked at when the folder cannot be written, and then only when something is read or stored."""
    if isinstance(cache_dir, EncoderCache):
        return cache_dir
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    problem = folder_write_problem(folder)
    if problem is None:
        return EncoderCache(folder)
    if fallback_cache_dir().resolve() == folder.resolve():
        return EncoderCache(folder, problem, fallback_problem="it is the fallback itself")
    return EncoderCache(folder, problem)


def encoder_weights_sha256(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's parameter/buffer names, shapes, dtypes and bytes.

    Keyed on the weights actually loaded (not the file they came from), so a fine-tuned checkpoint that
    changed the encoder gets its own export, and one that kept it shares the export.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def reference_image(input_size: int) -> torch.Tensor:
    """A fixed CT-like test input (1, 3, S, S) in [0, 1]: smooth background, an ellipse 'organ', two 'lesions'.

    Deterministic (no random generator), so the stored reference embedding stays valid across runs.
    """
    s = input_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    img = 0.25 + 0.15 * np.sin(6.0 * xx) * np.cos(4.0 * yy)
    organ = ((xx - 0.45) / 0.3) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1.0
    img[organ] = 0.6 + 0.05 * np.cos(20.0 * xx[organ])
    for cx, cy, r in ((0.4, 0.45, 0.05), (0.55, 0.55, 0.03)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 0.35
    img = np.clip(img, 0.0, 1.0)
    return torch.from_numpy(np.repeat(img[None, None], 3, axis=1).copy())


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference||_2 / ||reference||_2 (both float tensors of one shape)."""
    ref = reference.float()
    return float(
        torch.linalg.vector_norm(candidate.float() - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)
    )


# --- PyTorch: Conv+BN folding, channels-last --------------------------------------------------------------


def fold_conv_batchnorm(module: nn.Module) -> int:
    """Replace every ``Sequential(c=Conv2d, bn=BatchNorm2d)`` with one equivalent Conv2d, in place (eval only).

    Returns the number of pairs folded. The folded conv computes ``bn(conv(x))`` exactly up to float
    rounding (weights scaled by gamma / sqrt(var + eps), bias beta - mean * gamma / sqrt(var + eps)).
    """
    folded = 0
    for name, child in list(module.named_children()):
        conv = getattr(child, "c", None)
        bn = getattr(child, "bn", None)
        if (
            isinstance(child, nn.Sequential)
            and len(child) == 2
            and isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats
        ):
            setattr(module, name, _folded_conv(conv, bn))
            folded += 1
        else:
            folded += fold_conv_batchnorm(child)
    return folded


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((conv_bias - bn.running_mean) * scale + bn.bias)
    fused.requires_grad_(False)
    return fused


class TorchFusedEncoder:
    """The PyTorch encoder with Conv+BN folded and channels-last layout (a private copy; the model's own
    encoder is untouched). ``bf16=True`` runs under CPU bf16 autocast (only sensible with native bf16)."""

    name = "torch"

    def __init__(self, encoder: nn.Module, bf16: bool = False) -> None:
        module = copy.deepcopy(encoder).to("cpu").eval()
        self.folded_pairs = fold_conv_batchnorm(module)
        self.module = module.to(memory_format=torch.channels_last)
        self.module.requires_grad_(False)
        self.bf16 = bf16
        self.precision = "bf16" if bf16 else "fp32"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to("cpu", torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(x)
        return out.float().contiguous()


# --- ONNX export (shared by OpenVINO and ONNX Runtime) -----------------------------------------------------


@dataclass(frozen=True)
class ExportEntry:
    """One cache entry: the exported graph and the reference embedding of :func:`reference_image`.

    ``cache``: the :class:`EncoderCache` the entry was found in. For an entry in a cache folder that cannot be
    written, the files made from the export (:meth:`derived`, OpenVINO's model cache) go to the same-named folder of
    its fallback (:meth:`scratch`); None, or a writable folder: they go beside the export."""

    folder: Path
    onnx_path: Path
    reference_path: Path
    input_size: int
    cache: EncoderCache | None = field(default=None, compare=False, repr=False)

    def reference_embedding(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.reference_path))

    def scratch(self, create: bool) -> Path | None:
        """The same-named folder in the fallback, for an export in a cache folder that cannot be written (not made
        here); None for one in a writable folder or the fallback, when the fallback is refused, or, unless
        ``create`` (then the fallback's user folder is made when missing), when the fallback does not exist."""
        cache = self.cache
        if cache is None or cache.problem is None or self.folder.parent != cache.folder:
            return None
        fallback = cache.open_fallback(create)
        return None if fallback is None else fallback / self.folder.name

    def derived(self, *names: str) -> tuple[Path, ...]:
        """The paths of files made from the export (a split's two parts, the int8 model's two files): beside it
        when all are there or its folder is writable, else in :meth:`scratch` (made when missing)."""
        here = tuple(self.folder / name for name in names)
        if all(path.is_file() for path in here) or (scratch := self.scratch(create=True)) is None:
            return here
        scratch.mkdir(parents=True, exist_ok=True)
        if self.cache is not None:
            self.cache.fallback_used = True  # the run needs files kept in the fallback: it is warned about
        return tuple(scratch / name for name in names)

    def openvino_cache_dir(self) -> Path | None:
        """OpenVINO's model cache for this export: ``openvino_cache`` beside it (read-only is fine for OpenVINO when
        the folder exists), else in :meth:`scratch`; None when neither can be made (then graphs are compiled
        uncached: OpenVINO refuses to compile when it cannot create its cache folder)."""
        for folder in (self.folder, self.scratch(create=False)):
            if folder is not None and (folder / "openvino_cache").is_dir():
                return folder / "openvino_cache"
        target = (self.scratch(create=True) or self.folder) / "openvino_cache"
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.info("OpenVINO compiles without its model cache ('%s' cannot be made: %s)", target, exc)
            return None
        return target


def export_onnx(encoder: nn.Module, path: Path, input_size: int) -> None:
    """Export ``encoder`` (batch 1, 3 x S x S, fp32) to one self-contained ONNX file at ``path``.

    Uses the TorchScript exporter (fast, one file); falls back to the torch.export-based exporter.
    A TinyViT's blocks are exported with channels-last layout changes (same function, fewer transposes:
    :func:`~liversam.models.token_major_encoder.use_token_major_layout`).
    Raises :class:`BackendUnavailable` when both fail.
    """
    module = copy.deepcopy(encoder).to("cpu").eval()
    use_token_major_layout(module)
    example = reference_image(input_size)
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                kwargs: dict = {"dynamo": dynamo, "input_names": ["images"], "output_names": ["embeddings"]}
                if dynamo:
                    kwargs["external_data"] = False
                else:
                    kwargs["opset_version"] = 17
                with atomic_path(path) as tmp:
                    torch.onnx.export(module, (example,), str(tmp), **kwargs)
            return
        except Exception as exc:  # exporters raise many types; try the next, report all
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
    raise BackendUnavailable("ONNX export failed (" + "; ".join(e.splitlines()[0] for e in errors) + ")")


def _valid_export(folder: Path) -> bool:
    """``folder`` holds a complete export of this format."""
    info_path = folder / "export.json"
    if not ((folder / "encoder.onnx").is_file() and (folder / "reference.npy").is_file() and info_path.is_file()):
        return False
    try:
        return json.loads(info_path.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, json.JSONDecodeError):
        return False  # unreadable entry: export again over it


def prepare_export(
    encoder: nn.Module, input_size: int, cache_dir: str | Path | EncoderCache | None = None
) -> ExportEntry:
    """The cache entry for this encoder's weights, exporting it first if needed (~15-60 s once).

    Folder: ``<cache_dir>/<sha256 of the weights>-<S>px/`` with ``encoder.onnx``, ``reference.npy``
    (plain fp32 PyTorch embedding of :func:`reference_image`) and ``export.json``. A cache folder that cannot be
    written is read first and the export made in its fallback (:class:`EncoderCache`).
    """
    cache = encoder_cache(cache_dir)
    sha = encoder_weights_sha256(encoder)
    name = f"{sha}-{input_size}px"
    found = cache.find(name, _valid_export)
    if found is not None:
        return ExportEntry(found, found / "encoder.onnx", found / "reference.npy", input_size, cache)
    folder = cache.to_write(name)
    entry = ExportEntry(folder, folder / "encoder.onnx", folder / "reference.npy", input_size)
    info_path = folder / "export.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendUnavailable(f"cannot create the encoder cache folder '{folder}': {exc}") from exc
    log.info("Exporting the image encoder to ONNX once (cached in %s) ...", folder)
    for pattern in DERIVED_EXPORT_FILES:  # best effort: a file left over is only ever read with its own graph's key
        for stale in folder.glob(pattern):
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("Could not remove the stale export %s: %s", stale, exc)
    shutil.rmtree(folder / "openvino_cache", ignore_errors=True)  # compiled blobs of the old graph
    start = time.perf_counter()
    module = copy.deepcopy(encoder).to("cpu").eval()
    with torch.inference_mode():
        reference = module(reference_image(input_size)).float().numpy()
    with atomic_path(entry.reference_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, reference)
    export_onnx(module, entry.onnx_path, input_size)
    info = {
        "format": EXPORT_FORMAT,
        "weights_sha256": sha,
        "input_size": input_size,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "export_seconds": round(time.perf_counter() - start, 1),
    }
    write_text_atomically(info_path, json.dumps(info, indent=2))
    log.info("Encoder exported in %.1f s.", time.perf_counter() - start)
    return entry


def clear_cache(cache_dir: str | Path | None = None) -> dict[Path, list[Path]]:
    """Delete every exported encoder (a folder holding its ``export.json``) in the cache folder ``cache_dir`` (default
    :func:`default_cache_dir`) and in this user's fallback (:func:`fallback_cache_dir`, where exports go when a cache
    folder cannot be written). The fallback is cleared only when it exists and passes the checks of
    :func:`prepare_fallback_cache_dir` (this user's, not a link, not writable by others; it is never made here).

    The fallback is cleared with the default cache folder, or with a ``cache_dir`` that cannot be written (whose new
    files went there); never with another, writable folder, whose users do not use it.

    Returns, for each folder cleared, the entries removed (a folder that does not exist is left out). An entry that
    could not be removed, and a fallback that is refused, are logged as warnings, never raised."""
    folders = [Path(cache_dir) if cache_dir is not None else default_cache_dir()]
    try:
        fallback_base = fallback_cache_dir().parent
    except OSError:  # no usable temporary folder (tempfile.gettempdir() raises): there is no fallback either
        fallback_base = None
    served = cache_dir is None or folder_write_problem(folders[0]) is not None
    if served and fallback_base is not None and os.path.lexists(fallback_base):
        fallback, problem = prepare_fallback_cache_dir()
        if fallback is None:
            log.warning("The encoder cache's fallback is not cleared: %s.", problem)
        elif fallback.resolve() != folders[0].resolve():
            folders.append(fallback)
    report: dict[Path, list[Path]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        removed = report.setdefault(folder, [])
        for child in sorted(folder.iterdir()):
            if child.is_dir() and (child / "export.json").exists():
                shutil.rmtree(child, ignore_errors=True)  # a link is refused by rmtree, never followed
                if os.path.lexists(child):
                    log.warning("Could not remove the exported encoder '%s'.", child)
                else:
                    removed.append(child)
        log.info("Removed %d exported encoder(s) from '%s'.", len(removed), folder)
    return report


# --- runtimes ------------------------------------------------------------------------------------------------


class _PerImageRunner:
    """Runs a batch-1 graph image by image; serialised by a lock (one infer request, many threads)."""

    name = "?"
    precision = "fp32"

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size
        self._lock = threading.Lock()

    def _run_one(self, image: np.ndarray) -> np.ndarray:  # (1, 3, S, S) float32 -> (1, 256, 64, 64)
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} encoder expects (N, 3, {self.input_size}, {self.input_size}) inputs, "
                f"got {tuple(images.shape)}"
            )
        batch = images.detach().to("cpu", torch.float32).numpy()
        outs = []
        with self._lock:
            for n in range(batch.shape[0]):
                outs.append(np.array(self._run_one(np.ascontiguousarray(batch[n : n + 1])), copy=True))
        return torch.from_numpy(np.concatenate(outs, axis=0))


@functools.cache
def openvino_core():
    """The process's one ``openvino.Core``, never released. OpenVINO's CPU plugin gives the thread that loads it a
    signal stack of its own (``sigaltstack``) and unmaps it when the plugin goes with the last Core; the thread keeps
    pointing at it, and the next signal handled on it (Python's SIGINT handler runs there: Ctrl-C) ends the process
    with a segmentation fault. ``liversam train`` releases its encoder after building the caches, so Ctrl-C during
    training crashed (session 37). Kept, the plugin and its stack stay; it also loads once instead of per graph."""
    import openvino as ov

    return ov.Core()


def openvino_cpu_config(threads: int, hint: str, entry: ExportEntry) -> dict:
    """OpenVINO CPU settings for one exported graph: ``threads`` threads, one low-latency stream, inference
    precision ``hint`` ("f32" or "bf16").

    Only f32 graphs use OpenVINO's model cache (``CACHE_DIR``): with OpenVINO 2026.4.1 on an AMX CPU (Intel Xeon,
    ``amx_bf16``), a bf16 graph compiled into the cache in a process that had already compiled an f32 graph
    crashed (segmentation fault) at its first inference; that is what the bf16 candidates after an fp32 load,
    and ``bf16-rest``'s fp32 stem then bf16 rest, do. Without the cache the same sequence runs, and a bf16 compile
    of the encoder takes 0.66 s instead of 0.45 s from the cache."""
    config = {
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": hint,
    }
    if hint == "f32" and (cache_dir := entry.openvino_cache_dir()) is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


class OpenVINOEncoder(_PerImageRunner):
    """The exported encoder compiled by OpenVINO for the CPU (``precision``: ``fp32`` or ``bf16``)."""

    name = "openvino"

    def __init__(self, entry: ExportEntry, threads: int, precision: str = "fp32") -> None:
        super().__init__(entry.input_size)
        try:
            import openvino  # noqa: F401 - present, or the backend is unavailable
        except ImportError as exc:
            raise BackendUnavailable("the 'openvino' package is not installed") from exc
        self.precision = precision
        # Explicit precision: on AMX / AVX512-BF16 CPUs OpenVINO would otherwise silently pick bf16.
        config = openvino_cpu_config(threads, "bf16" if precision == "bf16" else "f32", entry)
        try:
            core = openvino_core()
            self._compiled = core.compile_model(core.read_model(str(entry.onnx_path)), "CPU", config)
            self._request = self._compiled.create_infer_request()
        except Exception as exc:
            raise BackendUnavailable(f"OpenVINO could not compile '{entry.onnx_path}': {exc}") from exc

    def _run_one(self, image: np.ndarray) -> np.ndarray:
        self._request.infer({0: image})
        return self._request.get_output_tensor(0).data


def stem_cut_tensor(onnx_path: Path, stem_prefixes: tuple[str, ...] = STEM_SPLITS["bf16-rest"].stem_prefixes) -> str:
    """Name of the one tensor that carries the encoder's stem (the nodes named with ``stem_prefixes``: by default
    TinyViT's patch embedding + first stage) into the rest of the graph; raises :class:`BackendUnavailable` when
    the graph has no such single cut."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node.name for node in graph.node for out in node.output}

    def in_stem(name: str) -> bool:
        return name.startswith(stem_prefixes)

    crossing = {
        tensor
        for node in graph.node
        if not in_stem(node.name)
        for tensor in node.input
        if tensor in producer and in_stem(producer[tensor])
    }
    if len(crossing) != 1:
        raise BackendUnavailable(f"no single stem output in '{onnx_path.name}' (found {len(crossing)})")
    return crossing.pop()


def tail_cut_tensor(onnx_path: Path, tail_prefixes: tuple[str, ...]) -> str:
    """Name of the one tensor that carries the rest of the encoder into its tail (the nodes named with
    ``tail_prefixes``, e.g. the neck; constants aside); raises :class:`BackendUnavailable` when there is no such cut."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}

    def in_tail(name: str) -> bool:
        return name.startswith(tail_prefixes)

    crossing = {
        tensor
        for node in graph.node
        if in_tail(node.name)
        for tensor in node.input
        if tensor in producer and producer[tensor].op_type != "Constant" and not in_tail(producer[tensor].name)
    }
    if len(crossing) != 1:
        raise BackendUnavailable(f"no single tail input in '{onnx_path.name}' (found {len(crossing)})")
    return crossing.pop()


class OpenVINOStemFP32Encoder(_PerImageRunner):
    """OpenVINO with the stem (and a split's tail) in fp32 and the rest in bf16; ``precision`` names the cut
    (:data:`STEM_SPLITS`).

    The encoder graph is cut once into the parts' files (kept beside the export). On lits117 bf16 in the stem alone
    moved the masks as much as bf16 everywhere (min Dice 0.951); with the stem in fp32 (``bf16-rest``) the masks
    agreed to mean 0.993 / min 0.980 (docs/PERFORMANCE.md).
    """

    name = "openvino"

    def __init__(self, entry: ExportEntry, threads: int, precision: str = "bf16-rest") -> None:
        super().__init__(entry.input_size)
        if precision not in STEM_SPLITS:
            raise BackendUnavailable(f"no encoder split '{precision}' (known: {', '.join(STEM_SPLITS)})")
        self.precision = precision
        split = STEM_SPLITS[precision]
        try:
            import openvino  # noqa: F401 - present, or the backend is unavailable
            from onnx.utils import extract_model
        except ImportError as exc:
            raise BackendUnavailable("the 'openvino' / 'onnx' packages are not installed") from exc
        try:
            paths = entry.derived(*split.files)
            if not all(path.is_file() for path in paths):
                cuts = ["images", stem_cut_tensor(entry.onnx_path, split.stem_prefixes)]
                if split.tail:
                    cuts.append(tail_cut_tensor(entry.onnx_path, split.tail_prefixes))
                cuts.append("embeddings")
                for path, start, end in zip(paths, cuts[:-1], cuts[1:], strict=True):
                    with atomic_path(path) as tmp:
                        extract_model(str(entry.onnx_path), str(tmp), [start], [end])
            core = openvino_core()
            requests = []
            for path, hint in zip(paths, ("f32", "bf16", "f32"), strict=False):
                config = openvino_cpu_config(threads, hint, entry)
                requests.append(core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request())
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"OpenVINO could not split / compile '{entry.onnx_path}': {exc}") from exc
        self._parts = requests

    def _run_one(self, image: np.ndarray) -> np.ndarray:
        data = image
        for request in self._parts:
            request.infer({0: data})
            data = request.get_output_tensor(0).data
        return data


class OnnxRuntimeEncoder(_PerImageRunner):
    """The exported encoder run by ONNX Runtime's CPU execution provider (all graph optimisations on)."""

    name = "onnxruntime"

    def __init__(self, entry: ExportEntry, threads: int) -> None:
        super().__init__(entry.input_size)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("the 'onnxruntime' package is not installed") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(entry.onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BackendUnavailable(f"ONNX Runtime could not load '{entry.onnx_path}': {exc}") from exc
        self._input = self._session.get_inputs()[0].name

    def _run_one(self, image: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: image})[0]


def check_against_reference(fn: EncoderFn, entry: ExportEntry, precision: str, backend: str) -> float:
    """Run ``fn`` on the reference image; raise :class:`BackendUnavailable` if it strays from fp32 PyTorch."""
    got = fn(reference_image(entry.input_size))
    reference = entry.reference_embedding()
    if tuple(got.shape) != tuple(reference.shape):
        raise BackendUnavailable(
            f"{backend} returned shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
        )
    error = relative_error(got, reference)
    if not np.isfinite(error) or error > TOLERANCE[precision]:
        raise BackendUnavailable(
            f"{backend} ({precision}) output differs from PyTorch fp32 by {error:.2e} (relative L2, "
            f"limit {TOLERANCE[precision]:.0e})"
        )
    return error

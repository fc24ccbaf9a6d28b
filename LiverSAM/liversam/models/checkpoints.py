"""Checkpoint files: SHA-256 verification, safe loading (no code execution), and explicit downloads.

Every checkpoint is loaded with ``torch.load(..., weights_only=True)``: a file someone sends cannot run code.
Downloads happen only through an explicit call to :func:`download_checkpoint` (no ``liversam`` command
downloads a model), never at import or in a constructor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic_write import atomic_path
from ..errors import ModelError

log = logging.getLogger(__name__)


def file_sha256(path: str | Path, chunk_bytes: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def safe_torch_load(path: str | Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    Raises :class:`ModelError` naming the file when it is missing, not a torch checkpoint, or would need
    to execute code to load (pickled classes / functions).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint file not found: '{path}'.")
    if (other := _not_a_torch_file(path)) is not None:
        raise ModelError(f"'{path}' is not a PyTorch checkpoint: {other}. Give a .pth / .pt weights file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... depending on the problem
        text = str(exc).strip()
        if "Unsupported global" in text:  # torch's own advice (load it unsafely) is not repeated
            reason = ("it holds pickled Python objects beyond plain weights (classes or functions), whose loading "
                      "would run code; save the model's state_dict instead")  # fmt: skip
        elif "Weights only load failed" in text:  # what the weights-only reader met, without torch's advice
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            reason = f"it cannot be read as plain weights ({detail[0].strip() if detail else 'unreadable'}): the file is " \
                "damaged, or not a checkpoint"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise ModelError(
            f"'{path}' is not a loadable weights-only PyTorch checkpoint ({reason}). "
            "LiverSAM loads only plain weight files, never pickled code; check that this is the right file."
        ) from exc


def _not_a_torch_file(path: Path) -> str | None:
    """What ``path`` holds when its first bytes show it is no file ``torch.save`` writes (a zip archive, or a
    pickle in the legacy format), else None."""
    from ..image_integrity import sniff_image_format

    try:
        with open(path, "rb") as handle:
            start = handle.read(24)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if start.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip format / a legacy pickle
        return None
    if (image := sniff_image_format(path)) is not None:
        return f"it holds {image[0]}"
    if not start:
        return "it is empty"
    if start.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights themselves (run `git lfs pull` where it came from)"
    if len(start) > 9 and start[8:10] in (b"{\"", b"{}"):
        return "it is a safetensors file (LiverSAM reads PyTorch .pth / .pt checkpoints)"
    if start.startswith(b"\x1f\x8b"):
        return "it is a gzip-compressed file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        return "it is a text file"
    return f"it starts with the bytes {start[:4].hex(' ')}"


def extract_state_dict(checkpoint: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint (bare, or under 'model' / 'model_state' / 'state_dict')."""
    if isinstance(checkpoint, dict):
        for key in ("model_state", "model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint  # type: ignore[return-value]
    raise ModelError(
        f"'{path}' holds no model state dict (expected a mapping of parameter names to tensors)."
    )


def verify_sha256(path: str | Path, expected: str, model_name: str, url: str) -> None:
    """Raise :class:`ModelError` unless the file's SHA-256 equals the official one."""
    path = Path(path)
    if not path.is_file():
        # name only what works: there is no download command, the file is found by its place or by --model
        raise ModelError(
            f"Checkpoint for '{model_name}' not found at '{path}'. Download the official file from {url}, then "
            f"put it at '{path}' or give its path as --model {model_name}=/path/to/{path.name}."
        )
    actual = file_sha256(path)
    if actual != expected:
        raise ModelError(
            f"'{path}' is not the official '{model_name}' checkpoint: its SHA-256 is {actual}, expected "
            f"{expected}. Download it again from {url}."
        )


def download_checkpoint(
    url: str,
    target: str | Path,
    expected_sha256: str | None,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download ``url`` to ``target`` atomically, checking the SHA-256 before the file appears.

    ``progress(bytes_done, bytes_total)`` is called as data arrives (total is 0 when unknown).
    """
    target = Path(target)
    with atomic_path(target) as tmp:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except OSError as exc:
            raise ModelError(
                f"Could not download {url}: {exc}. Download it by hand and give its path."
            ) from exc
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise ModelError(
                f"Download of {url} has SHA-256 {digest.hexdigest()}, expected {expected_sha256}; nothing was saved."
            )
    return target


def user_models_dir() -> Path:
    """Where LiverSAM looks for user-provided checkpoints and registered models.

    ``$LIVERSAM_HOME`` if set, else ``~/.liversam``.
    """
    return Path(os.environ.get("LIVERSAM_HOME", Path.home() / ".liversam")) / "models"

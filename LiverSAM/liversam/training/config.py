"""Typed configuration of a LiverSAMTrain run, and the device / precision choices it implies.

Everything that changes what is learnt lives in :class:`TrainingConfig` (saved as ``config.json`` in the
run folder, compared on resume). Units: learning rates per optimiser step; angles in degrees; shifts as
fractions of the slice size; HU for the CT window.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import LiverSAMError

TRAIN_ENCODER_MODES = ("none", "last", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MODEL_SELECTIONS = ("best", "last")


class TrainingConfigError(LiverSAMError):
    """A training setting is invalid (the message names the option and the valid values)."""


@dataclass(frozen=True)
class LabelConfig:
    """Which voxel values of a label volume are liver and tumour, and which segment names of a Slicer
    segmentation are. By default the liver *includes* its tumours (the LiTS convention): the liver target
    is ``label in liver_labels``; a tumour target is one 2D connected component of ``label in tumor_labels``.
    """

    liver_labels: tuple[int, ...] = (1, 2)
    tumor_labels: tuple[int, ...] = (2,)
    liver_names: tuple[str, ...] = ("liver",)
    # Segment names counted as tumour (case-insensitive substring match). Cysts are never tumour.
    tumor_names: tuple[str, ...] = ("tumor", "tumour", "lesion", "metastas", "neoplasm", "cancer")
    # Liver segments of Slicer segmentations / 3D-IRCADb often exclude the tumours: add them back.
    liver_includes_tumor: bool = True


@dataclass(frozen=True)
class AugmentationConfig:
    """Random image+mask transforms (seeded). Probabilities 0..1; ranges are +/- limits."""

    rotation_deg: float = 15.0
    translation_fraction: float = 0.08  # of the slice side
    scale_range: tuple[float, float] = (0.85, 1.15)
    shear_deg: float = 8.0
    flip_lr_prob: float = 0.25
    flip_ud_prob: float = 0.0
    brightness: float = 0.08  # added to the windowed [0, 1] image
    contrast_range: tuple[float, float] = (0.85, 1.15)


@dataclass(frozen=True)
class PromptSimulationConfig:
    """How training prompts are drawn from the labels."""

    box_jitter_fraction: float = 0.1  # each box edge moves by up to this fraction of the box side
    box_jitter_max_px: float = 20.0  # ... and at most this many model-input pixels
    point_prob: float = 0.3  # chance that label-sampled points are added to the box
    max_positive_points: int = 3
    max_negative_points: int = 2
    refine_prob: float = (
        0.3  # chance that a batch gets a second pass with an error-region point + mask prompt
    )
    tumor_target_prob: float = (
        0.5  # chance to train on a lesion (when the slice has one) rather than the liver
    )
    min_target_pixels: int = 4  # smaller targets (model-frame pixels) are not used as prompts
    # Propagation-like prompts (what ``liversam segment`` feeds the model on every propagated slice): with
    # this probability the box is the box of the target's mask on a neighbouring slice (1 to
    # ``propagation_max_offset`` slices away) grown by the propagation margin, then jittered by
    # ``propagation_jitter_fraction`` of its side; the target stays this slice's mask (lobes that appear,
    # lesions that merge or split). Margins as in ``liversam.propagation``: organs max(margin_mm,
    # margin_per_mm_slice x slice thickness), lesions ``propagation_tumor_margin_mm``. 0 = off.
    propagation_prob: float = 0.0
    propagation_max_offset: int = 1
    propagation_margin_mm: float = 4.0
    propagation_margin_per_mm_slice: float = 1.4
    propagation_tumor_margin_mm: float = 2.0
    propagation_jitter_fraction: float = 0.05


@dataclass(frozen=True)
class TrainingConfig:
    """One training run. ``data`` and ``out`` are paths; every other field has a sensible default."""

    data: str
    out: str
    base_model: str = "litemedsam"
    labels: LabelConfig = field(default_factory=LabelConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    prompts: PromptSimulationConfig = field(default_factory=PromptSimulationConfig)
    # preprocessing (CT window in HU)
    window_level: float = 40.0
    window_width: float = 400.0
    max_slices_per_case: int | None = None  # evenly spaced subset of each case's liver slices
    min_liver_voxels: int = 16  # a slice is used when it has at least this many liver voxels
    # Slices beyond each end of the liver also cached (no liver on them): with propagation-like prompts
    # they are trained as the slice where a propagation must stop (box from the last liver slice, empty
    # target). 0 = off.
    end_slices: int = 0
    augment_copies: int = 0  # augmented copies per slice stored in the cache (frozen encoder)
    # split
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_file: str | None = None  # JSON {"train": [...], "val": [...], "test": [...]} of case ids
    seed: int = 0
    # what trains
    train_encoder: str = "none"  # none | last | all
    encoder_last_stages: int = 1
    train_prompt_encoder: bool = True  # False: only the mask decoder learns (the prompt encoder stays as shipped)
    # optimisation
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    lr_min: float = 1e-6
    weight_decay: float = 0.01
    tumor_loss_weight: float = 2.0
    iou_loss_weight: float = 0.1
    grad_clip_norm: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    early_stopping_patience: int = 10  # epochs without a better validation Dice
    # Which epoch becomes best.pt: "best" (highest validation Dice, early stopping) or "last" (the final
    # epoch; validation is only reported, so the validation cases may be held-out test cases).
    model_selection: str = "best"
    device: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None  # default <out>/cache; several runs may share one
    # Folder of ``emb_<case_id>.npz`` (keys ``ks``, ``embs``): encoder embeddings computed earlier (e.g. by a
    # segment run's embedding cache) used to fill the training cache instead of encoding again. Used only
    # when one re-encoded slice per study matches them (same encoder, same preprocessing).
    seed_embeddings_dir: str | None = None
    # output
    model_name: str | None = None  # name to register the best model under (default: the run folder's name)
    register: bool = True
    test_report: bool = True

    def __post_init__(self) -> None:
        if self.train_encoder not in TRAIN_ENCODER_MODES:
            raise TrainingConfigError(
                f"--train-encoder '{self.train_encoder}' is not one of {', '.join(TRAIN_ENCODER_MODES)}."
            )
        if self.precision not in PRECISIONS:
            raise TrainingConfigError(
                f"--precision '{self.precision}' is not one of {', '.join(PRECISIONS)}."
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingConfigError("--epochs and --batch-size must be at least 1.")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise TrainingConfigError(
                f"Need --lr > 0 and 0 <= --lr-min <= --lr (got {self.lr}, {self.lr_min})."
            )
        if self.model_selection not in MODEL_SELECTIONS:
            raise TrainingConfigError(
                f"--select '{self.model_selection}' is not one of {', '.join(MODEL_SELECTIONS)}."
            )
        p = self.prompts
        if not 0.0 <= p.propagation_prob <= 1.0 or p.propagation_max_offset < 1:
            raise TrainingConfigError(
                f"--propagation-prompts must be within 0..1 (got {p.propagation_prob}) and the neighbour "
                f"offset at least 1 (got {p.propagation_max_offset})."
            )
        if self.end_slices < 0:
            raise TrainingConfigError(f"--end-slices must be >= 0 (got {self.end_slices}).")
        if self.augment_copies < 0:
            raise TrainingConfigError("--augment-copies must be >= 0.")
        if self.max_slices_per_case is not None and self.max_slices_per_case < 2:
            raise TrainingConfigError("--max-slices must be at least 2 (or omitted for all liver slices).")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise TrainingConfigError(
                f"--split {fractions}: give three non-negative fractions train,val,test summing to 1 (e.g. 0.8,0.1,0.1)."
            )
        if self.register:
            self._check_model_name()
        if self.train_encoder != "none" and self.augment_copies:
            # Augmented copies are a frozen-encoder device: a trained encoder gets fresh augmentation each step.
            object.__setattr__(self, "augment_copies", 0)

    def _check_model_name(self) -> None:
        """The name the best model is registered under must not be a built-in model's: found now, not after the
        whole training (the registry refuses it then, and the run ended without its result)."""
        from ..models.registry import MODEL_SPECS

        if self.model_name in MODEL_SPECS:
            raise TrainingConfigError(
                f"--name '{self.model_name}' is a built-in model name; choose another name for your model."
            )
        if not self.model_name and Path(self.out).resolve().name in MODEL_SPECS:
            raise TrainingConfigError(
                f"The run folder's name '{Path(self.out).resolve().name}' would be the model's name, and it is a "
                "built-in model's; give --name NAME (or another --out folder, or --no-register)."
            )

    # --- derived --------------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.out_dir / "cache"

    @property
    def frozen_encoder(self) -> bool:
        return self.train_encoder == "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        nested = {
            "labels": LabelConfig,
            "augmentation": AugmentationConfig,
            "prompts": PromptSimulationConfig,
        }
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in nested and isinstance(value, dict):
                sub_known = {f.name for f in fields(nested[key])}
                value = nested[key](**{k: _tuples(v) for k, v in value.items() if k in sub_known})
            kwargs[key] = _tuples(value)
        return cls(**kwargs)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# Settings that may differ between the first run and a resumed one without changing what is learnt.
RUNTIME_ONLY_FIELDS = (
    "device",
    "threads",
    "cache_dir",
    "register",
    "test_report",
    "model_name",
    "early_stopping_patience",
    "seed_embeddings_dir",
)


def learning_fields(config: TrainingConfig) -> dict:
    """The part of the configuration a resumed run must share with the run it continues."""
    data = config.to_dict()
    for key in RUNTIME_ONLY_FIELDS:
        data.pop(key, None)
    data["data"] = str(Path(data["data"]).resolve())
    data.pop("out", None)
    return data


# --- precision ----------------------------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it PyTorch emulates
    bf16 on CPU and autocast runs many times *slower* than fp32 (measured ~30x on an AVX2 Zen3)."""
    override = os.environ.get("LIVERSAM_CPU_BF16")
    if override is not None:
        return override.strip().lower() in ("1", "true", "yes")
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device``.

    ``auto``: CUDA -> bf16 when the GPU supports it, else fp16; CPU -> bf16 only where the CPU has native
    bf16 (see :func:`cpu_has_fast_bf16`), else fp32; MPS -> fp32. An explicit choice is kept, except fp16
    on the CPU (not supported by CPU autocast), which raises.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise TrainingConfigError("--precision fp16 needs a CUDA GPU; on the CPU use fp32 or bf16.")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

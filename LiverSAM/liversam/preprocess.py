"""Slice preprocessing for SAM-family models, and the exact inverse back to the slice's voxels.

Steps for one axial slice (a 2D array [j, i] of HU values):
1. CT window (abdomen W400/L40 by default) on a *copy*, mapped to [0, 1];
2. optional CLAHE (contrast-limited adaptive histogram equalisation);
3. resize so that the longest side equals the model input size, keeping the aspect ratio;
4. normalise as the model was trained (min-max to [0, 1] for LiteMedSAM/MedSAM; ImageNet mean/std on a
   0..255 scale for the original SAM);
5. pad bottom/right with zeros to a square input.

:class:`SliceTransform` maps voxel coordinates (i, j) on the slice to model-input pixels and back, and
maps the model's mask logits back onto the slice's voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class WindowSettings:
    """CT window in HU (``level`` = centre, ``width``) and optional CLAHE."""

    level: float = 40.0
    width: float = 400.0
    clahe: bool = False
    clahe_clip_limit: float = 0.01

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window width must be > 0 HU, got {self.width}")

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0

    def key(self) -> tuple:
        """Hashable identity (used in embedding-cache keys)."""
        return (round(self.level, 3), round(self.width, 3), self.clahe, round(self.clahe_clip_limit, 5))


def window_slice(slice_hu: np.ndarray, window: WindowSettings) -> np.ndarray:
    """Window a 2D HU array into float32 [0, 1]. Returns a new array; the input is never modified."""
    out = np.asarray(slice_hu, dtype=np.float32).copy()
    np.clip(out, window.low, window.high, out=out)
    out -= window.low
    out /= window.width
    if window.clahe:
        from skimage.exposure import equalize_adapthist

        out = equalize_adapthist(out, clip_limit=window.clahe_clip_limit).astype(np.float32)
    return out


@dataclass(frozen=True)
class SliceTransform:
    """Geometry of one slice's mapping into a square model input of ``input_size`` pixels.

    ``slice_shape`` is (nj, ni). The slice is scaled by ``scale`` = input_size / max(nj, ni) into a
    ``resized_shape`` (h, w) placed at the top-left of the input; the rest is padding.
    """

    slice_shape: tuple[int, int]
    input_size: int

    @property
    def scale(self) -> float:
        return self.input_size / float(max(self.slice_shape))

    @property
    def resized_shape(self) -> tuple[int, int]:
        nj, ni = self.slice_shape
        return (int(round(nj * self.scale)), int(round(ni * self.scale)))

    def voxel_to_model(self, points_ij: np.ndarray) -> np.ndarray:
        """Voxel indices (i, j) (..., 2) to model-input pixel coordinates (x, y), pixel centres aligned."""
        p = np.asarray(points_ij, dtype=np.float64)
        return (p + 0.5) * self.scale - 0.5

    def model_to_voxel(self, points_xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_to_model`."""
        p = np.asarray(points_xy, dtype=np.float64)
        return (p + 0.5) / self.scale - 0.5

    def box_to_model(self, box_ij: tuple[float, float, float, float]) -> np.ndarray:
        """A box (i0, j0, i1, j1) of voxel indices (inclusive corners) to model (x0, y0, x1, y1)."""
        i0, j0, i1, j1 = box_ij
        lo = self.voxel_to_model(np.array([min(i0, i1), min(j0, j1)]))
        hi = self.voxel_to_model(np.array([max(i0, i1), max(j0, j1)]))
        return np.concatenate([lo, hi])

    def image_to_input(self, image01: np.ndarray, normalization: str) -> torch.Tensor:
        """A windowed [0, 1] slice [j, i] to a model input tensor (1, 3, S, S), float32."""
        tensor = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
        h, w = self.resized_shape
        if (h, w) != tuple(self.slice_shape):
            tensor = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        tensor = tensor.expand(1, 3, h, w)
        if normalization == "minmax":
            lo, hi = tensor.min(), tensor.max()
            tensor = (tensor - lo) / torch.clamp(hi - lo, min=1e-8)
        elif normalization == "sam":
            mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
            tensor = (tensor * 255.0 - mean) / std
        else:
            raise ValueError(f"unknown normalization '{normalization}' (expected 'minmax' or 'sam')")
        padded = torch.zeros((1, 3, self.input_size, self.input_size), dtype=torch.float32)
        padded[:, :, :h, :w] = tensor
        return padded

    def logits_to_slice(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, 1, L, L) at the decoder's resolution to logits (N, 1, nj, ni) on the slice."""
        logits = low_res_logits.float()
        if logits.shape[-1] != self.input_size:
            logits = F.interpolate(
                logits, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        h, w = self.resized_shape
        logits = logits[..., :h, :w]
        return F.interpolate(logits, size=tuple(self.slice_shape), mode="bilinear", align_corners=False)

    def mask_to_low_res(self, mask_ji: np.ndarray, low_res_size: int, logit: float = 8.0) -> torch.Tensor:
        """A binary slice mask [j, i] to dense-prompt logits (1, 1, L, L) in the decoder's mask frame.

        Used to feed the previous slice's result as a mask prompt during propagation.
        """
        m = torch.from_numpy(np.asarray(mask_ji, dtype=np.float32))[None, None]
        h, w = self.resized_shape
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        full = torch.zeros((1, 1, self.input_size, self.input_size))
        full[..., :h, :w] = m
        if low_res_size != self.input_size:
            full = F.interpolate(
                full, size=(low_res_size, low_res_size), mode="bilinear", align_corners=False
            )
        return (full * 2.0 - 1.0) * logit

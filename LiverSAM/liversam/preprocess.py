"""Slice preprocessing for SAM-family models, and the exact inverse back to the slice's voxels.

Steps for one axial slice (a 2D array [j, i] of HU values):
1. CT window (abdomen W400/L40 by default) on a *copy*, mapped to [0, 1];
2. optional CLAHE (contrast-limited adaptive histogram equalisation);
3. resize so that the longest side equals the model input size, keeping the aspect ratio;
4. normalise as the model was trained (min-max to [0, 1] for LiteMedSAM/MedSAM; ImageNet mean/std on a
   0..255 scale for the original SAM);
5. pad bottom/right with zeros to a square input.

Before step 3 the slice is turned to the view the model is given (:class:`SliceView`): the radiological display of
an axial slice (the patient's right on the image's left, anterior at the top), i.e. the voxel order of a CT stored
as DICOM writes it. A scan stored another way (a NIfTI with flipped or swapped in-plane axes) is flipped or
transposed, on a copy, into that view, so the model sees every scan as it sees the development cases: SAM's masks
are not invariant to a flip (docs/RESULTS.md, session 17).

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
class SliceView:
    """How a stored slice [j, i] becomes the image [y, x] the model is given: first transposed (``transpose``:
    y = i, x = j), then flipped top-bottom (``flip_y``) and left-right (``flip_x``). The default is the slice as
    stored."""

    transpose: bool = False
    flip_y: bool = False
    flip_x: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_y or self.flip_x)

    def shape(self, slice_shape: tuple[int, int]) -> tuple[int, int]:
        """The viewed image's (h, w) for a stored slice of (nj, ni)."""
        return (slice_shape[1], slice_shape[0]) if self.transpose else (slice_shape[0], slice_shape[1])

    def to_view(self, array):
        """A stored slice (numpy [..., j, i] or torch [..., j, i]) as the viewed image [..., y, x]."""
        if self.is_identity:
            return array
        is_torch = isinstance(array, torch.Tensor)
        out = array.transpose(-1, -2) if is_torch and self.transpose else array
        if not is_torch and self.transpose:
            out = np.swapaxes(out, -1, -2)
        dims = [d for d, flip in ((-2, self.flip_y), (-1, self.flip_x)) if flip]
        if dims:
            out = torch.flip(out, dims) if is_torch else np.flip(out, axis=tuple(dims))
        return out

    def from_view(self, array):
        """The inverse of :meth:`to_view`: a viewed image [..., y, x] back to the stored slice [..., j, i]."""
        if self.is_identity:
            return array
        is_torch = isinstance(array, torch.Tensor)
        dims = [d for d, flip in ((-2, self.flip_y), (-1, self.flip_x)) if flip]
        out = array
        if dims:
            out = torch.flip(out, dims) if is_torch else np.flip(out, axis=tuple(dims))
        if self.transpose:
            out = out.transpose(-1, -2) if is_torch else np.swapaxes(out, -1, -2)
        return out

    def points_to_view(self, points_ij: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
        """Voxel coordinates (i, j) (..., 2) on the stored slice to (x, y) on the viewed image."""
        p = np.asarray(points_ij, dtype=np.float64)
        xy = p[..., ::-1].copy() if self.transpose else p.copy()
        h, w = self.shape(slice_shape)
        if self.flip_x:
            xy[..., 0] = (w - 1) - xy[..., 0]
        if self.flip_y:
            xy[..., 1] = (h - 1) - xy[..., 1]
        return xy

    def points_from_view(self, points_xy: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
        """The inverse of :meth:`points_to_view`."""
        xy = np.asarray(points_xy, dtype=np.float64).copy()
        h, w = self.shape(slice_shape)
        if self.flip_x:
            xy[..., 0] = (w - 1) - xy[..., 0]
        if self.flip_y:
            xy[..., 1] = (h - 1) - xy[..., 1]
        return xy[..., ::-1].copy() if self.transpose else xy


def display_view(direction_lps) -> SliceView:
    """The :class:`SliceView` that shows an axial slice of a scan with this direction matrix (columns: the i, j,
    k axes in LPS) the way DICOM stores it: x along the patient's left (+L), y along posterior (+P).

    A scan whose slices are not axial (the k axis closer to L or P than to S) is left as stored."""
    d = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    if np.argmax(np.abs(d[:, 2])) != 2:
        return SliceView()
    # which of the in-plane axes (i, j) runs closer to L-R: that one becomes x
    transpose = abs(d[0, 1]) > abs(d[0, 0])
    x_axis, y_axis = (d[:, 1], d[:, 0]) if transpose else (d[:, 0], d[:, 1])
    return SliceView(transpose=bool(transpose), flip_y=bool(y_axis[1] < 0), flip_x=bool(x_axis[0] < 0))


@dataclass(frozen=True)
class SliceTransform:
    """Geometry of one slice's mapping into a square model input of ``input_size`` pixels.

    ``slice_shape`` is (nj, ni), the slice as stored. It is first turned by ``view`` (:class:`SliceView`), then the
    viewed image is scaled by ``scale`` = input_size / its longest side into a ``resized_shape`` (h, w) placed at
    the top-left of the input; the rest is padding.
    """

    slice_shape: tuple[int, int]
    input_size: int
    view: SliceView = SliceView()

    @property
    def scale(self) -> float:
        return self.input_size / float(max(self.slice_shape))

    @property
    def resized_shape(self) -> tuple[int, int]:
        h, w = self.view.shape(self.slice_shape)
        return (int(round(h * self.scale)), int(round(w * self.scale)))

    def voxel_to_model(self, points_ij: np.ndarray) -> np.ndarray:
        """Voxel indices (i, j) (..., 2) to model-input pixel coordinates (x, y), pixel centres aligned."""
        p = self.view.points_to_view(points_ij, self.slice_shape)
        return (p + 0.5) * self.scale - 0.5

    def model_to_voxel(self, points_xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_to_model`."""
        p = np.asarray(points_xy, dtype=np.float64)
        return self.view.points_from_view((p + 0.5) / self.scale - 0.5, self.slice_shape)

    def box_to_model(self, box_ij: tuple[float, float, float, float]) -> np.ndarray:
        """A box (i0, j0, i1, j1) of voxel indices (inclusive corners) to model (x0, y0, x1, y1)."""
        i0, j0, i1, j1 = box_ij
        corners = self.voxel_to_model(np.array([[i0, j0], [i1, j1]], dtype=np.float64))  # a flip swaps them
        return np.concatenate([corners.min(axis=0), corners.max(axis=0)])

    def image_to_input(self, image01: np.ndarray, normalization: str) -> torch.Tensor:
        """A windowed [0, 1] slice [j, i] to a model input tensor (1, 3, S, S), float32."""
        viewed = self.view.to_view(np.asarray(image01, dtype=np.float32))
        tensor = torch.from_numpy(np.ascontiguousarray(viewed))[None, None]
        h, w = self.resized_shape
        if (h, w) != tuple(tensor.shape[-2:]):
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
        viewed = F.interpolate(logits, size=self.view.shape(self.slice_shape), mode="bilinear", align_corners=False)
        return self.view.from_view(viewed).contiguous()

    def mask_to_low_res(self, mask_ji: np.ndarray, low_res_size: int, logit: float = 8.0) -> torch.Tensor:
        """A binary slice mask [j, i] to dense-prompt logits (1, 1, L, L) in the decoder's mask frame.

        Used to feed the previous slice's result as a mask prompt during propagation.
        """
        m = torch.from_numpy(np.ascontiguousarray(self.view.to_view(np.asarray(mask_ji, dtype=np.float32))))[None, None]
        h, w = self.resized_shape
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        full = torch.zeros((1, 1, self.input_size, self.input_size))
        full[..., :h, :w] = m
        if low_res_size != self.input_size:
            full = F.interpolate(
                full, size=(low_res_size, low_res_size), mode="bilinear", align_corners=False
            )
        return (full * 2.0 - 1.0) * logit

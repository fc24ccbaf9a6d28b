"""Training and validation samples read from the cache files.

A sample is one cached slice (or augmented copy) of one study. Targets live in the decoder's
low-resolution mask frame (``L`` x ``L``, 256 px): the slice mask is resized exactly as the image is
(:class:`~liversam.preprocess.SliceTransform`: longest side to the input size, padded bottom/right),
then to ``L``. Lesions are the 8-connected components of the tumour mask on the slice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..preprocess import SliceTransform, SliceView


def mask_to_low_res(mask_ji: np.ndarray, transform: SliceTransform, low_res: int) -> np.ndarray:
    """A slice mask [j, i] as a boolean [y, x] mask in the decoder's L x L frame."""
    m = torch.from_numpy(np.ascontiguousarray(transform.view.to_view(np.asarray(mask_ji, dtype=np.float32))))[None, None]
    h, w = transform.resized_shape
    if (h, w) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    full = torch.zeros((1, 1, transform.input_size, transform.input_size))
    full[..., :h, :w] = m
    if low_res != transform.input_size:
        full = F.interpolate(full, size=(low_res, low_res), mode="area")
    return (full[0, 0] >= 0.5).numpy()


@dataclass
class Sample:
    """One slice sample: where it is cached, its low-res targets and (validation) slice-frame masks."""

    cache_path: Path
    row: int
    case_id: str
    k: int
    copy: int
    liver_lr: np.ndarray  # [L, L] bool
    lesions_lr: list[np.ndarray]  # one [L, L] bool mask per lesion (large enough to prompt)
    tumor_lr: np.ndarray | None = None  # [L, L] bool, every lesion (propagation-like prompts)
    liver_ji: np.ndarray | None = None  # slice-frame masks, kept for validation
    tumor_ji: np.ndarray | None = None
    lesions_ji: list[np.ndarray] = field(default_factory=list)
    end: bool = False  # a slice beyond the liver's end (trained only with a neighbour's propagated box)


def _lesions(tumor_ji: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(tumor_ji, structure=np.ones((3, 3), dtype=bool))
    return [labels == n for n in range(1, count + 1)]


class CachedSlices:
    """The samples of some studies (optionally restricted to some slices per study), read from caches.

    ``keep_slice_masks`` keeps the slice-frame masks (validation); ``original_only`` skips augmented copies.
    Embeddings / images are read from the HDF5 files batch by batch, not held in memory.
    """

    def __init__(
        self,
        cache_paths: dict[str, Path],
        input_size: int,
        low_res: int,
        slices: dict[str, list[int]] | None = None,
        keep_slice_masks: bool = False,
        original_only: bool = False,
        min_target_pixels: int = 4,
        keep_ends: bool = False,
    ) -> None:
        import h5py

        self.input_size = input_size
        self.low_res = low_res
        self.samples: list[Sample] = []
        self._files: dict[Path, h5py.File] = {}
        self.transforms: dict[str, SliceTransform] = {}
        # per study: (in-plane mm per low-res pixel (x, y), slice thickness mm), from the cached geometry
        self.lowres_mm: dict[str, tuple[float, float, float]] = {}
        self._index: dict[tuple[str, int, int], int] = {}
        for case_id, path in sorted(cache_paths.items()):
            wanted = set(slices[case_id]) if slices and case_id in slices else None
            with h5py.File(path, "r") as handle:
                ks = handle["k"][:]
                copies = handle["copy"][:]
                shape = handle["liver"].shape[1:]
                # the view the cache's embeddings were made in (caches from before it: the slice as stored)
                view = SliceView(*(bool(v) for v in json.loads(handle.attrs.get("slice_view", "[0, 0, 0]"))))
                transform = SliceTransform(slice_shape=tuple(int(s) for s in shape), input_size=input_size, view=view)
                self.transforms[case_id] = transform
                geometry = json.loads(handle.attrs["geometry"]) if "geometry" in handle.attrs else {}
                spacing = geometry.get("spacing_mm", [1.0, 1.0, 1.0])
                side_mm = max(shape) / low_res  # slice pixels per low-res pixel (longest side -> L)
                # x of the viewed slice runs along j when the view transposes it
                mm_x, mm_y = (spacing[1], spacing[0]) if view.transpose else (spacing[0], spacing[1])
                self.lowres_mm[case_id] = (mm_x * side_mm, mm_y * side_mm, spacing[2])
                for row, (k, copy) in enumerate(zip(ks, copies, strict=True)):
                    if (wanted is not None and int(k) not in wanted) or (original_only and copy != 0):
                        continue
                    liver = handle["liver"][row].astype(bool)
                    tumor = handle["tumor"][row].astype(bool)
                    liver_lr = mask_to_low_res(liver, transform, low_res)
                    end = int(liver_lr.sum()) < min_target_pixels
                    if end and not (keep_ends and copy == 0):
                        continue
                    lesions_ji = _lesions(tumor)
                    lesions_lr = [
                        lr
                        for lr in (mask_to_low_res(les, transform, low_res) for les in lesions_ji)
                        if int(lr.sum()) >= min_target_pixels
                    ]
                    tumor_lr = mask_to_low_res(tumor, transform, low_res) if tumor.any() else np.zeros_like(liver_lr)
                    sample = Sample(path, row, case_id, int(k), int(copy), liver_lr, lesions_lr, tumor_lr)
                    sample.end = end
                    if keep_slice_masks:
                        sample.liver_ji, sample.tumor_ji, sample.lesions_ji = liver, tumor, lesions_ji
                    self.samples.append(sample)
        if keep_ends:  # an end slice is only useful next to a liver slice (the box comes from there)
            liver_at = {(s.case_id, s.k) for s in self.samples if not s.end and s.copy == 0}
            self.samples = [
                s for s in self.samples
                if not s.end or (s.case_id, s.k - 1) in liver_at or (s.case_id, s.k + 1) in liver_at
            ]
        for position, sample in enumerate(self.samples):
            self._index[(sample.case_id, sample.k, sample.copy)] = position

    def __len__(self) -> int:
        return len(self.samples)

    def neighbour(self, index: int, offset: int) -> Sample | None:
        """The original sample ``offset`` slices away from the original sample ``index`` (same study), if
        cached; None for augmented copies (each copy of each slice has its own random transform)."""
        sample = self.samples[index]
        if sample.copy != 0:
            return None
        found = self._index.get((sample.case_id, sample.k + offset, 0))
        return None if found is None else self.samples[found]

    def _file(self, path: Path):
        import h5py

        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        return self._files[path]

    def has_embeddings(self) -> bool:
        return bool(self.samples) and "embedding" in self._file(self.samples[0].cache_path)

    def embeddings(self, indices: list[int]) -> torch.Tensor:
        """Cached frozen-encoder embeddings (B, C, H, W), float32, in channels-last memory: the layout the mask
        decoder's transformer reads them in (as B x HW x C tokens), so the training step needs no copy of its own."""
        rows = [self._file(self.samples[i].cache_path)["embedding"][self.samples[i].row] for i in indices]
        return torch.from_numpy(np.stack(rows)).to(torch.float32, memory_format=torch.channels_last)

    def slice_data(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(windowed image float32, liver uint8, tumor uint8) of a sample, slice frame [j, i]."""
        sample = self.samples[index]
        handle = self._file(sample.cache_path)
        return (
            handle["image"][sample.row].astype(np.float32),
            handle["liver"][sample.row],
            handle["tumor"][sample.row],
        )

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

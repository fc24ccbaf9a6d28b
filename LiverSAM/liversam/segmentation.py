"""The result of a segmentation: named binary segments on the CT's grid.

A :class:`SegmentationResult` is what every writer (``.seg.nrrd``, labelmap, DICOM SEG) and every Slicer
bridge consumes. Masks are boolean arrays indexed [k, j, i] on the CT's exact geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ImageGeometry

# Colours (RGB 0..1) Slicer's generic anatomy colour table uses for liver and for a tumour.
DEFAULT_COLORS: dict[str, tuple[float, float, float]] = {
    "liver": (221 / 255, 130 / 255, 101 / 255),
    "tumor": (144 / 255, 238 / 255, 144 / 255),
    "tumour": (144 / 255, 238 / 255, 144 / 255),
}
FALLBACK_COLORS = [
    (0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82), (0.86, 0.96, 0.08)
]


def default_color(name: str, index: int) -> tuple[float, float, float]:
    return DEFAULT_COLORS.get(name.lower(), FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


@dataclass
class Segment:
    """One structure. ``label`` is its value in a labelmap export; ``color`` is RGB in 0..1."""

    name: str
    label: int
    mask_kji: np.ndarray
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Per-slice model scores (slice index k -> predicted IoU), filled by the pipeline.
    slice_scores: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask_kji = np.asarray(self.mask_kji, dtype=bool)


@dataclass
class SegmentationResult:
    geometry: ImageGeometry
    segments: list[Segment] = field(default_factory=list)
    # Free-form provenance (model name, LiverSAM version, prompts file, ...), written into file headers.
    provenance: dict = field(default_factory=dict)

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment named '{name}' (have: {', '.join(s.name for s in self.segments)})")

    def to_labelmap(self) -> np.ndarray:
        """A labelmap [k, j, i] (uint8 or uint16): each segment's ``label``; later segments win overlaps."""
        max_label = max((s.label for s in self.segments), default=0)
        dtype = np.uint8 if max_label < 256 else np.uint16
        labelmap = np.zeros(self.geometry.shape_kji, dtype=dtype)
        for seg in self.segments:
            labelmap[seg.mask_kji] = seg.label
        return labelmap

"""The in-memory CT volume: a voxel array indexed [k, j, i] plus its LPS geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ImageGeometry


@dataclass
class CTVolume:
    """A CT volume. ``array_kji`` holds Hounsfield units as stored (rescale applied for DICOM).

    LiverSAM never writes into ``array_kji``: every preprocessing step works on a copy. The array is
    marked read-only on construction so that an accidental in-place change fails loudly.
    """

    array_kji: np.ndarray
    geometry: ImageGeometry
    source: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array_kji.ndim != 3:
            raise ValueError(f"CT array must be 3D [k, j, i], got shape {self.array_kji.shape}")
        if tuple(self.array_kji.shape) != self.geometry.shape_kji:
            raise ValueError(
                f"array shape {self.array_kji.shape} does not match geometry shape {self.geometry.shape_kji}"
            )
        self.array_kji.flags.writeable = False

    @property
    def num_slices(self) -> int:
        return int(self.array_kji.shape[0])

"""Image geometry and coordinate conversions.

Frames:
- IJK: continuous voxel indices (i = column, j = row, k = slice). numpy arrays from SimpleITK and
  Slicer are indexed ``array[k, j, i]``.
- LPS: patient millimetres, as stored in files and used by ITK / SimpleITK / DICOM.
- RAS: patient millimetres as Slicer holds them in memory: RAS = diag(-1, -1, 1) @ LPS.

``lps = origin_lps + direction_lps @ (spacing * ijk)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def lps_to_ras(points_lps: np.ndarray) -> np.ndarray:
    """Convert points (..., 3) from LPS to RAS millimetres."""
    return np.asarray(points_lps, dtype=float) * np.array([-1.0, -1.0, 1.0])


def ras_to_lps(points_ras: np.ndarray) -> np.ndarray:
    """Convert points (..., 3) from RAS to LPS millimetres (the same flip, its own inverse)."""
    return np.asarray(points_ras, dtype=float) * np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ImageGeometry:
    """Where a 3D voxel grid lies in patient space (LPS).

    ``size_ijk`` is (ni, nj, nk); ``spacing_mm`` per i, j, k axis; ``origin_lps`` is the centre of voxel
    (0, 0, 0); ``direction_lps`` is the 3x3 matrix whose columns are the i, j, k axis directions in LPS.
    """

    size_ijk: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        direction = np.asarray(self.direction_lps, dtype=float).reshape(3, 3)
        object.__setattr__(self, "direction_lps", direction)
        object.__setattr__(self, "size_ijk", tuple(int(s) for s in self.size_ijk))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "origin_lps", tuple(float(s) for s in self.origin_lps))

    # --- matrices -------------------------------------------------------------------------------
    @property
    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping IJK to LPS."""
        m = np.eye(4)
        m[:3, :3] = self.direction_lps @ np.diag(self.spacing_mm)
        m[:3, 3] = self.origin_lps
        return m

    @property
    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping IJK to RAS (what Slicer calls IJKToRAS)."""
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.ijk_to_lps_matrix

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """The numpy array shape (nk, nj, ni)."""
        return (self.size_ijk[2], self.size_ijk[1], self.size_ijk[0])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    # --- conversions ----------------------------------------------------------------------------
    def ijk_to_lps(self, points_ijk: np.ndarray) -> np.ndarray:
        """Continuous IJK (..., 3) to LPS millimetres."""
        p = np.asarray(points_ijk, dtype=float)
        return p @ (self.direction_lps @ np.diag(self.spacing_mm)).T + np.asarray(self.origin_lps)

    def lps_to_ijk(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS millimetres (..., 3) to continuous IJK."""
        p = np.asarray(points_lps, dtype=float) - np.asarray(self.origin_lps)
        inv = np.linalg.inv(self.direction_lps @ np.diag(self.spacing_mm))
        return p @ inv.T

    def ras_to_ijk(self, points_ras: np.ndarray) -> np.ndarray:
        return self.lps_to_ijk(ras_to_lps(points_ras))

    def ijk_to_ras(self, points_ijk: np.ndarray) -> np.ndarray:
        return lps_to_ras(self.ijk_to_lps(points_ijk))

    def contains_ijk(self, points_ijk: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
        """True where a continuous IJK point lies inside the grid (voxel centres +- ``tolerance``)."""
        p = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        upper = np.asarray(self.size_ijk, dtype=float) - 1 + tolerance
        return np.all((p >= -tolerance) & (p <= upper), axis=-1)

    def is_close(self, other: ImageGeometry, tolerance_mm: float = 1e-3) -> bool:
        """Same grid: equal size, and spacing, origin, direction equal within a tolerance."""
        return (
            self.size_ijk == other.size_ijk
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tolerance_mm)
            and np.allclose(self.origin_lps, other.origin_lps, atol=tolerance_mm)
            and np.allclose(self.direction_lps, other.direction_lps, atol=1e-5)
        )

    def describe_difference(self, other: ImageGeometry) -> str:
        """A short human-readable list of what differs between two geometries."""
        parts = []
        if self.size_ijk != other.size_ijk:
            parts.append(f"size {self.size_ijk} vs {other.size_ijk}")
        if not np.allclose(self.spacing_mm, other.spacing_mm, atol=1e-3):
            parts.append(f"spacing {self.spacing_mm} vs {other.spacing_mm} mm")
        if not np.allclose(self.origin_lps, other.origin_lps, atol=1e-3):
            parts.append(f"origin {self.origin_lps} vs {other.origin_lps} (LPS mm)")
        if not np.allclose(self.direction_lps, other.direction_lps, atol=1e-5):
            parts.append("direction matrices differ")
        return "; ".join(parts) or "identical"

    # --- SimpleITK bridge -------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> ImageGeometry:  # image: SimpleITK.Image
        return cls(
            size_ijk=tuple(image.GetSize()),
            spacing_mm=tuple(image.GetSpacing()),
            origin_lps=tuple(image.GetOrigin()),
            direction_lps=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
        )

    def apply_to_sitk(self, image) -> None:
        """Copy this geometry onto a SimpleITK image of the same size."""
        if tuple(image.GetSize()) != self.size_ijk:
            raise ValueError(f"image size {image.GetSize()} does not match geometry size {self.size_ijk}")
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(tuple(float(v) for v in self.direction_lps.ravel()))

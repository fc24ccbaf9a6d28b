"""Dense-CRF refinement of a segment's mask (Krähenbühl and Koltun's fully connected CRF).

The segment's mask gives the unary term (the probability of "inside" is high deep inside the mask, low far
outside it and uncertain near its edge); the CT, windowed to HU, gives the pairwise term: voxels close in
space (mm) and in intensity (HU) are pushed to the same label. Mean-field inference runs on the mask's
bounding box plus a margin, in 3D (one field over the box) or 2D (one field per slice that holds the mask).

The CRF itself comes from the optional package ``pydensecrf2`` (extra ``crf``; it builds from source, so a
C++ compiler is needed to install it). The CT is never modified: features are computed on copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .errors import LiverSAMError
from .postprocess import bounding_box

CRF_PACKAGE_HINT = (
    "the dense-CRF refinement needs the package 'pydensecrf2': pip install 'liversam[crf]' "
    "(or pip install pydensecrf2; it compiles, so a C++ compiler must be installed)."
)


class CRFUnavailableError(LiverSAMError):
    """The dense-CRF refinement was asked for but its package is not installed."""


@dataclass(frozen=True)
class CRFSettings:
    """One segment's dense-CRF refinement. Distances in mm, intensities in HU. The defaults are the organ's
    (:data:`ORGAN_CRF`)."""

    dims: int = 3  # 3: one field over the box; 2: one field per axial slice
    window_level: float = 40.0  # HU window applied before the bilateral term (clips bone and air)
    window_width: float = 400.0
    # Unary: p(inside) = sigmoid(signed distance to the mask's edge / edge_mm), clipped to
    # [1 - confidence, confidence]; edge_mm = 0 gives a flat p = confidence inside, 1 - confidence outside.
    confidence: float = 0.9
    edge_mm: float = 2.0
    # Pairwise: bilateral (appearance) kernel and Gaussian (smoothness) kernel, each with a weight.
    bilateral_mm: float = 20.0
    bilateral_hu: float = 15.0
    bilateral_weight: float = 5.0
    gaussian_mm: float = 1.5
    gaussian_weight: float = 3.0
    iterations: int = 5
    margin_mm: float = 10.0  # the box around the mask the CRF may grow into
    # 3D fields larger than this run in overlapping slabs of slices (the CRF needs ~230 bytes per voxel:
    # 12 M voxels, ircadb17's liver box, took 2.7 GB in one field).
    max_voxels: int = 8_000_000
    # Scans whose slices are thinner than this keep the mask as it is (0: refine every scan).
    min_slice_mm: float = 0.0

    def applies_to(self, slice_mm: float) -> bool:
        """Whether a scan with slices ``slice_mm`` thick is refined (``min_slice_mm``)."""
        return slice_mm >= self.min_slice_mm


def _require_pydensecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:  # pragma: no cover - exercised where the package is missing
        raise CRFUnavailableError(f"Cannot refine with a dense CRF: {CRF_PACKAGE_HINT}") from exc
    return dcrf


def crf_available() -> bool:
    try:
        _require_pydensecrf()
    except CRFUnavailableError:
        return False
    return True


def _padded_box(mask: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> tuple[slice, ...] | None:
    box = bounding_box(mask)
    if box is None:
        return None
    out = []
    for s, size, sp in zip(box, mask.shape, spacing, strict=True):
        pad = int(np.ceil(margin_mm / sp))
        out.append(slice(max(s.start - pad, 0), min(s.stop + pad, size)))
    return tuple(out)


def inside_probability(mask: np.ndarray, spacing: tuple[float, ...], settings: CRFSettings) -> np.ndarray:
    """p(inside) per voxel of ``mask`` (2D or 3D): a sigmoid of the signed distance to the mask's edge."""
    mask = np.asarray(mask, dtype=bool)
    c = float(np.clip(settings.confidence, 0.5, 0.999))
    if settings.edge_mm <= 0:
        return np.where(mask, c, 1.0 - c).astype(np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    signed = np.where(mask, inside - 0.5 * min(spacing), -(outside - 0.5 * min(spacing)))
    p = 1.0 / (1.0 + np.exp(-signed / settings.edge_mm))
    return np.clip(p, 1.0 - c, c).astype(np.float32)


def saturation_mm(spacing: tuple[float, ...], settings: CRFSettings) -> float:
    """How far from the mask's edge :func:`inside_probability` reaches its clipped value (beyond, it is flat)."""
    c = float(np.clip(settings.confidence, 0.5, 0.999))
    return settings.edge_mm * float(np.log(c / (1.0 - c))) + 0.5 * min(spacing)


def _slab_inside_probability(sub: np.ndarray, lo: int, hi: int, spacing: tuple[float, ...],
                             settings: CRFSettings) -> np.ndarray:
    """:func:`inside_probability` of ``sub`` on slices ``lo:hi``, computed from those slices and enough slices
    either side to reach :func:`saturation_mm` (the same values as on the whole of ``sub``: a distance that
    needs slices further away saturates anyway), so memory follows the slab, not the box."""
    if settings.edge_mm <= 0 or (lo == 0 and hi == sub.shape[0]):
        return inside_probability(sub[lo:hi], spacing, settings)
    halo = int(np.ceil(saturation_mm(spacing, settings) / spacing[0])) + 1
    a, b = max(lo - halo, 0), min(hi + halo, sub.shape[0])
    window = sub[a:b]
    if window.all() or not window.any():  # no edge within reach: every voxel saturated
        return inside_probability(sub[lo:hi], spacing, replace(settings, edge_mm=0.0))
    return inside_probability(window, spacing, settings)[lo - a : hi - a]


def _features(shape: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float) -> list[np.ndarray]:
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) * (sp / sigma_mm) for n, sp in zip(shape, spacing,
                                                                                                 strict=True)],
                        indexing="ij")
    return [g.ravel() for g in grids]


def _crf_field(hu: np.ndarray, p_inside: np.ndarray, spacing: tuple[float, ...], settings: CRFSettings) -> np.ndarray:
    """Mean-field inference on one field (2D or 3D arrays of the same shape). Returns the inside mask."""
    dcrf = _require_pydensecrf()
    n = hu.size
    crf = dcrf.DenseCRF(n, 2)
    p = p_inside.ravel()
    unary = np.ascontiguousarray(-np.log(np.stack([1.0 - p, p])).astype(np.float32))
    crf.setUnaryEnergy(unary)
    if settings.gaussian_weight > 0:
        feats = np.ascontiguousarray(np.stack(_features(hu.shape, spacing, settings.gaussian_mm)), dtype=np.float32)
        crf.addPairwiseEnergy(feats, compat=float(settings.gaussian_weight))
    if settings.bilateral_weight > 0:
        pos = _features(hu.shape, spacing, settings.bilateral_mm)
        feats = np.ascontiguousarray(np.stack([*pos, (hu / settings.bilateral_hu).ravel().astype(np.float32)]),
                                     dtype=np.float32)
        crf.addPairwiseEnergy(feats, compat=float(settings.bilateral_weight))
    q = np.asarray(crf.inference(int(settings.iterations)), dtype=np.float32)
    return (q[1] > q[0]).reshape(hu.shape)


def _slabs(shape_kji: tuple[int, int, int], slice_mm: float, settings: CRFSettings):
    """(lo, hi, keep_lo, keep_hi) slice ranges that cover ``shape_kji``: slices lo..hi are refined together
    and keep_lo..keep_hi of them kept, each kept slice with ``bilateral_mm`` of context on both sides. A field
    holds at most ``max_voxels`` voxels, or one kept slice and its context where that is more."""
    nk, plane = shape_kji[0], shape_kji[1] * shape_kji[2]
    if nk * plane <= settings.max_voxels:
        yield 0, nk, 0, nk
        return
    overlap = int(np.ceil(max(settings.bilateral_mm, settings.gaussian_mm) / slice_mm))
    core = max(settings.max_voxels // plane - 2 * overlap, 1)
    for start in range(0, nk, core):
        stop = min(start + core, nk)
        yield max(start - overlap, 0), min(stop + overlap, nk), start, stop


def refine_with_crf(
    ct_kji: np.ndarray,
    mask_kji: np.ndarray,
    spacing_kji: tuple[float, float, float],
    settings: CRFSettings | None = None,
    within_kji: np.ndarray | None = None,
) -> np.ndarray:
    """The mask refined by a dense CRF on the CT (HU). Neither input is modified.

    Works on the mask's bounding box plus ``margin_mm``, in slabs of slices where that box is larger than
    ``max_voxels``; outside it the result is empty. ``within_kji``
    (e.g. the liver for a tumour) bounds the result. 2D mode refines each slice that holds the mask on
    its own and adds no slice.
    """
    settings = settings or CRFSettings()
    if settings.dims not in (2, 3):
        raise ValueError(f"CRFSettings.dims must be 2 or 3, got {settings.dims}")
    mask = np.asarray(mask_kji, dtype=bool)
    if mask.shape != ct_kji.shape:
        raise ValueError(f"mask shape {mask.shape} does not match CT shape {ct_kji.shape}")
    if not settings.applies_to(spacing_kji[0]):
        kept = mask.copy()
        return kept & np.asarray(within_kji, dtype=bool) if within_kji is not None else kept
    result = np.zeros_like(mask)
    box = _padded_box(mask, spacing_kji, settings.margin_mm)
    if box is None:
        return result
    if settings.dims == 2:  # no growth across slices in 2D
        box = (bounding_box(mask)[0], *box[1:])
    lo = settings.window_level - settings.window_width / 2.0
    hu = np.clip(np.asarray(ct_kji[box], dtype=np.float32), lo, lo + settings.window_width)  # a copy
    sub = mask[box]
    if settings.dims == 3:
        refined = np.zeros_like(sub)
        for lo, hi, keep_lo, keep_hi in _slabs(sub.shape, spacing_kji[0], settings):
            p_inside = _slab_inside_probability(sub, lo, hi, spacing_kji, settings)
            part = _crf_field(hu[lo:hi], p_inside, spacing_kji, settings)
            del p_inside
            refined[keep_lo:keep_hi] = part[keep_lo - lo : keep_hi - lo]
    else:
        spacing_ji = spacing_kji[1:]
        refined = np.zeros_like(sub)
        for k in range(sub.shape[0]):
            if sub[k].any():
                refined[k] = _crf_field(hu[k], inside_probability(sub[k], spacing_ji, settings), spacing_ji,
                                        settings)
    result[box] = refined
    if within_kji is not None:
        result &= np.asarray(within_kji, dtype=bool)
    if result.sum() < MIN_KEPT_FRACTION * mask.sum():
        # The CRF is a clean-up: one that takes most of a segment away (a segment a few slices thick, whose
        # every voxel lies near the field's edge) is wrong, so the mask stays as it was.
        kept = mask.copy()
        return kept & np.asarray(within_kji, dtype=bool) if within_kji is not None else kept
    return result


MIN_KEPT_FRACTION = 0.5  # a CRF result smaller than this fraction of its input is discarded


# Settings per kind of segment, chosen on the mean liver / tumour Dice over the four development cases
# (docs/RESULTS.md): an organ (no ``inside``) and a lesion (a segment ``inside`` another).
# The organ's CRF pays on thick slices only: it fills lobes that 5 mm slices' propagation misses; on thin
# slices it smooths a good mask away from the edges (one-box liver Dice without / with it, session 7: hcc0697
# 0.934 / 0.958, hcc2144 0.917 / 0.929, but lits117 0.952 / 0.951, ircadb17 0.969 / 0.964), and its 3D field
# of a thin-slice scan is the largest memory of a run (ircadb17's liver: 1.7 GB).
ORGAN_CRF = CRFSettings(min_slice_mm=3.0)
LESION_CRF = CRFSettings(edge_mm=0.0, confidence=0.9, gaussian_mm=1.0, bilateral_mm=3.0, bilateral_hu=20.0)


def crf_for_segments(requested: str | Sequence[str], segments: Sequence, what: str = "--crf") -> dict[str, CRFSettings]:
    """CRF settings by segment name for ``requested`` ("all", "auto" = all where pydensecrf2 is installed,
    "none", a comma-separated string or names) among
    ``segments`` (objects with ``name`` and ``inside``): :data:`LESION_CRF` for a segment inside another,
    :data:`ORGAN_CRF` otherwise. An unknown name is an error (naming ``what`` was asked) that lists the
    segments there are."""
    names = [n.strip() for n in (requested.split(",") if isinstance(requested, str) else requested) if n.strip()]
    if not names or names == ["none"]:
        return {}
    if names == ["auto"]:  # the default: every segment, where the package is installed (setup.sh installs it)
        if not crf_available():
            return {}
        names = ["all"]
    by_name = {s.name: s for s in segments}
    if names == ["all"]:
        names = list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LiverSAMError(
            f"{what}: no segment named {', '.join(repr(n) for n in unknown)}; the prompts have "
            f"{', '.join(repr(n) for n in by_name) or 'no segment'} (or give 'all')."
        )
    _require_pydensecrf()
    return {n: LESION_CRF if by_name[n].inside else ORGAN_CRF for n in names}

"""Prompts: what the user gives per segment and per slice, converted to voxel indices (IJK).

``PROMPTS.json``::

    {"coordinate_system": "LPS",            # or "RAS" (millimetres) or "IJK" (voxel indices i, j, k)
     "segments": [
       {"name": "liver", "label": 1,
        "boxes": [[[x0, y0, z], [x1, y1, z]]],   # two opposite corners on one axial slice
        "points": [[x, y, z]], "negative_points": [[x, y, z]],
        "markups": ["liver_roi.mrk.json"],        # optional Slicer markups (ROI -> box, point list -> points)
        "negative_markups": ["outside.mrk.json"],
        "propagate": false},
       {"name": "tumor", "label": 2, "inside": "liver", "boxes": [...]}]}

On a slice, SAM's (x, y) is (i, j): column and row of the voxel array [k, j, i].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PromptError
from .geometry import ImageGeometry, ras_to_lps
from .segmentation import default_color
from .terminology import is_liver_name, is_tumour_name

log = logging.getLogger(__name__)

# Files are validated by :mod:`liversam.prompt_schema` (pydantic), imported only where a file is read, so the
# prompt types stay importable without pydantic (inside 3D Slicer's Python, which does not ship it).
COORDINATE_SYSTEMS = ("LPS", "RAS", "IJK")

__all__ = [
    "COORDINATE_SYSTEMS",
    "SegmentPrompts",
    "SlicePrompts",
    "box_from_corners",
    "load_prompts",
    "markups_to_prompts",
    "parse_prompts",
    "point_to_slice",
]


@dataclass
class SlicePrompts:
    """Prompts on one axial slice, in voxel indices: boxes (i0, j0, i1, j1), points (i, j)."""

    boxes_ij: list[tuple[float, float, float, float]] = field(default_factory=list)
    points_pos_ij: list[tuple[float, float]] = field(default_factory=list)
    points_neg_ij: list[tuple[float, float]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.boxes_ij or self.points_pos_ij)

    def merged(self, other: SlicePrompts) -> SlicePrompts:
        return SlicePrompts(
            self.boxes_ij + other.boxes_ij,
            self.points_pos_ij + other.points_pos_ij,
            self.points_neg_ij + other.points_neg_ij,
        )


@dataclass
class SegmentPrompts:
    """All prompts of one segment (structure) across slices."""

    name: str
    label: int
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    slices: dict[int, SlicePrompts] = field(default_factory=dict)
    inside: str | None = None
    propagate: bool = False

    def add(self, k: int, prompts: SlicePrompts) -> None:
        self.slices[k] = self.slices[k].merged(prompts) if k in self.slices else prompts


# --- conversion helpers -----------------------------------------------------------------------------


def _to_ijk(
    points: np.ndarray, system: str, geometry: ImageGeometry, ijk_geometry: ImageGeometry | None = None
) -> np.ndarray:
    """Points in ``system`` to voxel indices of ``geometry``. IJK values are voxel indices of ``ijk_geometry`` (the
    input file's grid when the CT is segmented on another grid: a sagittal or coronal CT reoriented to axial
    slices, :mod:`liversam.axial_orientation`); None: of ``geometry``."""
    if system == "IJK":
        if ijk_geometry is None or ijk_geometry is geometry:
            return np.asarray(points, dtype=float)
        return _grid_to_grid(ijk_geometry, geometry, points)
    if system == "RAS":
        points = ras_to_lps(points)
    return geometry.lps_to_ijk(points)


def _grid_to_grid(source: ImageGeometry, target: ImageGeometry, points_ijk) -> np.ndarray:
    """Voxel indices of ``source`` to those of ``target`` through LPS; exact when one grid permutes the other's
    voxels (the affine is rounded to whole numbers when it is one within 1e-6)."""
    matrix = np.linalg.inv(target.ijk_to_lps_matrix) @ source.ijk_to_lps_matrix
    if np.allclose(matrix, np.round(matrix), atol=1e-6):
        matrix = np.round(matrix)
    return np.asarray(points_ijk, dtype=float) @ matrix[:3, :3].T + matrix[:3, 3]


def _describe_extent(geometry: ImageGeometry, system: str, ijk_geometry: ImageGeometry | None = None) -> str:
    ni, nj, nk = (ijk_geometry or geometry).size_ijk
    if system == "IJK":
        return f"i 0..{ni - 1}, j 0..{nj - 1}, k 0..{nk - 1}"
    corners = np.array(
        [[a, b, c] for a in (0, ni - 1) for b in (0, nj - 1) for c in (0, nk - 1)], dtype=float
    )
    world = geometry.ijk_to_lps(corners) if system == "LPS" else geometry.ijk_to_ras(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    return ", ".join(f"{axis} {a:.1f}..{b:.1f} mm" for axis, a, b in zip(system, lo, hi, strict=True))


def _systems_placing_inside(
    original, geometry: ImageGeometry, systems: tuple[str, ...], ijk_geometry: ImageGeometry | None = None
) -> list[str]:
    """The coordinate systems among ``systems`` in which the values ``original`` lie inside the volume."""
    values = np.atleast_2d(np.asarray(original, dtype=float))
    return [other for other in systems
            if bool(np.all(geometry.contains_ijk(_to_ijk(values, other, geometry, ijk_geometry))))]


def _check_inside(
    ijk: np.ndarray,
    geometry: ImageGeometry,
    what: str,
    original,
    system: str,
    alternatives: tuple[str, ...] = COORDINATE_SYSTEMS,
    system_key: str = "coordinate_system",
    ijk_geometry: ImageGeometry | None = None,
) -> None:
    """Refuse prompts outside the volume; name the coordinate system that would put them inside, if one does."""
    if bool(np.all(geometry.contains_ijk(ijk))):
        return
    others = _systems_placing_inside(original, geometry, tuple(s for s in alternatives if s != system), ijk_geometry)
    hint = (
        f" Read as {' or '.join(others)}, these values lie inside the volume: if they were copied in that system "
        f'(3D Slicer shows RAS), write "{system_key}": "{others[0]}".'
        if others
        else " Check the coordinate system and the values."
    )
    raise PromptError(
        f"{what} {np.round(np.asarray(original, dtype=float), 2).tolist()} ({system}) lies outside the volume "
        f"(volume extent: {_describe_extent(geometry, system, ijk_geometry)}).{hint}"
    )


def _slice_index(
    k_values: np.ndarray, what: str, geometry: ImageGeometry, ijk_geometry: ImageGeometry | None = None
) -> int:
    ks = np.asarray(k_values, dtype=float)
    if float(ks.max() - ks.min()) > 0.5:
        if ijk_geometry is not None and ijk_geometry is not geometry:
            raise PromptError(
                f"{what} spans axial slices k={ks.min():.2f}..{ks.max():.2f} of the CT reoriented to axial slices; "
                f"{_reoriented_one_slice_rule(ijk_geometry)}"
            )
        raise PromptError(
            f"{what} spans slices k={ks.min():.2f}..{ks.max():.2f}; {_one_slice_rule(geometry)}"
        )
    k = int(round(float(ks.mean())))
    return min(max(k, 0), geometry.size_ijk[2] - 1)


def _one_slice_rule(geometry: ImageGeometry) -> str:
    """Where a box's two corners must lie; for a CT whose slices are not axial, which plane they are in."""
    from .ct_io import slice_plane_name

    normal = np.asarray(geometry.direction_lps, dtype=float)[:, 2]
    plane = slice_plane_name(normal)
    if plane == "axial":
        return "a box's two corners must lie on one axial slice (same z / k)."
    axis = "xyz"[int(np.argmax(np.abs(normal)))]
    return (
        f"a box's two corners must lie on one slice of the CT (same k). This CT's slices are {plane}, not axial "
        f"(its k axis runs along {axis}): LiverSAM segments the CT's own slices, so a box's corners must share their "
        f"{axis} value (or k in IJK), not z. To draw boxes on axial slices, first reorient the CT to axial slices "
        "(e.g. 3D Slicer's Orient Scalar Volume module, orientation Axial) and save it."
    )


def _reoriented_one_slice_rule(ijk_geometry: ImageGeometry) -> str:
    """The one-slice rule for a sagittal or coronal CT that LiverSAM segments on its axial slices."""
    from .ct_io import slice_plane_name

    direction = np.asarray(ijk_geometry.direction_lps, dtype=float)
    plane = slice_plane_name(direction[:, 2])
    axis_si = "ijk"[int(np.argmax(np.abs(direction[2, :])))]
    return (
        f"a box's two corners must lie on one axial slice (same z in LPS / RAS). This CT is stored in {plane} slices "
        f"and LiverSAM segments it on its axial slices (reoriented without interpolation), so in IJK (the file's "
        f"voxel indices) a box's corners must share their {axis_si} (the file's axis along S-I), not k."
    )


def _numbers(values, shape: tuple[int, ...], what: str, expected: str) -> np.ndarray | None:
    """``values`` as a finite float array of ``shape``, or None when it has another shape."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be {expected} with numbers, got {values!r}.") from None
    if arr.shape != shape:
        return None
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{what} must hold finite numbers, got {values!r}.")
    return arr


#: A box drawn a little past the edge of the image (a liver touching the border of a cropped CT) is clipped to the
#: slice when at least this fraction of its area lies inside; a box mostly outside is refused (more likely values in
#: another coordinate system, which the refusal names).
MIN_INSIDE_FRACTION_TO_CLIP = 0.5


def _inside_fraction(ijk: np.ndarray, geometry: ImageGeometry) -> float:
    """The fraction of an axial box's area (corners ``ijk``, continuous voxel indices) on the slice's voxels."""
    lo, hi = ijk[:, :2].min(axis=0), ijk[:, :2].max(axis=0)
    upper = np.asarray(geometry.size_ijk[:2], dtype=float) - 1
    inside = np.clip(np.minimum(hi, upper) - np.maximum(lo, 0.0), 0.0, None)
    area = float(np.prod(hi - lo))
    return float(np.prod(inside)) / area if area > 0 else 0.0


def _clip_box_past_the_edge(
    ijk: np.ndarray, original: np.ndarray, system: str, geometry: ImageGeometry, what: str,
    ijk_geometry: ImageGeometry | None, alternatives: tuple[str, ...] = COORDINATE_SYSTEMS,
) -> np.ndarray:
    """A box not wholly inside the volume (corners ``ijk``): clipped in-plane when its slice lies in the volume, at
    least :data:`MIN_INSIDE_FRACTION_TO_CLIP` of its area inside and no other coordinate system puts it wholly inside
    (logged); refused when its slice lies in the volume but most of it outside; else returned as it is, for
    :func:`_check_inside` to refuse (naming the coordinate system that fits, if one does)."""
    others = tuple(s for s in alternatives if s != system)
    on_a_slice = bool(np.all(geometry.contains_ijk(np.c_[np.zeros((len(ijk), 2)), ijk[:, 2]])))
    if not on_a_slice or _systems_placing_inside(original, geometry, others, ijk_geometry):
        return ijk
    fraction = _inside_fraction(ijk, geometry)
    if fraction >= MIN_INSIDE_FRACTION_TO_CLIP:
        log.warning("%s reaches past the edge of the volume: clipped to it (%.0f %% of the box lies inside), as 3D "
                    "Slicer's ROI boxes are; if the box is not where you drew it, check the coordinate system",
                    what, 100.0 * fraction)  # fmt: skip
        clipped = ijk.astype(float).copy()
        clipped[:, :2] = np.clip(clipped[:, :2], 0.0, np.asarray(geometry.size_ijk[:2], dtype=float) - 1)
        return clipped
    if fraction > 0:
        raise PromptError(
            f"{what} {np.round(original, 2).tolist()} ({system}) reaches far past the edge of the volume: only "
            f"{100 * fraction:.0f} % of it lies inside (volume extent: {_describe_extent(geometry, system, ijk_geometry)}"
            "). Check the coordinate system and the values; a box at most half outside is clipped to the volume."
        )
    return ijk


def box_from_corners(
    corners, system: str, geometry: ImageGeometry, what: str, ijk_geometry: ImageGeometry | None = None,
    alternatives: tuple[str, ...] = COORDINATE_SYSTEMS,
) -> tuple[int, tuple]:
    """Two opposite corners of an axial box -> (k, (i0, j0, i1, j1)) in voxel indices of ``geometry``
    (``ijk_geometry``: the grid IJK values refer to, see :func:`_to_ijk`; ``alternatives``: the coordinate systems a
    refusal may suggest, and that keep a box past the edge from being clipped when they fit it)."""
    arr = _numbers(corners, (2, 3), what, "two corners [[x0, y0, z], [x1, y1, z]]")
    if arr is None:
        raise PromptError(f"{what} must be two corners [[x0, y0, z], [x1, y1, z]], got {corners!r}.")
    ijk = _to_ijk(arr, system, geometry, ijk_geometry)
    if not bool(np.all(geometry.contains_ijk(ijk))):
        ijk = _clip_box_past_the_edge(ijk, arr, system, geometry, what, ijk_geometry, alternatives)
    _check_inside(ijk, geometry, what, arr, system, alternatives, ijk_geometry=ijk_geometry)
    k = _slice_index(ijk[:, 2], what, geometry, ijk_geometry)
    i0, i1 = sorted(ijk[:, 0])
    j0, j1 = sorted(ijk[:, 1])
    if i1 - i0 < 1.0 or j1 - j0 < 1.0:
        raise PromptError(
            f"{what} has (almost) zero area: {i1 - i0:.2f} x {j1 - j0:.2f} voxels. Draw a box around the structure."
        )
    return k, (float(i0), float(j0), float(i1), float(j1))


def point_to_slice(
    point, system: str, geometry: ImageGeometry, what: str, markups: bool = False,
    ijk_geometry: ImageGeometry | None = None, alternatives: tuple[str, ...] = COORDINATE_SYSTEMS,
) -> tuple[int, tuple[float, float]]:
    """A point -> (k, (i, j)); ``markups``: it comes from a Slicer markups file (LPS or RAS, key coordinateSystem)."""
    arr = _numbers(point, (3,), what, "[x, y, z]")
    if arr is None:
        raise PromptError(f"{what} must be [x, y, z], got {point!r}.")
    ijk = _to_ijk(arr[None], system, geometry, ijk_geometry)
    if markups:
        _check_inside(ijk, geometry, what, arr, system, ("LPS", "RAS"), "coordinateSystem")
    else:
        _check_inside(ijk, geometry, what, arr, system, alternatives, ijk_geometry=ijk_geometry)
    k = int(round(float(ijk[0, 2])))
    return min(max(k, 0), geometry.size_ijk[2] - 1), (float(ijk[0, 0]), float(ijk[0, 1]))


# --- Slicer markups (.mrk.json) -----------------------------------------------------------------------


def markups_to_prompts(
    path: str | Path, geometry: ImageGeometry, positive: bool = True
) -> dict[int, SlicePrompts]:
    """Read a Slicer markups file: ROIs become boxes on every slice they cover, points become clicks.

    The file is validated against :class:`liversam.prompt_schema.MarkupsFile` first; control points whose
    ``positionStatus`` is ``undefined`` (placed in Slicer's list but never positioned) are skipped.
    """
    path = Path(path)
    from .prompt_schema import read_json_file, validate_markups

    data = read_json_file(path, what="Markups file")
    markups = validate_markups(data, f"'{path}'").markups
    out: dict[int, SlicePrompts] = {}

    def add(k: int, prompts: SlicePrompts) -> None:
        out[k] = out[k].merged(prompts) if k in out else prompts

    for index, markup in enumerate(markups):
        system = markup.coordinateSystem
        where = f"'{path}': markups[{index}]"
        if markup.type == "ROI":
            center = np.asarray(markup.center, dtype=float)
            size = np.asarray(markup.size, dtype=float)
            axes = np.asarray(markup.orientation or np.eye(3).ravel(), dtype=float).reshape(3, 3)
            signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=float)
            corners = center + (signs * size / 2.0) @ axes.T
            ijk = _to_ijk(corners, system, geometry)
            _check_inside(
                ijk.mean(axis=0, keepdims=True), geometry, f"{where}.center (ROI centre)", center, system,
                alternatives=("LPS", "RAS"), system_key="coordinateSystem",
            )  # fmt: skip
            lo, hi = ijk.min(axis=0), ijk.max(axis=0)
            upper = np.asarray(geometry.size_ijk, dtype=float) - 1
            lo, hi = np.clip(lo, 0, upper), np.clip(hi, 0, upper)
            if hi[0] - lo[0] < 1 or hi[1] - lo[1] < 1:
                raise PromptError(f"{where}: the ROI has (almost) zero area on the axial slices.")
            k_first, k_last = int(np.ceil(lo[2] - 0.5)), int(np.floor(hi[2] + 0.5))
            k_first, k_last = max(k_first, 0), min(k_last, geometry.size_ijk[2] - 1)
            for k in range(k_first, max(k_first, k_last) + 1):
                add(k, SlicePrompts(boxes_ij=[(lo[0], lo[1], hi[0], hi[1])]))
        else:
            for cp_index, cp in enumerate(markup.controlPoints):
                if cp.positionStatus == "undefined":
                    continue
                k, ij = point_to_slice(
                    cp.position, system, geometry, f"{where}.controlPoints[{cp_index}].position", markups=True
                )
                add(k, SlicePrompts(points_pos_ij=[ij]) if positive else SlicePrompts(points_neg_ij=[ij]))
    if not out:
        raise PromptError(f"'{path}' holds no control points or ROI.")
    return out


# --- PROMPTS.json ---------------------------------------------------------------------------------------


def _color(values: list[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    scale = 255.0 if max(values) > 1 else 1.0
    return (values[0] / scale, values[1] / scale, values[2] / scale)


def parse_prompts(
    data: dict, geometry: ImageGeometry, base_dir: str | Path = ".", source: str = "prompts",
    ijk_geometry: ImageGeometry | None = None, other_systems: bool = True,
) -> list[SegmentPrompts]:
    """Validate a prompts dictionary (schema: :mod:`liversam.prompt_schema`) and convert it to IJK prompts.

    The prompts come out in voxel indices of ``geometry``; ``ijk_geometry`` is the grid whose voxel indices a file in
    IJK gives (the input file's, when ``geometry`` is its axial reorientation); None: ``geometry``.
    ``other_systems`` False: the coordinate system is certain (a server request in IJK), so a refusal never suggests
    another, and another's fit never stops a box past the edge from being clipped.

    Raises :class:`PromptError` whose message gives the JSON path of the offending value.
    """
    from .prompt_schema import validate_prompts

    spec = validate_prompts(data, source)
    system = spec.coordinate_system
    alternatives = COORDINATE_SYSTEMS if other_systems else (system,)
    segments: list[SegmentPrompts] = []
    for index, entry in enumerate(spec.segments):
        name = entry.name
        where = f"{source}: segments[{index}]"
        seg = SegmentPrompts(
            name=name,
            label=entry.label if entry.label is not None else index + 1,
            color=_color(entry.color) or default_color(name, index),
            inside=entry.inside,
            propagate=entry.propagate,
        )
        for b, corners in enumerate(entry.boxes):
            k, box = box_from_corners(corners, system, geometry, f"{where}.boxes[{b}] (segment '{name}' box {b})",
                                      ijk_geometry, alternatives)
            seg.add(k, SlicePrompts(boxes_ij=[box]))
        for p, point in enumerate(entry.points):
            k, ij = point_to_slice(point, system, geometry, f"{where}.points[{p}] (segment '{name}' point {p})",
                                   ijk_geometry=ijk_geometry, alternatives=alternatives)
            seg.add(k, SlicePrompts(points_pos_ij=[ij]))
        for p, point in enumerate(entry.negative_points):
            k, ij = point_to_slice(
                point, system, geometry, f"{where}.negative_points[{p}] (segment '{name}' negative point {p})",
                ijk_geometry=ijk_geometry, alternatives=alternatives,
            )
            seg.add(k, SlicePrompts(points_neg_ij=[ij]))
        for negative in (False, True):
            for file in entry.markup_files(negative):
                for k, prompts in markups_to_prompts(Path(base_dir) / file, geometry, not negative).items():
                    seg.add(k, prompts)
        if not any(not sp.is_empty() for sp in seg.slices.values()):
            raise PromptError(f"{where}: segment '{name}' has no box or positive point; give at least one of them.")
        for k, sp in seg.slices.items():
            if sp.is_empty():
                raise PromptError(
                    f"{where}: segment '{name}' has only negative points on slice k={k}; add a box or a positive "
                    "point there."
                )
        segments.append(seg)
    _lesions_inside_the_liver(spec.segments, segments, source)
    return segments


def _lesions_inside_the_liver(entries, segments: list[SegmentPrompts], source: str) -> None:
    """A liver tumour's segment (named "tumor", "lesion", "HCC", ... :func:`~liversam.terminology.is_tumour_name`)
    whose entry does not say ``inside`` is kept inside the file's one liver segment, in place. Without a
    container a tumour is neither clipped to the liver nor refined against its parenchyma: one-box tumour Dice on
    the four development cases falls from 0.808 to 0.457 (docs/RESULTS.md, session 25). ``"inside": null`` keeps a
    segment on its own."""
    livers = [seg.name for seg in segments if is_liver_name(seg.name)]
    unsaid = [(index, seg) for index, (entry, seg) in enumerate(zip(entries, segments, strict=True))
              if "inside" not in entry.model_fields_set and is_tumour_name(seg.name)]
    if not unsaid or not livers:
        return
    if len(livers) > 1:
        log.info("%s: %d segments are named as the liver (%s): a tumour's segment without \"inside\" stays on its "
                 "own; say which liver it is inside", source, len(livers), ", ".join(livers))
        return
    by_name = {seg.name: seg for seg in segments}
    for index, seg in unsaid:
        container, steps = by_name[livers[0]], 0
        while container.inside in by_name and container.inside != seg.name and steps < len(segments):
            container, steps = by_name[container.inside], steps + 1
        if container.inside == seg.name:
            continue  # the liver is (through others) inside this segment: the default would make a loop
        seg.inside = livers[0]
        log.info("%s: segments[%d] ('%s') gives no \"inside\"; kept inside '%s' as a liver tumour (write "
                 "\"inside\": null to segment it on its own)", source, index, seg.name, livers[0])


def load_prompts(
    path: str | Path, geometry: ImageGeometry, ijk_geometry: ImageGeometry | None = None
) -> list[SegmentPrompts]:
    """Read PROMPTS.json (or a single Slicer .mrk.json, taken as one segment named 'liver'); ``ijk_geometry``: the
    grid a PROMPTS.json in IJK refers to, when it is not ``geometry`` (see :func:`parse_prompts`)."""
    path = Path(path)
    if path.name.lower().endswith(".mrk.json"):
        return _markups_as_liver(path, geometry)
    from .prompt_schema import read_json_file

    data = read_json_file(path, what="Prompts file")
    if _is_markups_document(data):
        log.info("'%s' is a 3D Slicer markups file (it has 'markups', no 'segments'): one segment, 'liver'", path)
        return _markups_as_liver(path, geometry)
    return parse_prompts(data, geometry, base_dir=path.parent, source=f"'{path}'", ijk_geometry=ijk_geometry)


def _is_markups_document(data) -> bool:
    """A 3D Slicer markups document (what Slicer saves as .mrk.json) rather than a PROMPTS.json."""
    return isinstance(data, dict) and "markups" in data and "segments" not in data


def _markups_as_liver(path: Path, geometry: ImageGeometry) -> list[SegmentPrompts]:
    seg = SegmentPrompts(name="liver", label=1, color=default_color("liver", 0))
    for k, prompts in markups_to_prompts(path, geometry).items():
        seg.add(k, prompts)
    return [seg]

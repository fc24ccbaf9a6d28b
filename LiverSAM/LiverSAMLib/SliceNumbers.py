"""The slice numbers the module shows: the CT's own voxel index, the (i, j, k) of Slicer's Data Probe.

LiverSAM works on a CT's axial slices: for a CT stored in sagittal or coronal slices its *working grid* is the axial
copy of ``liversam.axial_orientation`` (voxels permuted and flipped), and every slice number the server and the core
return (review report, propagation tracks, lesion table, per-slice scores, fixed slices, a fix's job stage) is a
working-grid ``k``. In Slicer the user sees the volume's own IJK (the Data Probe, ``DataProbe.py``
``generateIJKPixelDescription``: ``(i, j, k)``): on such a CT, scrolling the axial (Red) view changes its ``i`` or ``j``
(often counting from the top down), not its ``k``. A :class:`SliceNumbering` turns a working ``k`` into that index; for
an axial or an oblique CT (its working grid is its own grid) it is ``k`` itself. The shown numbers always name their
index letter (*Slices (k)*, "(index k)").

The Data Probe also shows ``[slice: N]`` on a CT loaded from DICOM: the InstanceNumber of image ``k`` (the volume's
``DICOM.instanceNumbers`` attribute, which Slicer's DICOMScalarVolumePlugin writes in ``k`` order), the number a PACS
shows. It often runs the other way (instance 1 at the head). The module shows it beside the index where it names the
axial slices one to one (:func:`instance_numbers_of`); it never replaces the index. Plain Python (no numpy, Qt or
MRML; ``liversam.axial_orientation`` is named for type checking only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liversam.axial_orientation import AxialReorientation

AXIS_NAMES = "ijk"


@dataclass(frozen=True)
class SliceNumbering:
    """Working-grid slice ``k`` <-> the volume's own voxel index along the axis that ``k`` runs along.

    ``axis``: the volume's own IJK axis (0 i, 1 j, 2 k); ``size``: the number of voxels along it; ``reversed``: its
    index runs against the working ``k`` (from superior to inferior); ``plane``: 'sagittal' or 'coronal' for a CT
    stored in those slices, None when the working grid is the volume's own; ``instance_numbers``: the DICOM
    InstanceNumber of each own index (the Data Probe's ``[slice: N]``), when they name these slices one to one
    (:func:`instance_numbers_of`), else None."""

    axis: int = 2
    size: int = 0
    reversed: bool = False
    plane: str | None = None
    instance_numbers: tuple[int, ...] | None = None

    @staticmethod
    def of(reorientation: AxialReorientation | None) -> SliceNumbering:
        """The numbering of a volume with this axial reorientation (None: an axial or oblique volume: ``k``)."""
        if reorientation is None:
            return SliceNumbering()
        axis = int(reorientation.axes[2])
        return SliceNumbering(axis, int(reorientation.input_geometry.size_ijk[axis]), bool(reorientation.flips[2]),
                              reorientation.input_plane)  # fmt: skip

    def with_instance_numbers(self, numbers: Sequence[int] | None) -> SliceNumbering:
        """This numbering with the DICOM instance numbers of its own index (None: without)."""
        return replace(self, instance_numbers=tuple(numbers) if numbers else None)

    @property
    def axis_name(self) -> str:
        return AXIS_NAMES[self.axis]

    @property
    def is_identity(self) -> bool:
        return self.axis == 2 and not self.reversed

    def number(self, k: int) -> int:
        """The volume's own index of working slice ``k``."""
        return self.size - 1 - int(k) if self.reversed else int(k)

    def working_k(self, number: int) -> int:
        """The working slice of the volume's own index ``number`` (the inverse of :meth:`number`)."""
        return self.size - 1 - int(number) if self.reversed else int(number)

    def span(self, first_k: int, last_k: int) -> tuple[int, int]:
        """The lowest and highest shown number of working slices ``first_k .. last_k``."""
        a, b = self.number(first_k), self.number(last_k)
        return min(a, b), max(a, b)

    def first_shown(self, first_k: int, last_k: int) -> int:
        """The working slice shown first (lowest number) of the range ``first_k .. last_k``."""
        return last_k if self.reversed else first_k

    def text(self, first_k: int, last_k: int | None = None) -> str:
        """``"120"`` or ``"118-125"`` (lowest number first)."""
        low, high = self.span(first_k, first_k if last_k is None else last_k)
        return str(low) if low == high else f"{low}-{high}"

    def list_text(self, ks) -> str:
        """Working slices as shown numbers, in increasing order: ``"40, 41, 57"``."""
        return ", ".join(str(n) for n in sorted(self.number(k) for k in ks))

    def column_title(self, title: str) -> str:
        """A table column's title with the index its numbers are: ``"Slices (k)"``, ``"Slices (j)"``."""
        return f"{title} ({self.axis_name})"

    def explanation(self) -> str:
        """What the numbers are, for a tooltip (every CT: the Data Probe also shows a DICOM CT's instance number)."""
        text = (f"Slice numbers are this CT's own voxel index {self.axis_name}, as in the (i, j, k) of Slicer's Data "
                "Probe, counted from 0.")  # fmt: skip
        if self.plane is not None:
            order = "from the top down" if self.reversed else "from the bottom up"
            text += (f" This CT is stored in {self.plane} slices: its index {self.axis_name} runs along the axial "
                     f"direction {order}.")  # fmt: skip
        if self.instance_numbers:
            text += (" The Data Probe's [slice: N] is the DICOM instance number, another number: point at a row's "
                     "slices to see theirs.")  # fmt: skip
        else:
            text += " They are not DICOM instance numbers (the Data Probe's [slice: N] on a CT loaded from DICOM)."
        return text

    def index_note(self) -> str:
        """What a status line's slice numbers are: ``"(index k)"``."""
        return f"(index {self.axis_name})"

    def instance_text(self, first_k: int, last_k: int | None = None) -> str:
        """The DICOM instance numbers of working slices ``first_k .. last_k`` (``"DICOM instance numbers 279-286"``),
        or "" without them."""
        if not self.instance_numbers:
            return ""
        own = self.span(first_k, first_k if last_k is None else last_k)
        values = [self.instance_numbers[n] for n in own if 0 <= n < len(self.instance_numbers)]
        if not values:
            return ""
        low, high = min(values), max(values)
        if low == high:
            return f"DICOM instance number {low} (the Data Probe's [slice: {low}])"
        return f"DICOM instance numbers {low}-{high} (the Data Probe's [slice: N])"

    def status(self, text: str) -> str:
        """A status text of the server or the core (a fix's job stage: "re-propagating 'liver' from slice 40") with its
        slice numbers shown as the volume's own index and, when it names a slice, :meth:`index_note`."""
        if not text or not _SLICE_PHRASE.search(text):
            return text
        return f"{self.renumber(text)} {self.index_note()}"

    def renumber(self, text: str) -> str:
        """``text`` (the core's review reasons) with every working slice number it names ("slice 40", "slices 42-43",
        "slices 40, 42-43 and 50", "slices 40-106, 31 of them") shown as the volume's own index."""
        if self.is_identity or not text:
            return text
        return _SLICE_PHRASE.sub(lambda m: self._renumber_phrase(m), text)

    def _renumber_phrase(self, match: re.Match) -> str:
        runs = []
        for run in _RUN.findall(match.group(2)):
            first, _, last = run.partition("-")
            runs.append(self.span(int(first), int(last or first)))
        runs.sort()
        texts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
        joined = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
        return f"{match.group(1)} {joined}"


_RUN_PATTERN = r"\d+(?:-\d+)?"
_RUN = re.compile(_RUN_PATTERN)
# "slice(s)" and its runs joined by ", " or " and " (", 31 of them" is a count, not a run)
_SLICE_PHRASE = re.compile(rf"\b(slices?) ({_RUN_PATTERN}(?:(?:, (?!\d+ of them)| and ){_RUN_PATTERN})*)")


def instance_numbers_of(attribute: str | None, slices: int) -> tuple[int, ...] | None:
    """The DICOM InstanceNumber of each of a volume's ``slices`` k slices, from its ``DICOM.instanceNumbers`` attribute
    (Slicer's DICOMScalarVolumePlugin: one value per slice, in k order, "?" where the tag is missing), when they can
    stand for the slices one to one: one integer per slice, strictly increasing or decreasing along k (else a range of
    slices would not be a range of instance numbers). None otherwise (no attribute, a missing or repeated number, a
    cropped or resampled volume that kept the attribute)."""
    values = (attribute or "").split()
    if not values or len(values) != int(slices):
        return None
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        return None
    steps = [b - a for a, b in zip(numbers, numbers[1:], strict=False)]
    if steps and not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
        return None
    return numbers

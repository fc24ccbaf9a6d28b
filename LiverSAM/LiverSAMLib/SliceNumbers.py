"""The slice numbers the module shows: the CT's own voxel index, as Slicer's Data Probe shows it (numpy only).

LiverSAM works on a CT's axial slices: for a CT stored in sagittal or coronal slices its *working grid* is the axial
copy of ``liversam.axial_orientation`` (voxels permuted and flipped), and every slice number the server and the core
return (review report, propagation tracks, lesion table, per-slice scores, fixed slices) is a working-grid ``k``. In
Slicer the user sees the volume's own IJK (the Data Probe, ``DataProbe.py`` ``generateIJKPixelDescription``): on such
a CT, scrolling the axial (Red) view changes its ``i`` or ``j`` (often counting from the top down), not its ``k``. A
:class:`SliceNumbering` turns a working ``k`` into that index; for an axial or an oblique CT (its working grid is its
own grid) it is ``k`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from liversam.axial_orientation import AxialReorientation

AXIS_NAMES = "ijk"


@dataclass(frozen=True)
class SliceNumbering:
    """Working-grid slice ``k`` <-> the volume's own voxel index along the axis that ``k`` runs along.

    ``axis``: the volume's own IJK axis (0 i, 1 j, 2 k); ``size``: the number of voxels along it; ``reversed``: its
    index runs against the working ``k`` (from superior to inferior); ``plane``: 'sagittal' or 'coronal' for a CT
    stored in those slices, None when the working grid is the volume's own."""

    axis: int = 2
    size: int = 0
    reversed: bool = False
    plane: str | None = None

    @staticmethod
    def of(reorientation: AxialReorientation | None) -> SliceNumbering:
        """The numbering of a volume with this axial reorientation (None: an axial or oblique volume: ``k``)."""
        if reorientation is None:
            return SliceNumbering()
        axis = int(reorientation.axes[2])
        return SliceNumbering(axis, int(reorientation.input_geometry.size_ijk[axis]), bool(reorientation.flips[2]),
                              reorientation.input_plane)  # fmt: skip

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
        """A table column's title: ``title`` itself, or ``"title (j)"`` on a CT stored in sagittal / coronal slices."""
        return title if self.plane is None else f"{title} ({self.axis_name})"

    def explanation(self) -> str:
        """One sentence for a tooltip or a label; empty for an axial or oblique CT."""
        if self.plane is None:
            return ""
        order = "from the top down" if self.reversed else "from the bottom up"
        return (f"This CT is stored in {self.plane} slices: slice numbers are its own voxel index {self.axis_name} "
                f"(as the Data Probe shows it), which runs along the axial direction {order}.")  # fmt: skip

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

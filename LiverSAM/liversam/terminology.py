"""Standard codes for the structures LiverSAM segments: SNOMED CT codes and Slicer terminology strings.

The same :class:`Terminology` feeds the ``.seg.nrrd`` writer (Slicer's ``TerminologyEntry`` tag), the
DICOM SEG writer (Segmented Property Category / Type / Anatomic Region code sequences) and the Slicer
module. Codes follow DICOM PS3.16 (CID 7150 categories, CID 7166 / 7159 types) as used by 3D Slicer's
"Segmentation category and type - DICOM master list" and SlicerTotalSegmentator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SLICER_CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning), e.g. SCT 10200004 Liver."""

    value: str
    scheme: str
    meaning: str

    def slicer_string(self) -> str:
        """``SCHEME^VALUE^MEANING`` as in Slicer terminology strings."""
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def matches(self, other: Code | None) -> bool:
        return other is not None and self.scheme == other.scheme and self.value == other.value


EMPTY_SLICER_CODE = "^^"

ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
LIVER = Code("10200004", "SCT", "Liver")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")


@dataclass(frozen=True)
class Terminology:
    """What a segment is, in codes. ``default_label`` is its value in LiverSAM labelmaps (0: none)."""

    category: Code
    type: Code
    anatomic_region: Code | None = None
    type_modifier: Code | None = None
    anatomic_region_modifier: Code | None = None
    default_label: int = 0
    # Recommended display colour, RGB 0..1.
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def slicer_string(self) -> str:
        """The Slicer ``TerminologyEntry`` string (context~category~type~modifier~anat. context~region~modifier)."""

        def code_or_empty(code: Code | None) -> str:
            return code.slicer_string() if code is not None else EMPTY_SLICER_CODE

        return "~".join(
            [
                SLICER_CATEGORY_CONTEXT,
                self.category.slicer_string(),
                self.type.slicer_string(),
                code_or_empty(self.type_modifier),
                SLICER_ANATOMIC_CONTEXT,
                code_or_empty(self.anatomic_region),
                code_or_empty(self.anatomic_region_modifier),
            ]
        )

    def slicerio_dict(self) -> dict:
        """The terminology as ``slicerio`` represents it (lists [scheme, value, meaning])."""
        entry: dict = {
            "contextName": SLICER_CATEGORY_CONTEXT,
            "category": [self.category.scheme, self.category.value, self.category.meaning],
            "type": [self.type.scheme, self.type.value, self.type.meaning],
        }
        if self.type_modifier is not None:
            entry["typeModifier"] = [
                self.type_modifier.scheme,
                self.type_modifier.value,
                self.type_modifier.meaning,
            ]
        entry["anatomicContextName"] = SLICER_ANATOMIC_CONTEXT
        if self.anatomic_region is not None:
            region = self.anatomic_region
            entry["anatomicRegion"] = [region.scheme, region.value, region.meaning]
            if self.anatomic_region_modifier is not None:
                mod = self.anatomic_region_modifier
                entry["anatomicRegionModifier"] = [mod.scheme, mod.value, mod.meaning]
        return entry

    def same_concept(self, other: Terminology) -> bool:
        """Same category, type and anatomic region codes (meanings and colours ignored)."""
        return (
            self.category.matches(other.category)
            and self.type.matches(other.type)
            and (self.anatomic_region is None) == (other.anatomic_region is None)
            and (self.anatomic_region is None or self.anatomic_region.matches(other.anatomic_region))
        )


LIVER_TERMINOLOGY = Terminology(
    category=ANATOMICAL_STRUCTURE, type=LIVER, default_label=1, color=(221 / 255, 130 / 255, 101 / 255)
)
LIVER_TUMOR_TERMINOLOGY = Terminology(
    category=MORPHOLOGICALLY_ALTERED_STRUCTURE,
    type=NEOPLASM,
    anatomic_region=LIVER,
    default_label=2,
    color=(144 / 255, 238 / 255, 144 / 255),
)
GENERIC_TISSUE_TERMINOLOGY = Terminology(category=TISSUE, type=TISSUE)

# Segment names (lower case, words separated by single spaces) that mean liver or a liver tumour.
_LIVER_NAMES = {"liver", "hepar"}
_TUMOR_NAMES = {
    "tumor",
    "tumour",
    "tumors",
    "tumours",
    "liver tumor",
    "liver tumour",
    "liver tumors",
    "liver tumours",
    "lesion",
    "lesions",
    "liver lesion",
    "liver lesions",
    "neoplasm",
    "liver neoplasm",
    "mass",
    "liver mass",
    "hcc",
    "metastasis",
    "liver metastasis",
}

# Default names of the labels in a LiverSAM labelmap (LiTS convention).
DEFAULT_LABEL_NAMES: dict[int, str] = {1: "liver", 2: "tumor"}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def terminology_for(name: str) -> Terminology:
    """The terminology of a segment from its name: liver, a liver tumour (lesion, neoplasm, ...) or tissue.

    Numbered lesions ("tumor 3", "lesion_12") are tumours. Unknown names get the generic SCT "Tissue".
    """
    key = _normalise(name)
    key_without_number = re.sub(r"\s*\d+$", "", key)
    if key in _LIVER_NAMES:
        return LIVER_TERMINOLOGY
    if key in _TUMOR_NAMES or key_without_number in _TUMOR_NAMES:
        return LIVER_TUMOR_TERMINOLOGY
    return GENERIC_TISSUE_TERMINOLOGY


def is_liver_name(name: str) -> bool:
    """Whether a segment is named as the liver ("liver", "Liver", "hepar")."""
    return terminology_for(name) == LIVER_TERMINOLOGY


def is_tumour_name(name: str) -> bool:
    """Whether a segment is named as a liver tumour ("tumor", "Tumour 2", "lesion_3", "HCC", "metastasis", ...): a
    prompts file's tumour is kept inside the liver by these names, the lesion table and the organ rim read them."""
    return terminology_for(name) == LIVER_TUMOR_TERMINOLOGY


def terminology_from_codes(category: Code, type_: Code, anatomic_region: Code | None = None) -> Terminology:
    """A known terminology (with its default label and colour) matching the codes, else a bare one."""
    probe = Terminology(category=category, type=type_, anatomic_region=anatomic_region)
    for known in (LIVER_TERMINOLOGY, LIVER_TUMOR_TERMINOLOGY):
        if known.same_concept(probe):
            return known
    # A neoplasm or mass without an anatomic region is still LiverSAM's tumour label.
    if type_.matches(NEOPLASM) and anatomic_region is None:
        return Terminology(
            category=category, type=type_, default_label=2, color=LIVER_TUMOR_TERMINOLOGY.color
        )
    return probe


def terminology_from_slicer_string(text: str) -> Terminology | None:
    """Parse a Slicer ``TerminologyEntry`` string; None when it has no category/type codes."""
    parts = text.split("~")
    if len(parts) < 3:
        return None

    def code(part: str) -> Code | None:
        fields = part.split("^")
        if len(fields) < 3 or not fields[1]:
            return None
        return Code(value=fields[1], scheme=fields[0], meaning=fields[2])

    category, type_ = code(parts[1]), code(parts[2])
    if category is None or type_ is None:
        return None
    region = code(parts[5]) if len(parts) > 5 else None
    return terminology_from_codes(category, type_, region)

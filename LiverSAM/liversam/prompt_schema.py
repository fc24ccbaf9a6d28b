"""The schema of prompt files: ``PROMPTS.json`` and the parts of Slicer ``.mrk.json`` files LiverSAM reads.

Every structural problem (a missing or extra coordinate, a string or NaN where a number belongs, wrong
nesting, an unknown key, an unknown coordinate system, duplicate segment names or labels, a label out of
range) is found here by pydantic and reported as one :class:`~liversam.errors.PromptError` whose lines each
give the JSON path of the offending value, e.g. ``segments[1].boxes[0][1]: expected 3 numbers [x, y, z],
got 2``. What depends on the CT (a point outside the volume, a box across slices) is checked afterwards by
:mod:`liversam.prompts`.

Unknown keys are errors (a misspelt ``"boxs"`` would otherwise silently drop prompts), except ``$schema``
and ``description`` at the top level. The JSON Schema is published as ``docs/prompts.schema.json``
(:func:`prompts_json_schema`; ``python -m liversam.prompt_schema`` prints it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import PromptError

MAX_LABEL = 65535
MAX_REPORTED_ERRORS = 8


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return repr(value)[:40]


def _fixed_list(count: int, what: str):
    """A BeforeValidator: ``value`` must be a list of ``count`` items (``what`` names them)."""

    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise PydanticCustomError(
                "fixed_list_type", "expected {what}, got {got}", {"what": what, "got": _describe(value)}
            )
        if len(value) != count:
            raise PydanticCustomError(
                "fixed_list_length", "expected {what}, got {n} item(s)", {"what": what, "n": len(value)}
            )
        return value

    return BeforeValidator(check)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Point = Annotated[list[Number], Field(min_length=3, max_length=3), _fixed_list(3, "3 numbers [x, y, z]")]
Box = Annotated[
    list[Point], Field(min_length=2, max_length=2), _fixed_list(2, "2 corners [[x0, y0, z], [x1, y1, z]]")
]
Color = Annotated[
    list[Annotated[float, Strict(), Field(ge=0, le=255, allow_inf_nan=False)]],
    Field(min_length=3, max_length=3),
    _fixed_list(3, "3 numbers [r, g, b] (0..1 or 0..255)"),
]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=256, pattern=r"\S")]


def _file_list(value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise PydanticCustomError(
        "file_list_type", "expected a .mrk.json file name or a list of them, got {got}", {"got": _describe(value)}
    )


FileList = Annotated[
    Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]], BeforeValidator(_file_list)
]


class SegmentSpec(BaseModel):
    """One segment of ``PROMPTS.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    label: Annotated[int, Field(ge=1, le=MAX_LABEL)] | None = None
    color: Color | None = None
    inside: Name | None = Field(
        default=None,
        description="the segment this one stays inside (tumours inside the liver). Not given: a liver tumour's "
        "segment (named tumor, lesion, HCC, ...) is kept inside the file's one liver segment; null: on its own.",
    )
    propagate: bool = False
    boxes: list[Box] = Field(default_factory=list)
    points: list[Point] = Field(default_factory=list)
    negative_points: list[Point] = Field(default_factory=list)
    markups: FileList = Field(default_factory=list)
    negative_markups: FileList = Field(default_factory=list)

    def markup_files(self, negative: bool = False) -> list[str]:
        files = self.negative_markups if negative else self.markups
        return [files] if isinstance(files, str) else list(files)


class PromptsFile(BaseModel):
    """``PROMPTS.json``: a coordinate system and at least one segment."""

    model_config = ConfigDict(
        extra="forbid", strict=True, populate_by_name=True, json_schema_extra={"title": "LiverSAM prompts"}
    )

    schema_ref: str | None = Field(default=None, alias="$schema")
    description: str | None = None
    coordinate_system: Annotated[Literal["LPS", "RAS", "IJK"], BeforeValidator(_upper)] = "LPS"
    segments: Annotated[list[SegmentSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_and_consistent(self) -> PromptsFile:
        names: dict[str, int] = {}
        labels: dict[int, int] = {}
        for index, seg in enumerate(self.segments):
            if seg.name in names:
                raise PydanticCustomError(
                    "duplicate_name",
                    "segments[{i}].name: name '{name}' is used twice (also by segments[{j}]); names must be unique",
                    {"i": index, "name": seg.name, "j": names[seg.name]},
                )
            names[seg.name] = index
            label = seg.label if seg.label is not None else index + 1
            if label in labels:
                raise PydanticCustomError(
                    "duplicate_label",
                    "segments[{i}].label: label {label} is used twice (also by segments[{j}]; a segment without "
                    "'label' gets its position 1, 2, ...); labels must be unique",
                    {"i": index, "label": label, "j": labels[label]},
                )
            labels[label] = index
        for index, seg in enumerate(self.segments):
            if seg.inside is not None and seg.inside == seg.name:
                raise PydanticCustomError(
                    "inside_itself", "segments[{i}].inside: segment '{name}' cannot be inside itself",
                    {"i": index, "name": seg.name},
                )
            if seg.inside is not None and seg.inside not in names:
                raise PydanticCustomError(
                    "inside_unknown",
                    "segments[{i}].inside: segment '{name}' is to be inside '{inside}', but there is no segment "
                    "of that name (segments: {names})",
                    {"i": index, "name": seg.name, "inside": seg.inside, "names": ", ".join(sorted(names))},
                )
            if not (seg.boxes or seg.points or seg.markup_files()):
                raise PydanticCustomError(
                    "no_prompt",
                    "segments[{i}]: segment '{name}' has no box or positive point (nor markups); give at least "
                    "one of them",
                    {"i": index, "name": seg.name},
                )
        return self


# --- Slicer markups (.mrk.json): only what LiverSAM reads is checked; other keys are Slicer's own ----------


class ControlPoint(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    position: Point
    positionStatus: str = "defined"  # noqa: N815 - Slicer's key


class Markup(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["ROI", "Fiducial", "PointList"]
    coordinateSystem: Annotated[Literal["LPS", "RAS"], BeforeValidator(_upper)] = "LPS"  # noqa: N815
    center: Point | None = None
    size: Annotated[
        list[Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]],
        Field(min_length=3, max_length=3),
        _fixed_list(3, "3 sizes [sx, sy, sz] in mm"),
    ] | None = None
    orientation: Annotated[
        list[Number], Field(min_length=9, max_length=9), _fixed_list(9, "a 3x3 matrix as 9 numbers")
    ] | None = None
    controlPoints: list[ControlPoint] = Field(default_factory=list)  # noqa: N815

    @model_validator(mode="after")
    def _roi_needs_geometry(self) -> Markup:
        if self.type == "ROI":
            missing = [key for key in ("center", "size") if getattr(self, key) is None]
            if missing:
                raise PydanticCustomError(
                    "roi_incomplete", "an ROI needs {missing}", {"missing": " and ".join(missing)}
                )
            if self.orientation is not None:
                import numpy as np

                if abs(float(np.linalg.det(np.reshape(self.orientation, (3, 3))))) < 1e-6:
                    raise PydanticCustomError("roi_orientation", "orientation is not an invertible 3x3 matrix", {})
        return self


class MarkupsFile(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    markups: Annotated[list[Markup], Field(min_length=1)]


# --- reading and error messages ------------------------------------------------------------------------


def json_path(loc: tuple, keep_last: bool = False) -> str:
    """pydantic's error location -> ``segments[1].boxes[0][1]`` (union branch tags dropped)."""
    out = ""
    for index, part in enumerate(loc):
        is_branch = "-" in str(part) or "[" in str(part) or part in ("str", "list")
        if isinstance(part, int):
            out += f"[{part}]"
        elif is_branch and not (keep_last and index == len(loc) - 1):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


_MESSAGES = {
    "float_type": "expected a number, got {got}",
    "int_type": "expected an integer, got {got}",
    "string_type": "expected a string, got {got}",
    "bool_type": "expected true or false, got {got}",
    "list_type": "expected a list, got {got}",
    "model_type": "expected an object {{...}}, got {got}",
    "dict_type": "expected an object {{...}}, got {got}",
    "finite_number": "expected a finite number, got {got}",
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (allowed: {allowed})",
    "greater_than_equal": "expected a value >= {ge}, got {got}",
    "less_than_equal": "expected a value <= {le}, got {got}",
}


def _message(error: dict, allowed: dict[str, str]) -> str:
    kind = error["type"]
    loc = tuple(error.get("loc", ()))
    got = _describe(error.get("input"))
    if kind == "extra_forbidden":
        parent = "segment" if any(isinstance(p, int) for p in loc) else "top"
        return _MESSAGES[kind].format(allowed=allowed[parent])
    if kind == "literal_error":
        return f"expected {error['ctx']['expected']}, got {got}"
    if kind in ("too_short", "too_long") and loc and loc[-1] == "segments":
        return "expected at least one segment"
    if kind in _MESSAGES:
        return _MESSAGES[kind].format(got=got, **(error.get("ctx") or {}))
    return error["msg"][0].lower() + error["msg"][1:] if error.get("msg") else kind


def _allowed_keys() -> dict[str, str]:
    top = [f.alias or name for name, f in PromptsFile.model_fields.items()]
    return {"top": ", ".join(top), "segment": ", ".join(SegmentSpec.model_fields)}


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each starting with its JSON path (pydantic's own text for the rest)."""
    allowed = _allowed_keys()
    lines = []
    errors = exc.errors(include_url=False)
    # A union (``markups``: string or list) reports each branch; keep the first one per location.
    seen: set[str] = set()
    for error in errors:
        path = json_path(tuple(error.get("loc", ())), keep_last=error["type"] == "extra_forbidden")
        if path in seen:
            continue
        seen.add(path)
        message = _message(error, allowed)
        lines.append(f"{path}: {message}" if path else message)
    more = f"\n  (and {len(lines) - MAX_REPORTED_ERRORS} more)" if len(lines) > MAX_REPORTED_ERRORS else ""
    body = "\n  ".join(lines[:MAX_REPORTED_ERRORS])
    return f"{source}: {body}{more}" if len(lines) == 1 else f"{source}: {len(lines)} problems:\n  {body}{more}"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(repr(k) for k in duplicates)} in one object")
    return dict(pairs)


def read_json_file(path: str | Path, what: str = "Prompts file") -> Any:
    """Parse a JSON file strictly (UTF-8, no duplicate keys); raise :class:`PromptError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{what} not found: '{path}'." if not path.exists() else f"{what} '{path}' is not a file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{what} '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except OSError as exc:
        raise PromptError(f"{what} '{path}' cannot be read: {exc.strerror or exc}.") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{what} '{path}' is not valid JSON: {exc}.") from exc
    except ValueError as exc:
        raise PromptError(f"{what} '{path}' is not valid JSON: {exc}.") from exc
    except RecursionError as exc:
        raise PromptError(f"{what} '{path}' is nested too deeply to be a prompts file.") from exc


def validate_prompts(data: Any, source: str = "prompts") -> PromptsFile:
    """Validate a parsed ``PROMPTS.json``; raise :class:`PromptError` listing every problem with its path."""
    if not isinstance(data, dict):
        raise PromptError(
            f'{source}: expected an object {{"coordinate_system": ..., "segments": [...]}}, got {_describe(data)}.'
        )
    try:
        return PromptsFile.model_validate(data)
    except ValidationError as exc:
        raise PromptError(format_validation_error(exc, source)) from None
    except RecursionError as exc:
        raise PromptError(f"{source}: nested too deeply to be a prompts file.") from exc


def validate_markups(data: Any, source: str) -> MarkupsFile:
    """Validate the parts of a Slicer ``.mrk.json`` that LiverSAM reads."""
    if not isinstance(data, dict) or "markups" not in data:
        raise PromptError(
            f"{source}: has no 'markups' list; save an ROI or a point list from Slicer as .mrk.json."
        )
    try:
        return MarkupsFile.model_validate(data)
    except ValidationError as exc:
        raise PromptError(format_validation_error(exc, source)) from None
    except RecursionError as exc:
        raise PromptError(f"{source}: nested too deeply to be a markups file.") from exc


def prompts_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``PROMPTS.json``, as published in ``docs/prompts.schema.json``."""
    schema = PromptsFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        "Prompts for `liversam segment --prompts`. Coordinates: LPS or RAS millimetres, or IJK voxel indices. "
        "A box is two opposite corners on one axial slice."
    )
    return schema


if __name__ == "__main__":
    print(json.dumps(prompts_json_schema(), indent=2))

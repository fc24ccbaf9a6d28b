"""``liversam export``: convert a segmentation to DICOM SEG, Slicer .seg.nrrd or a labelmap.

Examples::

    liversam export liver.seg.nrrd --reference-dicom CT_DICOM_DIR --output liver_seg.dcm
    liversam export labels.nii.gz --reference-ct ct.nrrd --output labels.seg.nrrd
    liversam export liver_seg.dcm --output liver.nii.gz

With a reference (``--reference-dicom`` or ``--reference-ct``) the segmentation is first placed on the
reference CT's grid (nearest neighbour when the grids differ); DICOM SEG output always needs
``--reference-dicom`` and references that series.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InputImageError, OutputError
from ..geometry import ImageGeometry
from ..output_paths import check_outputs, dicom_folder_of_file
from ..progress import ProgressReporter

logger = logging.getLogger(__name__)


def parse_label_names(text: str | None) -> dict[int, str] | None:
    """``"1=liver,2=tumor"`` -> ``{1: "liver", 2: "tumor"}``; None for None or empty text."""
    if not text:
        return None
    names: dict[int, str] = {}
    for item in text.split(","):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise InputImageError(
                f"--label-names '{text}': each item must be LABEL=NAME with an integer label, e.g. 1=liver,2=tumor."
            )
        names[int(value)] = name.strip()
    seen: dict[str, int] = {}
    for value, name in names.items():
        if name.lower() in seen:
            raise InputImageError(
                f"--label-names '{text}': labels {seen[name.lower()]} and {value} are both named '{name}'; segment names "
                "must be unique (3D Slicer would show two segments of that name)."
            )
        seen[name.lower()] = value
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="convert a segmentation to DICOM SEG, .seg.nrrd or a labelmap",
        description=(
            "Convert a segmentation (.seg.nrrd, labelmap .nrrd/.nii/.nii.gz, or DICOM SEG) to another format. "
            "The output format follows --output's suffix: .dcm (DICOM SEG, needs --reference-dicom), "
            ".seg.nrrd (3D Slicer), .nrrd/.nii/.nii.gz (labelmap)."
        ),
    )
    parser.add_argument("segmentation", metavar="SEGMENTATION", help="input segmentation file")
    parser.add_argument(
        "--output", "-o", required=True, help="output file (.dcm, .seg.nrrd, .nrrd, .nii, .nii.gz)"
    )
    parser.add_argument(
        "--reference-dicom",
        metavar="DIR",
        help="DICOM folder of the segmented CT series: the grid to place the segmentation on and, for .dcm, "
        "the series the DICOM SEG references",
    )
    parser.add_argument(
        "--reference-ct",
        metavar="PATH",
        help="CT file or DICOM folder whose grid the segmentation is placed on (when --reference-dicom is not given)",
    )
    parser.add_argument(
        "--series-uid", help="SeriesInstanceUID of the reference series when the folder holds several"
    )
    parser.add_argument(
        "--label-names",
        metavar="LABEL=NAME,...",
        help="names of labelmap values, e.g. 1=liver,2=tumor (default: the file's own names, else 1=liver, "
        "2=tumor); given, it replaces the defaults: a label it leaves out is called label_<value>",
    )
    parser.add_argument("--model-name", default="", help="model name recorded as provenance in the output")
    parser.set_defaults(run=run)
    return parser


def _reference_geometry(args) -> tuple[ImageGeometry | None, str | None, str | None]:
    """(reference grid, DICOM folder for SEG output, its SeriesInstanceUID)."""
    if args.reference_dicom:
        from ..dicom_series import select_dicom_series, sort_series

        folder = Path(args.reference_dicom)
        info = select_dicom_series(folder, series_uid=args.series_uid, allow_non_ct=True)
        sorted_series = sort_series(info, folder)
        if not sorted_series.regular:
            raise InputImageError(
                f"The reference series in '{folder}' has {sorted_series.problem}; it cannot be a DICOM SEG reference."
            )
        return sorted_series.geometry, str(folder), info.series_uid or None
    if args.reference_ct:
        from ..ct_io import read_ct

        path = Path(args.reference_ct)
        volume = read_ct(path, series_uid=args.series_uid, allow_non_ct=True)
        # a DICOM series' folder (also when the CT was given as one of its files); None for an image file
        dicom_folder = volume.source if volume.metadata.get("dicom_files") else None
        return volume.geometry, dicom_folder, volume.metadata.get("dicom_series_uid") or None
    return None, None, None


def run(args) -> int:
    from ..segmentation_io import read_segmentation, segmentation_format, write_segmentation

    output = Path(args.output)
    if segmentation_format(output) in ("", "mha"):
        raise OutputError(
            f"Unknown output type '{output}'. Use .dcm (DICOM SEG), .seg.nrrd (3D Slicer), .nrrd, .nii or .nii.gz."
        )
    check_outputs(
        {"--output": output},
        [args.segmentation, args.reference_dicom, args.reference_ct, dicom_folder_of_file(args.reference_ct)],
    )
    geometry, dicom_folder, series_uid = _reference_geometry(args)
    if segmentation_format(output) == "dicom-seg" and dicom_folder is None:
        raise OutputError(
            f"DICOM SEG output '{output}' needs the CT's DICOM series: pass --reference-dicom DIR "
            "(the folder of the CT that was segmented)."
        )
    label_names = parse_label_names(args.label_names)
    with ProgressReporter(unit="steps") as progress:  # its last line says "stopped" when a step fails
        progress(f"export {output.name}", 0, 2)
        result = read_segmentation(args.segmentation, reference=geometry, label_names=label_names)
        if series_uid:
            result.provenance["dicom_series_uid"] = series_uid
        progress(f"export {output.name}", 1, 2)
        write_segmentation(result, output, reference_dicom=dicom_folder, model_name=args.model_name)
        progress(f"export {output.name}", 2, 2)
    voxel_ml = result.geometry.voxel_volume_mm3 / 1000.0
    summary = ", ".join(
        f"{s.name} (label {s.label}, {int(s.mask_kji.sum())} voxels, {s.mask_kji.sum() * voxel_ml:.1f} mL)"
        for s in result.segments
    )
    print(f"wrote {output}: {summary or 'no segments'}")
    return 0

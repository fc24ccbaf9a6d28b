"""``liversam segment CT --prompts PROMPTS.json --output OUT``: segment a CT from prompts."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputImageError, OutputError
from ..freed_memory import return_freed_memory_to_os
from ..output_paths import check_outputs, dicom_folder_of_file, model_input_path
from ..progress import ProgressReporter
from . import arg_types

if TYPE_CHECKING:
    from ..axial_orientation import AxialReorientation

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment a CT from box / point prompts",
        description="Segment liver and tumours in a CT from prompts (PROMPTS.json or a Slicer .mrk.json).",
    )
    p.add_argument("ct", metavar="CT", help="CT volume: .nrrd, .nii, .nii.gz, .mha file or a DICOM series folder")
    p.add_argument("--prompts", required=True, help="PROMPTS.json (or a Slicer markups .mrk.json)")
    p.add_argument("--output", required=True, help="output: .seg.nrrd, labelmap .nrrd/.nii/.nii.gz, or .dcm (DICOM SEG)")
    p.add_argument("--model", default="litemedsam", help="model name (litemedsam, sam_vit_b, ...), NAME=PATH, or checkpoint path")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument(
        "--accelerate", default="auto", choices=("auto", "plain", "openvino", "onnxruntime", "torch"),
        help="CPU encoder backend: auto (OpenVINO / ONNX Runtime when installed, verified against PyTorch; "
        "exported once into the user cache), or plain PyTorch",
    )
    p.add_argument("--window-level", type=arg_types.finite, default=40.0, help="CT window centre in HU (default 40)")
    p.add_argument("--window-width", type=arg_types.positive, default=400.0, help="CT window width in HU (default 400)")
    p.add_argument("--clahe", action="store_true", help="apply CLAHE after windowing")
    p.add_argument("--min-island-mm2", type=arg_types.non_negative, default=10.0, help="remove 2D islands smaller than this (mm^2)")
    p.add_argument("--opening-mm", type=arg_types.non_negative, default=0.0, help="2D morphological opening radius (mm)")
    p.add_argument("--closing-mm", type=arg_types.non_negative, default=0.0, help="2D morphological closing radius (mm)")
    p.add_argument("--no-intensity-refinement", action="store_true",
                   help="propagate with the model's masks alone (no liver/tumour intensity refinement, no trim of "
                   "the liver's dark rim, no tumour ring, no liver piece asked for apart)")
    p.add_argument("--no-lesion-rim", action="store_true",
                   help="keep a tumour's outline where its threshold puts it: no partial-volume ring one voxel "
                   "outside it (the ring is on by default, part of the intensity refinement; labels drawn around a "
                   "lesion's core only match better without it)")
    p.add_argument("--crf", default="auto", metavar="SEGMENTS",
                   help="refine these segments (comma-separated names, 'all', or 'none') with a dense CRF on the CT "
                   "after propagation (default 'auto': every segment where pydensecrf2 is installed, as setup.sh "
                   "does; an organ only on slices of 3 mm or more, where it pays; measured in docs/RESULTS.md)")
    p.add_argument("--propagation", choices=("liversam", "naive"), default="liversam",
                   help="propagation method: liversam (default) or naive (the reference loop: box of the previous "
                   "slice's mask + 3 px, stop below 10 px)")
    p.add_argument("--skip-thin-slices", type=_thin_slice_mm, default=None, metavar="MM",
                   help="faster, slightly less accurate: organs on slices at most MM thick (e.g. 2; under 3) are predicted "
                   "on every other slice and interpolated between (half the encodes; liver Dice -0.001 / -0.006 on "
                   "the two thin-slice cases of docs/RESULTS.md)")
    p.add_argument("--report", help="write the review report (per-slice area, score, flags) as JSON")
    p.add_argument("--lesions", help="write the lesion table (.csv or .json)")
    p.add_argument("--series-uid", help="DICOM folder: the SeriesInstanceUID to use when it holds several series")
    p.add_argument("--series-number", type=arg_types.non_negative_int, help="DICOM folder: the SeriesNumber to use")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="accept a DICOM series whose modality is not CT, or a volume whose values look like a "
                   "label mask or are not Hounsfield units (none below 0)")
    p.add_argument("--resample-irregular", action="store_true",
                   help="DICOM: resample irregular slice spacing or gantry tilt instead of refusing it")
    p.add_argument("--replace-nonfinite", type=arg_types.finite, metavar="HU",
                   help="replace NaN / infinite CT voxels by this value (e.g. -1000) instead of refusing the CT")
    p.add_argument("--check-only", action="store_true",
                   help="validate the CT, the prompts and the output paths, then stop (no model, nothing written)")
    p.add_argument("--cache-mb", type=arg_types.positive, default=2048.0, help="embedding cache size in MB")
    p.add_argument("--threads", type=arg_types.non_negative_int, default=0, help="CPU threads for torch (0 = torch default)")
    p.set_defaults(run=run)


def _thin_slice_mm(text: str) -> float:
    """``--skip-thin-slices``'s value: a thickness in mm above 0 and under 3."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give a slice thickness in mm, e.g. 2") from None
    if not 0 < value < 3:
        raise argparse.ArgumentTypeError(f"{text} mm: give a thickness above 0 and under 3 mm (e.g. 2); thicker "
                                         "slices are always predicted one by one")
    return value


def run(args: argparse.Namespace) -> int:
    from ..acceleration import describe_acceleration
    from ..axial_orientation import reorient_to_axial
    from ..ct_io import check_hounsfield_units, check_not_label_mask, implausible_spacing_warning, read_ct
    from ..dense_crf import crf_for_segments
    from ..lesion_rim import LesionRimSettings
    from ..models import load_model
    from ..pipeline import PipelineSettings, segment_volume
    from ..postprocess import PostprocessSettings
    from ..predictor import SlicePredictor
    from ..preprocess import WindowSettings
    from ..prompts import load_prompts
    from ..propagation import OrganTrackSettings, PropagationSettings
    from ..segmentation_io import WRITE_SUFFIXES, segmentation_format, write_segmentation

    output = Path(args.output)
    fmt = segmentation_format(output)
    if not fmt or fmt == "mha":
        raise OutputError(f"Output '{output}': unsupported file type; use one of {', '.join(WRITE_SUFFIXES)}.")
    dicom_folder = Path(args.ct) if Path(args.ct).is_dir() else dicom_folder_of_file(args.ct)
    if fmt == "dicom-seg" and dicom_folder is None:
        raise OutputError(
            f"Output '{output}' is a DICOM SEG, which must reference a DICOM CT series; the CT '{args.ct}' is not a "
            "DICOM folder. Write .seg.nrrd or a labelmap instead, or segment the DICOM series."
        )
    if args.lesions and Path(args.lesions).suffix.lower() not in (".csv", ".json"):
        raise OutputError(f"--lesions '{args.lesions}': use a .csv or .json file name.")
    if dicom_folder is None and (args.series_uid or args.series_number is not None):
        option = "--series-uid" if args.series_uid else "--series-number"
        raise InputImageError(f"{option} chooses a series in a DICOM folder; the CT '{args.ct}' is a single image "
                              f"file, which holds one volume. Leave {option} out.")  # fmt: skip
    # The source is sacred: no output may be (or link to) an input, or lie in the DICOM folder.
    check_outputs(
        {"--output": output, "--report": args.report, "--lesions": args.lesions},
        [args.ct, args.prompts, model_input_path(args.model), dicom_folder],
    )
    if args.report and Path(args.report).suffix.lower() != ".json":
        raise OutputError(f"--report '{args.report}': the review report is JSON; use a .json file name.")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    volume = read_ct(
        args.ct,
        series_uid=args.series_uid,
        series_number=args.series_number,
        allow_non_ct=args.allow_non_ct,
        resample_irregular=args.resample_irregular,
        replace_nonfinite=args.replace_nonfinite,
    )
    if not args.allow_non_ct:
        check_not_label_mask(volume)  # a label file given as the CT would otherwise be "segmented" without error
        check_hounsfield_units(volume)  # so would stored values without the rescale, or an 8-bit picture
    if warning := implausible_spacing_warning(volume):
        log.warning(warning)
    if volume.metadata.get("nonfinite_replaced"):
        print(
            f"replaced {volume.metadata['nonfinite_replaced']} non-finite CT voxel(s) by "
            f"{volume.metadata['nonfinite_value']:g} (--replace-nonfinite)"
        )
    # A sagittal or coronal CT is segmented on its axial slices (the model's and the boxes' plane): its voxels
    # permuted, no interpolation; every output goes back onto its own grid. IJK prompts name the file's voxels.
    input_geometry = volume.geometry
    volume, reorientation = reorient_to_axial(volume)
    if reorientation is not None:
        log.info("%s", reorientation.describe())
    segments = load_prompts(args.prompts, volume.geometry, ijk_geometry=input_geometry)
    crf = crf_for_segments(args.crf, segments)  # before the model: a missing package or a wrong name fails fast
    if fmt == "dicom-seg":  # a series it cannot reference (UIDs blanked, ...) is refused now, not after the model ran
        from ..dicom_seg import check_dicom_seg_reference

        check_dicom_seg_reference(input_geometry, dicom_folder, output,
                                  series_uid=volume.metadata.get("dicom_series_uid") or None)  # fmt: skip
    if args.check_only:
        print(
            f"ok: CT {volume.geometry.size_ijk} (i, j, k), {len(segments)} segment(s) "
            f"({', '.join(s.name for s in segments)}), prompts on {sum(len(s.slices) for s in segments)} slice(s); "
            "outputs writable (--check-only: nothing written)"
        )
        return 0
    window = WindowSettings(level=args.window_level, width=args.window_width, clahe=args.clahe)
    model = load_model(args.model, device=args.device, accelerate=args.accelerate)
    predictor = SlicePredictor(model, volume, window=window, cache_mb=args.cache_mb)
    settings = PipelineSettings(
        slice_postprocess=PostprocessSettings(
            min_island_mm2=args.min_island_mm2, opening_radius_mm=args.opening_mm, closing_radius_mm=args.closing_mm
        ),
        propagation=PropagationSettings(intensity_refinement=not args.no_intensity_refinement),
        propagation_method=args.propagation,
        lesion_rim=None if args.no_lesion_rim else LesionRimSettings(),
        organ_track=OrganTrackSettings(skip_max_thickness_mm=args.skip_thin_slices),
        crf=crf,
    )
    with ProgressReporter() as progress:  # bar on a terminal, a line per stage in a log, nothing with --quiet
        result = segment_volume(volume, segments, predictor, settings, progress=progress)
    predictor.cache.clear()  # the slice embeddings (2 MB a slice) are not needed for writing: memory for the writer
    return_freed_memory_to_os()  # and give it back, so that the writer's array does not come on top of it
    result.provenance["prompts"] = str(args.prompts)
    written = result if reorientation is None else reorientation.result_to_input(result)  # the input's own grid
    write_segmentation(written, output, reference_dicom=dicom_folder if fmt == "dicom-seg" else None, model_name=model.name)

    also_wrote = []
    if args.report:
        from ..atomic_write import write_text_atomically
        from ..review import build_review_report

        report = build_review_report(result, ct_kji=volume.array_kji)
        if reorientation is not None:  # its slice numbers are those of the axial slices the CT was segmented on
            report["slice_grid"] = _axial_grid_note(reorientation)
        with _write_error_as_output_error(args.report, output):
            write_text_atomically(args.report, json.dumps(report, indent=2))
        also_wrote.append(f"wrote {args.report} (review report: {_review_summary(report)})")
    if args.lesions:
        from ..lesions import lesion_table, write_lesion_table

        rows = lesion_table(result)
        with _write_error_as_output_error(args.lesions, output):
            write_lesion_table(rows, args.lesions)
        grid = "" if reorientation is None else (
            f"; its slice numbers are the axial slices k of the {reorientation.input_plane} CT reoriented, "
            f"{reorientation.axial_geometry.size_ijk[2]} of them, not the file's own slices"
        )
        also_wrote.append(f"wrote {args.lesions} (lesion table: {len(rows)} lesion(s){grid})")

    elapsed = time.perf_counter() - started
    voxel_ml = volume.geometry.voxel_volume_mm3 / 1000.0
    not_propagated = {s.name for s in segments if not s.propagate}
    for seg in result.segments:
        note = ""
        if seg.name in not_propagated:  # the default: one slice of a liver looks like a result too
            note = ' (its prompted slices only: set "propagate": true to carry it through the volume)'
        print(f"{seg.name}: {int(seg.mask_kji.sum())} voxels, {seg.mask_kji.sum() * voxel_ml:.1f} mL{note}")
    _warn_about_empty_segments(result)
    print(
        f"wrote {output} ({len(predictor.encoded_slices)} slices encoded in {predictor.encode_seconds:.1f} s, "
        f"total {elapsed:.1f} s, model {model.name} on {model.device}, {describe_acceleration(model)})"
    )
    for line in also_wrote:
        print(line)
    return 0


@contextlib.contextmanager
def _write_error_as_output_error(target: str | Path, written: Path) -> Iterator[None]:
    """An OS error writing ``target`` (checked writable at the start; the disk filled or the folder's permissions
    changed since) as a message naming it, not an internal error; ``written`` (the segmentation) is kept."""
    from ..atomic_write import describe_write_error

    try:
        yield
    except OSError as exc:
        raise OutputError(f"{describe_write_error(target, exc)} The segmentation was written to '{written}'.") from exc


def _axial_grid_note(reorientation: AxialReorientation) -> dict:
    """What the review report's slice numbers are for a CT segmented reoriented: its axial slices k."""
    geometry = reorientation.axial_geometry
    return {
        "slices": "axial",
        "input_slices": reorientation.input_plane,
        "note": "slice numbers k are the axial slices the CT was segmented on (its voxels reoriented, no "
        "interpolation), not the file's own slices; a slice's LPS position is origin_lps + k * "
        "direction_lps[:, 2] * spacing_mm[2]",
        "size_ijk": list(geometry.size_ijk),
        "spacing_mm": list(geometry.spacing_mm),
        "origin_lps": list(geometry.origin_lps),
        "direction_lps": geometry.direction_lps.tolist(),
    }


def _warn_about_empty_segments(result) -> None:
    """An empty segment is written like any other: say so, with where to look."""
    empty = [seg.name for seg in result.segments if not seg.mask_kji.any()]
    if empty:
        log.warning(
            "segment(s) %s came out empty: check that the prompts lie on the structure (the coordinate system, the "
            "slice), the CT's HU and voxel spacing, or lower --min-island-mm2",
            ", ".join(f"'{name}'" for name in empty),
        )


def _review_summary(report: dict) -> str:
    """'2 slice range(s) to check: liver slices 10-21, tumor slices 40-42' (at most three named)."""
    items = report.get("items") or []
    if not items:
        return "no slice range to check"
    def where(item: dict) -> str:
        slices = str(item.get("slices", "?"))
        return f"{item.get('segment', '?')} slice{'s' if '-' in slices else ''} {slices}"

    named = ", ".join(where(item) for item in items[:3])
    return f"{len(items)} slice range(s) to check: {named}" + (", ..." if len(items) > 3 else "")

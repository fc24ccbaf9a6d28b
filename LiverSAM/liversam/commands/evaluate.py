"""``liversam evaluate``: score LiverSAM on CT + label cases with prompts simulated from the labels."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import LiverSAMError
from ..output_paths import check_outputs, model_input_path
from ..preflight import check_label_pair
from . import arg_types

log = logging.getLogger(__name__)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of label values") from exc


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure Dice/IoU/HD95/ASSD on labelled cases with simulated box or click prompts",
        description=(
            "Evaluate LiverSAM on CT volumes with reference labels. Prompts are simulated from the labels: "
            "oracle-box (a box on every slice), one-box (one box per structure, or per lesion, on its largest "
            "slice, then propagation), clicks (2D interactive per slice: Dice after each click, NoC@85/90). "
            "DATA is a case folder (ct.nii.gz + label.nii.gz), a folder of case folders, a folder of "
            "<id>_ct/<id>_label or LiTS volume-<n>/segmentation-<n> pairs, or a .json/.csv manifest with "
            "id, ct, label."
        ),
    )
    parser.add_argument("--data", required=True, help="case folder, folder of cases, or .json/.csv manifest")
    parser.add_argument(
        "--protocol",
        default="oracle-box",
        help="oracle-box, one-box, clicks, a comma-separated list, or 'all' (default: oracle-box); "
        "several protocols share each case's slice embeddings",
    )
    parser.add_argument("--output", required=True, help="results JSON file")
    parser.add_argument("--markdown", help="also write a markdown report here")
    parser.add_argument(
        "--model", default="litemedsam", help="model name or checkpoint path (default: litemedsam)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--accelerate", default="auto", choices=("auto", "plain", "openvino", "onnxruntime", "torch"),
                        help="CPU encoder backend (default auto: OpenVINO / ONNX Runtime when installed)")
    parser.add_argument(
        "--threads", type=arg_types.non_negative_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--cache-mb", type=arg_types.positive, default=1024.0, help="slice-embedding cache size in MB")
    parser.add_argument("--slices", help="restrict to axial slices K0:K1 (half-open, e.g. 60:64)")
    parser.add_argument(
        "--liver-labels", type=_int_list, default=(1, 2), help="label values of the liver (default 1,2)"
    )
    parser.add_argument(
        "--tumor-labels",
        type=_int_list,
        default=(2,),
        help="label values of tumours (default 2; '' for none)",
    )
    parser.add_argument(
        "--structures", default="liver,tumor", help="structures to score (default liver,tumor)"
    )
    parser.add_argument(
        "--box-margin", type=arg_types.non_negative_int, default=0, help="voxels added around reference boxes (default 0)"
    )
    parser.add_argument(
        "--max-clicks", type=arg_types.positive_int, default=20, help="clicks protocol: clicks per slice (default 20)"
    )
    parser.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="clicks protocol: seeded sample of this many slices per structure",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the slice sample (default 0)")
    parser.add_argument(
        "--no-click-mask-input",
        action="store_true",
        help="clicks protocol: do not feed the previous prediction back as a mask prompt",
    )
    parser.add_argument(
        "--click-start",
        choices=("point", "box"),
        default="point",
        help="clicks protocol: start from one positive click (default) or from the slice's oracle box(es)",
    )
    parser.add_argument(
        "--no-intensity-refinement",
        action="store_true",
        help="one-box: propagate with the model's masks alone (no liver/tumour intensity refinement, no trim of "
        "the liver's dark rim, no tumour ring, no liver piece asked for apart)",
    )
    parser.add_argument(
        "--no-lesion-rim",
        action="store_true",
        help="one-box: no partial-volume ring around propagated lesions (as `liversam segment --no-lesion-rim`)",
    )
    parser.add_argument(
        "--crf",
        default="auto",
        metavar="STRUCTURES",
        help="refine these structures (liver, tumor, comma-separated, or 'none') with a dense CRF on the CT in "
        "LiverSAM's runs, as `liversam segment --crf` (default 'auto': every structure where pydensecrf2 is "
        "installed)",
    )
    parser.add_argument(
        "--propagation",
        default="liversam,naive",
        help="one-box: propagation method(s) run side by side: liversam, naive (the reference loop: box of the "
        "previous slice's mask + 3 px, stop below 10 px), or both comma-separated (default: liversam,naive)",
    )
    parser.add_argument(
        "--boxes",
        default="tight",
        help="one-box: how the simulated user draws boxes: tight, loose (+--loose-mm on every side), jitter "
        "(every side moved by a seeded uniform draw in --jitter-mm), or several comma-separated "
        "(default: tight)",
    )
    parser.add_argument("--loose-mm", type=arg_types.non_negative, default=7.0, help="one-box loose boxes: mm added per side (default 7)")
    parser.add_argument(
        "--jitter-mm", default="-2,7",
        help="one-box jittered boxes: range LO,HI (mm) of each side's outward shift (default -2,7)",
    )
    parser.add_argument(
        "--organ-seed-at", type=float, default=None, metavar="F",
        help="one-box: draw the liver's box on the slice F (0..1) of the way from its first to its last slice (rounded down) "
        "instead of its largest slice (a user who boxes the slice in view); lesions keep their largest slices",
    )
    parser.add_argument(
        "--per-lesion-segments",
        action="store_true",
        help="one-box: give every lesion a segment of its own (default: all lesion boxes in one 'tumor' "
        "segment, as a user writes them)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def _protocols(text: str) -> tuple[str, ...]:
    from ..evaluate import PROTOCOLS

    if text.strip() == "all":
        return PROTOCOLS
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _jitter(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise LiverSAMError(f"--jitter-mm '{text}' is not LO,HI in mm (e.g. -2,7).") from exc
    if hi < lo:
        raise LiverSAMError(f"--jitter-mm '{text}': LO must not exceed HI.")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    from .. import evaluate as ev

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    specs = ev.default_structures(args.liver_labels, args.tumor_labels)
    wanted = [s.strip() for s in args.structures.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in {s.name for s in specs}]
    if unknown:
        raise LiverSAMError(
            f"--structures: unknown {unknown}; available: {', '.join(s.name for s in specs)} "
            "(tumor needs --tumor-labels)."
        )
    settings = ev.EvaluationSettings(
        protocols=_protocols(args.protocol),
        structures=tuple(s for s in specs if s.name in wanted),
        slice_range=ev.parse_slice_range(args.slices),
        box_margin=args.box_margin,
        max_clicks=args.max_clicks,
        max_slices=args.max_slices,
        seed=args.seed,
        click_mask_input=not args.no_click_mask_input,
        click_start=args.click_start,
        intensity_refinement=not args.no_intensity_refinement,
        lesion_rim=not args.no_lesion_rim,
        crf=_crf_structures(args.crf, [s.name for s in specs if s.name in wanted]),
        lesion_segments="per-lesion" if args.per_lesion_segments else "one",
        propagation_methods=_names(args.propagation),
        box_styles=_names(args.boxes),
        loose_mm=args.loose_mm,
        jitter_mm=_jitter(args.jitter_mm),
        organ_seed_at=args.organ_seed_at,
    )
    cases = ev.discover_cases(args.data)
    check_outputs(
        {"--output": args.output, "--markdown": args.markdown},
        [args.data if Path(args.data).is_file() else None, model_input_path(args.model)]
        + [p for case in cases for p in (case.ct_path, case.label_path)],
    )
    for case in cases:
        check_label_pair(case.case_id, case.ct_path, case.label_path)
    log.info("evaluating %d case(s) with %s", len(cases), ", ".join(settings.protocols))
    results = ev.evaluate(
        cases,
        settings,
        model=args.model,
        device=args.device,
        cache_mb=args.cache_mb,
        progress=not args.no_progress,
        accelerate=args.accelerate,
    )
    ev.write_results(results, args.output, args.markdown)
    for protocol, per_structure in results["aggregate"].items():
        for name, summary in per_structure.items():
            if protocol == "clicks":
                noc = summary.get("noc90_mean") or {}
                dice1 = summary.get("dice_at_1_clicks") or {}
                print(
                    f"{protocol:10s} {name:6s} Dice@1 mean {_fmt(dice1.get('mean'))}  NoC@90 mean {_fmt(noc.get('mean'))}"
                )
            else:
                dice = summary.get("dice") or {}
                absent = (f"  ({dice['n_undefined']} case(s) with {name} neither in the reference nor in the "
                          "result: left out)") if dice.get("n_undefined") else ""  # fmt: skip
                print(
                    f"{protocol:10s} {name:6s} Dice mean {_fmt(dice.get('mean'))}  median {_fmt(dice.get('median'))}"
                    + absent
                )
    print(f"wrote {args.output}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _crf_structures(requested: str, structures: list[str]) -> tuple[str, ...]:
    """``--crf``: 'auto' (every structure where pydensecrf2 is installed), 'none', 'all' or names."""
    from ..dense_crf import crf_available

    names = _names(requested)
    if names in (("none",), ()):
        return ()
    if names in (("auto",), ("all",)):
        return tuple(structures) if names == ("all",) or crf_available() else ()
    return names

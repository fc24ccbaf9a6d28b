"""``liversam train --data DIR_OR_MANIFEST --out RUN_DIR``: fine-tune the model on segmented CT studies.

Running the same command again on the same RUN_DIR resumes from the last completed epoch.
"""

from __future__ import annotations

import argparse
import json
import logging

from . import arg_types

log = logging.getLogger(__name__)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of label values") from exc


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not three comma-separated fractions") from exc
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}': give three fractions train,val,test (e.g. 0.8,0.1,0.1)")
    return values  # type: ignore[return-value]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="fine-tune the model on your own segmented CT studies (resumable)",
        description=(
            "Fine-tune LiverSAM's model (prompt encoder + mask decoder by default, image encoder frozen and its "
            "embeddings cached) on CT studies with liver/tumour labels. DATA: a folder of study folders "
            "(ct.<ext> + label.<ext>, ct + *.seg.nrrd, or 3D-IRCADb PATIENT_DICOM + MASKS_DICOM), a folder of "
            "<id>_ct/<id>_label pairs, or a .json/.csv manifest (id, ct, label). Rerun the same command to "
            "resume an interrupted run."
        ),
    )
    p.add_argument("--data", required=True, help="data folder or .json/.csv manifest")
    p.add_argument("--out", required=True, help="run folder (checkpoints, curves, split, reports)")
    p.add_argument("--base-model", default="litemedsam", help="model to start from (default litemedsam)")
    p.add_argument(
        "--liver-labels", type=_int_list, default=(1, 2), help="label values of the liver (default 1,2)"
    )
    p.add_argument(
        "--tumor-labels", type=_int_list, default=(2,), help="label values of tumours (default 2; '' none)"
    )
    p.add_argument(
        "--liver-names", type=_name_list, default=("liver",), help="segment names of the liver (.seg.nrrd)"
    )
    p.add_argument(
        "--tumor-names",
        type=_name_list,
        default=("tumor", "tumour", "lesion", "metastas", "neoplasm", "cancer"),
        help="segment name parts that mean tumour (.seg.nrrd); cysts never count",
    )
    p.add_argument("--epochs", type=arg_types.positive_int, default=30,
                   help="maximum epochs (default 30); a finished run resumed with more trains on")
    p.add_argument("--batch-size", type=arg_types.positive_int, default=8, help="slices per step (default 8)")
    p.add_argument("--lr", type=arg_types.positive, default=1e-4, help="initial learning rate (default 1e-4)")
    p.add_argument("--lr-min", type=arg_types.non_negative, default=1e-6, help="cosine-annealing minimum (default 1e-6)")
    p.add_argument("--weight-decay", type=arg_types.non_negative, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument(
        "--tumor-weight", type=arg_types.non_negative, default=2.0, help="loss weight of tumour targets (default 2)"
    )
    p.add_argument(
        "--patience", type=arg_types.positive_int, default=10,
        help="early stopping: epochs without better validation Dice (default 10); a run that stopped early, resumed "
        "with more, trains on",
    )
    p.add_argument(
        "--augment-copies", type=arg_types.non_negative_int, default=0, help="augmented copies per slice in the cache (default 0)"
    )
    p.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="at most this many liver slices per study (evenly spaced)",
    )
    p.add_argument(
        "--min-liver-voxels", type=arg_types.non_negative_int, default=16, help="use slices with at least this many liver voxels"
    )
    p.add_argument("--window-level", type=arg_types.finite, default=40.0, help="CT window centre, HU (default 40)")
    p.add_argument("--window-width", type=arg_types.positive, default=400.0, help="CT window width, HU (default 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, augmentation and prompts (default 0)")
    p.add_argument(
        "--split",
        type=_fractions,
        default=(0.8, 0.1, 0.1),
        help="train,val,test fractions (default 0.8,0.1,0.1)",
    )
    p.add_argument("--split-file", help='JSON {"train": [...], "val": [...], "test": [...]} of study ids')
    p.add_argument(
        "--train-encoder",
        choices=("none", "last", "all"),
        default="none",
        help="also train the image encoder: its last stages or all of it (GPU advised; default none)",
    )
    p.add_argument(
        "--encoder-stages", type=arg_types.positive_int, default=1, help="--train-encoder last: how many stages (default 1)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: fp32 on CPUs without native bf16, bf16/fp16 on CUDA",
    )
    p.add_argument(
        "--freeze-prompt-encoder",
        action="store_true",
        help="train the mask decoder only (the prompt encoder stays as shipped)",
    )
    p.add_argument(
        "--select",
        choices=("best", "last"),
        default="best",
        help="best: the epoch with the best validation Dice (early stopping); last: the final epoch "
        "(validation only reported, so held-out cases may serve as validation)",
    )
    p.add_argument(
        "--propagation-prompts",
        type=arg_types.probability,
        default=0.0,
        metavar="P",
        help="probability of a propagation-like prompt: the box of the target on a neighbouring slice "
        "plus the propagation margin, jittered (default 0)",
    )
    p.add_argument(
        "--propagation-offset",
        type=int,
        default=1,
        help="propagation-like prompts come from up to this many slices away (default 1)",
    )
    p.add_argument(
        "--end-slices",
        type=int,
        default=0,
        help="with propagation-like prompts: also cache and train this many slices beyond each end of the "
        "liver, where a propagation must stop (default 0)",
    )
    p.add_argument(
        "--point-prob", type=arg_types.probability, default=0.3, help="chance of label points added to a box (default 0.3)"
    )
    p.add_argument(
        "--refine-prob",
        type=arg_types.probability,
        default=0.3,
        help="chance of a second pass with a corrective click and mask prompt (default 0.3)",
    )
    p.add_argument(
        "--seed-embeddings",
        metavar="DIR",
        help="folder of emb_<study id>.npz (ks, embs) from an earlier encoder run, used to fill the cache "
        "when one re-encoded slice per study matches",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--threads", type=arg_types.non_negative_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--cache-dir", help="preprocessing cache folder (default RUN_DIR/cache; runs may share one)"
    )
    p.add_argument("--name", help="name to register the best model under (default: the run folder's name)")
    p.add_argument(
        "--no-register", action="store_true", help="do not add the best model to LiverSAM's model list"
    )
    p.add_argument("--no-test-report", action="store_true", help="skip the test-split evaluation at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--events", action="store_true",
        help="print machine-readable LIVERSAM_CACHE (caches being built), _RESUME, _EPOCH and _DONE lines (for Slicer)"
    )
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace):
    from ..training import LabelConfig, TrainingConfig
    from ..training.config import PromptSimulationConfig

    labels = LabelConfig(
        liver_labels=tuple(args.liver_labels),
        tumor_labels=tuple(args.tumor_labels),
        liver_names=tuple(args.liver_names),
        tumor_names=tuple(args.tumor_names),
    )
    return TrainingConfig(
        data=args.data,
        out=args.out,
        base_model=args.base_model,
        labels=labels,
        prompts=PromptSimulationConfig(
            point_prob=args.point_prob,
            refine_prob=args.refine_prob,
            propagation_prob=args.propagation_prompts,
            propagation_max_offset=args.propagation_offset,
        ),
        train_prompt_encoder=not args.freeze_prompt_encoder,
        model_selection=args.select,
        seed_embeddings_dir=args.seed_embeddings,
        window_level=args.window_level,
        window_width=args.window_width,
        max_slices_per_case=args.max_slices,
        min_liver_voxels=args.min_liver_voxels,
        end_slices=args.end_slices,
        augment_copies=args.augment_copies,
        split_fractions=tuple(args.split),
        split_file=args.split_file,
        seed=args.seed,
        train_encoder=args.train_encoder,
        encoder_last_stages=args.encoder_stages,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_min=args.lr_min,
        weight_decay=args.weight_decay,
        tumor_loss_weight=args.tumor_weight,
        precision=args.precision,
        early_stopping_patience=args.patience,
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir,
        model_name=args.name,
        register=not args.no_register,
        test_report=not args.no_test_report,
    )


RUN_FILES = ("config.json", "split.json", "state.pt", "best.pt", "history.csv", "curves.png", "result.json",
             "result.md", "train.log", "test_report.json", "test_report.md", "train.lock")


def check_run_folder(args: argparse.Namespace) -> None:
    """Refuse a run folder that is a file, or whose files would overwrite (or lie inside) the training data."""
    from pathlib import Path

    from ..errors import OutputError
    from ..output_paths import check_outputs, model_input_path
    from ..preflight import check_label_pair
    from ..training.studies import discover_studies

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out '{out}' is a file; give a folder for the run (it is created if missing).")
    studies = discover_studies(args.data)
    inputs: list = [args.data if Path(args.data).is_file() else None, args.split_file, model_input_path(args.base_model)]
    for study in studies:
        inputs += [study.ct_path, study.label_path]
    check_outputs({f"--out file '{name}'": out / name for name in RUN_FILES}, inputs)
    _check_writable_folders(args)
    run_dir = out.resolve()
    mixed = [Path(args.data).resolve()] if Path(args.data).is_dir() else []
    mixed += [s.label_path.resolve().parent for s in studies if s.kind != "ircadb"]
    clash = next((folder for folder in mixed if run_dir.is_relative_to(folder)), None)
    if clash is not None:
        raise OutputError(
            f"--out '{out}' is {'' if run_dir == clash else 'inside '}the folder '{clash}' of the training data: the "
            "run's files would be mixed into it. Give a folder outside the data."
        )
    for study in studies:  # before the run folder is made and the model loaded
        if study.kind == "labelmap":
            check_label_pair(study.case_id, study.ct_path, study.label_path)


def _check_writable_folders(args: argparse.Namespace) -> None:
    """The folders a run writes to besides the run folder, checked before any study is encoded: the preprocessing
    cache (--cache-dir) and the model registry the best model is added to at the end (unless --no-register)."""
    from ..errors import OutputError
    from ..models.checkpoints import user_models_dir
    from ..output_paths import folder_write_problem

    if args.cache_dir and (problem := folder_write_problem(args.cache_dir)) is not None:
        raise OutputError(f"--cache-dir '{args.cache_dir}': {problem}; choose a folder you can write to (the "
                          "encoded studies are stored there), or leave --cache-dir out (RUN_DIR/cache).")
    if not args.no_register and (problem := folder_write_problem(user_models_dir())) is not None:
        raise OutputError(
            f"The model registry folder '{user_models_dir()}' cannot be written ({problem}); the trained model is "
            "registered there when the run ends. Set LIVERSAM_HOME to a folder you can write to, or pass "
            "--no-register (the model stays in the run folder as best.pt)."
        )


def run(args: argparse.Namespace) -> int:
    from ..training import train
    from ..training.allocator import keep_freed_memory_for_reuse
    from ..training.report import summary_markdown

    check_run_folder(args)
    config = config_from_args(args)
    keep_freed_memory_for_reuse()  # this process only trains: reuse freed activations (training/allocator.py)
    result = train(config, progress=not args.no_progress, emit_events=args.events)
    # The run's summary (result.md) for a person, then one JSON line, the last line of stdout, for scripts.
    print(summary_markdown(result.summary))
    best = result.best_metrics
    print(
        json.dumps(
            {
                "best_checkpoint": str(result.best_checkpoint),
                "best_epoch": result.best_epoch,
                "best_val_dice_mean": round(result.best_val_dice, 4),
                "best_val_dice_liver": best.get("val_dice_liver"),
                "best_val_dice_tumor": best.get("val_dice_tumor"),
                "val_dice_mean_of": result.summary.get("val_dice_mean_of"),
                "base_val_dice_mean": result.history[0].get("val_dice_mean") if result.history else None,
                "resumed_from_epoch": result.resumed_from_epoch,
                "registered_name": result.registered_name,
                "test_report": str(result.test_report) if result.test_report else None,
            }
        )
    )
    return 0

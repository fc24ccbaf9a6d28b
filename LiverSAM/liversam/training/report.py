"""After training: register the best model so every LiverSAM front end lists it, and score it against the
base model on the test patients with ``liversam evaluate``'s ``one-box`` protocol."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic_write import write_text_atomically
from .config import TrainingConfig
from .studies import TrainingStudy, load_study

log = logging.getLogger(__name__)


def register_best_model(checkpoint: Path, name: str) -> str:
    """Register ``checkpoint`` under ``name`` in the user's model registry; returns the name."""
    from ..models import register_user_model, safe_torch_load

    checkpoint_data = safe_torch_load(checkpoint)
    metadata = dict(checkpoint_data.get("metadata") or {}) if isinstance(checkpoint_data, dict) else {}
    summary = {
        key: metadata.get(key)
        for key in ("base_model", "trained", "epoch", "metrics", "liversam_version", "created")
        if key in metadata
    }
    # no path: a server lists the description to its clients (GET /v1/models)
    description = metadata.get("description") or f"LiverSAMTrain model of run '{Path(checkpoint).parent.name}'"
    metrics = metadata.get("metrics") or {}
    if metrics.get("val_dice_mean") is not None:
        from .trainer import mean_dice_text

        description += f"; validation Dice {mean_dice_text(metrics['val_dice_mean'], metrics, digits=3)}"
    register_user_model(name, checkpoint, description=description, metadata=summary)
    log.info("registered model '%s' -> %s", name, checkpoint)
    return name


NO_TUMOUR = "no tumour"
SELECTED_BY = {
    "best": "the epoch with the highest mean validation Dice (an epoch must beat the best so far; epoch 0, the base "
    "model, when no trained epoch beats it)",
    "last": "the last epoch (--select last; validation is only reported)",
}


def _figures(row: dict) -> dict:
    return {"liver": row.get("val_dice_liver"), "tumor": row.get("val_dice_tumor"), "mean": row.get("val_dice_mean")}


def validation_summary(base_row: dict, best_row: dict, model_selection: str = "best") -> dict:
    """The validation figures of a run for ``result.json`` / ``result.md``: Dice of liver, tumour and their mean
    (``mean_of`` says when it is the liver's alone) of the base model (epoch 0, ``base_row``) and of best.pt's model
    (``best_row``), pooled over the validation slices and per validation case (``cases``: ``tumor`` None and
    ``has_tumor`` False for a case without tumour on its validation slices)."""
    from .trainer import dice_mean_of

    base_cases, best_cases = base_row.get("val_cases") or {}, best_row.get("val_cases") or {}
    cases = []
    for case_id in sorted(set(base_cases) | set(best_cases)):
        base, best = base_cases.get(case_id) or {}, best_cases.get(case_id) or {}
        has_tumor = (best or base).get("dice_tumor") is not None
        cases.append({
            "case": case_id,
            "slices": (best or base).get("slices"),
            "has_tumor": has_tumor,
            "base": {"liver": base.get("dice_liver"), "tumor": base.get("dice_tumor")},
            "best": {"liver": best.get("dice_liver"), "tumor": best.get("dice_tumor")},
        })  # fmt: skip
    return {
        "prompts": "decoder only, one exact box per slice (liver) and per 2D lesion (tumour) on the validation slices",
        "mean_of": dice_mean_of(base_row or best_row),
        "best_checkpoint_chosen_by": SELECTED_BY.get(model_selection, model_selection),
        "base": {"epoch": base_row.get("epoch", 0), **_figures(base_row)},
        "best": {"epoch": best_row.get("epoch"), **_figures(best_row)},
        "cases": cases,
    }


def summary_markdown(summary: dict) -> str:
    """``result.md`` and what ``liversam train`` prints at its end: the run's outcome and its validation figures
    (markdown tables, readable as plain text) from a ``result.json`` summary."""
    from .trainer import LIVER_ONLY

    validation = summary.get("validation") or {}
    base, best = validation.get("base") or {}, validation.get("best") or {}

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def tumour(value, has_tumor: bool = True) -> str:
        return NO_TUMOUR if not has_tumor or value is None else fmt(value)

    liver_only = validation.get("mean_of") == LIVER_ONLY
    epochs = summary.get("epochs_run")
    lines = [
        f"# LiverSAMTrain run '{summary.get('run_dir')}'",
        "",
        f"- trained: {epochs} epoch(s){' (stopped early)' if summary.get('stopped_early') else ''}"
        + (f", resumed after epoch {summary['resumed_from_epoch']}" if summary.get("resumed_from_epoch") else ""),
        f"- best.pt: epoch {best.get('epoch')}"
        + (" (the base model: no trained epoch beat it)" if best.get("epoch") == 0 and epochs else ""),
        f"- best.pt chosen by: {validation.get('best_checkpoint_chosen_by', 'n/a')}",
        f"- validation: {validation.get('prompts', 'n/a')}",
    ]
    if summary.get("registered_name"):
        lines.append(f"- registered as '{summary['registered_name']}'")
    if summary.get("test_report"):
        lines.append(f"- test report: {summary['test_report']}")
    lines += [
        "",
        "## Validation Dice",
        "",
        f"| | base model (epoch {base.get('epoch', 0)}) | best.pt (epoch {best.get('epoch')}) |",
        "|---|---|---|",
        f"| liver | {fmt(base.get('liver'))} | {fmt(best.get('liver'))} |",
        f"| tumour | {tumour(base.get('tumor'), not liver_only)} | {tumour(best.get('tumor'), not liver_only)} |",
        f"| mean{f' ({LIVER_ONLY})' if liver_only else ' of liver and tumour'} | {fmt(base.get('mean'))} | "
        f"{fmt(best.get('mean'))} |",
        "",
        "## Per validation case",
        "",
    ]
    cases = validation.get("cases") or []
    if cases:
        lines += [
            "| case | slices | liver base | liver best.pt | tumour base | tumour best.pt |",
            "|---|---|---|---|---|---|",
        ]
        for case in cases:
            has = case.get("has_tumor", True)
            lines.append(
                f"| {case['case']} | {case.get('slices', 'n/a')} | {fmt(case['base'].get('liver'))} | "
                f"{fmt(case['best'].get('liver'))} | {tumour(case['base'].get('tumor'), has)} | "
                f"{tumour(case['best'].get('tumor'), has)} |"
            )
    else:
        lines.append("Not recorded: these epochs were validated by a LiverSAM version without per-case figures.")
    return "\n".join(lines) + "\n"


def _test_cases(run_dir: Path, studies: list[TrainingStudy], config: TrainingConfig):
    """Evaluation cases for the test studies: their CT and a labelmap (1 liver, 2 tumour) written from
    the study's labels as training read them (so .seg.nrrd and 3D-IRCADb studies are scored alike)."""
    import numpy as np

    from ..ct_io import volume_to_sitk
    from ..evaluate import EvaluationCase

    label_dir = run_dir / "test_labels"
    label_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for study in studies:
        loaded = load_study(study, config.labels)
        labelmap = np.zeros(loaded.liver_kji.shape, dtype=np.uint8)
        labelmap[loaded.liver_kji] = 1
        labelmap[loaded.tumor_kji] = 2
        path = label_dir / f"{study.case_id}.nii.gz"
        import SimpleITK as sitk

        from ..atomic_write import atomic_path

        with atomic_path(path) as tmp:
            sitk.WriteImage(volume_to_sitk(labelmap, loaded.volume.geometry), str(tmp), useCompression=True)
        cases.append(EvaluationCase(study.case_id, study.ct_path, path))
    return cases


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _earlier_inputs(json_path: Path) -> dict | None:
    """What an earlier test report in the run folder was computed from (None: none, or unreadable)."""
    try:
        return json.loads(json_path.read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


def write_test_report(
    run_dir: Path,
    studies: list[TrainingStudy],
    checkpoint: Path,
    base_model: str,
    config: TrainingConfig,
    progress: bool = True,
) -> Path:
    """Evaluate base and trained model on the test studies (``one-box``); write ``test_report.json`` and
    ``test_report.md`` in ``run_dir``; returns the JSON path. A report already computed from the same best.pt, base
    model, test studies' files and LiverSAM version is kept (a finished run run again)."""
    from .. import __version__
    from ..dense_crf import crf_available
    from ..evaluate import EvaluationSettings, default_structures, evaluate

    json_path = run_dir / "test_report.json"
    inputs = {
        "checkpoint_sha256": _sha256(checkpoint),
        "base_model": base_model,
        "test_cases": {s.case_id: s.content_hash() for s in studies},
        "liversam_version": __version__,
    }
    if _earlier_inputs(json_path) == inputs:  # a finished run run again: the same scores, minutes of evaluation
        log.info("test report: %s already scores this best.pt on these test cases; kept", json_path)
        return json_path
    cases = _test_cases(run_dir, studies, config)
    structures = tuple(default_structures((1, 2), (2,)))
    # liversam evaluate's defaults (--crf auto: every structure where pydensecrf2 is installed), LiverSAM's own
    # propagation alone: the report scores the pipeline users run, not the naive reference loop
    settings = EvaluationSettings(
        protocols=("one-box",),
        structures=structures,
        crf=tuple(s.name for s in structures) if crf_available() else (),
        propagation_methods=("liversam",),
    )
    results = {}
    for label, model in (("base", base_model), ("trained", str(checkpoint))):
        log.info("test report: evaluating the %s model on %d test case(s)", label, len(cases))
        results[label] = evaluate(
            cases, settings, model=model, device=config.device, progress=progress, accelerate="auto"
        )
    rows = []
    for structure in ("liver", "tumor"):
        for metric in ("dice", "iou", "hd95_mm"):
            values = {
                label: (result["aggregate"]["one-box"].get(structure, {}).get(metric) or {}).get("mean")
                for label, result in results.items()
            }
            rows.append({"structure": structure, "metric": metric, **values})
    per_case = _per_case_dice(results, [c.case_id for c in cases])
    report = {
        "inputs": inputs,
        "protocol": "one-box",
        "test_cases": [c.case_id for c in cases],
        "comparison": rows,
        "per_case": per_case,
        "results": results,
    }
    write_text_atomically(json_path, json.dumps(report, indent=2))

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        "# LiverSAMTrain test report",
        "",
        f"Protocol `one-box` of `liversam evaluate` on {len(cases)} test patient(s): {', '.join(c.case_id for c in cases)}"
        f"; dense CRF on {', '.join(settings.crf) or 'nothing (pydensecrf2 not installed)'}.",
        "",
        *(f"- {label} model: {result.get('acceleration', 'n/a')}" for label, result in results.items()),
        "",
        f"| structure | metric | base ({base_model}) | trained |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['structure']} | {r['metric']} | {fmt(r['base'])} | {fmt(r['trained'])} |" for r in rows]
    lines += [
        "",
        "Dice per test case (\"no tumour\": the case's label has none):",
        "",
        "| case | liver base | liver trained | tumour base | tumour trained |",
        "|---|---|---|---|---|",
    ]
    for row in per_case:
        tumour = [("no tumour" if row["has_tumor"] is False else fmt(row[f"tumor_{label}"])) for label in ("base", "trained")]
        lines.append(f"| {row['case']} | {fmt(row['liver_base'])} | {fmt(row['liver_trained'])} | {tumour[0]} | "
                     f"{tumour[1]} |")
    write_text_atomically(run_dir / "test_report.md", "\n".join(lines) + "\n")
    return json_path


def _per_case_dice(results: dict, case_ids: list[str]) -> list[dict]:
    """Each test case's one-box Dice of the liver and the tumour for the base and the trained model (None where the
    evaluation gave none), and whether its label holds tumour at all (None: the case is not in the results)."""
    def dice(label: str, case_id: str, structure: str):
        for case in results[label].get("cases", []):
            if case.get("id") == case_id:
                entry = (case.get("protocols", {}).get("one-box") or {}).get(structure) or {}
                return entry.get("dice"), bool(entry.get("reference_voxels", 1))
        return None, None  # not evaluated: nothing known of its tumour ("n/a", not "no tumour")

    rows = []
    for case_id in case_ids:
        row: dict = {"case": case_id}
        for structure in ("liver", "tumor"):
            for label in ("base", "trained"):
                row[f"{structure}_{label}"], present = dice(label, case_id, structure)
                if structure == "tumor" and label == "base":
                    row["has_tumor"] = present
        rows.append(row)
    return rows

"""What `liversam train` tells a user at the end and draws in the run folder: the validation Dice of liver and tumour
and their mean (said to be the liver's alone when the validation cases have no tumour), per validation case, in the
printed summary, result.json and result.md; curves.png with the training and the validation loss on axes of their
own; and, on Ctrl-C, the cache's progress bar closed before the "interrupted" message.

The two short runs are decoder-only on real CT (hcc0697 trains; lits117, with tumour, and totalseg_small, a liver
without tumour, validate), 3 slices per study encoded once into a cache shared by this file, 1 epoch, 1 thread.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liversam.training.trainer import LIVER_ONLY, MEAN_OF_BOTH, write_history

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- the summary of a run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory, data_dir):
    """A data folder of three studies (read in place) and a cache and LIVERSAM_HOME shared by the runs."""
    root = tmp_path_factory.mktemp("summary")
    data = root / "data"
    for case in ("lits117", "hcc0697"):
        (data / case).mkdir(parents=True)
        for name in ("ct.nii.gz", "label.nii.gz"):
            (data / case / name).symlink_to(data_dir / case / name)
    (data / "totalseg").mkdir()  # a liver without tumour (a model's liver mask: enough to validate on)
    (data / "totalseg" / "ct.nii.gz").symlink_to(data_dir / "totalseg_small" / "ct.nii.gz")
    (data / "totalseg" / "label.nii.gz").symlink_to(data_dir / "totalseg_small" / "liver_model_output.nii.gz")
    return {"root": root, "data": data, "cache": root / "cache", "home": root / "home"}


def _train(shared: dict, name: str, val: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    split = shared["root"] / f"{name}-split.json"
    split.write_text(json.dumps({"train": ["hcc0697"], "val": val, "test": []}))
    run_dir = shared["root"] / name
    command = [
        sys.executable, "-m", "liversam", "train", "--data", str(shared["data"]), "--out", str(run_dir),
        "--split-file", str(split), "--max-slices", "3", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
        "--threads", "1", "--seed", "0", "--no-progress", "--no-register", "--cache-dir", str(shared["cache"]),
    ]  # fmt: skip
    env = dict(os.environ, LIVERSAM_HOME=str(shared["home"]), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT / "LiverSAM") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done, run_dir


@pytest.mark.model
def test_the_summary_gives_liver_and_tumour_dice_per_validation_case(shared):
    """The run's summary gave one 'val Dice mean' and no per-case figures: a user could not tell the liver from the
    tumour, nor which case was poor. Now the printed summary, result.json and result.md give liver, tumour and mean
    for the base model and best.pt, and each validation case's liver and tumour Dice ("no tumour" for a case
    without)."""
    done, run_dir = _train(shared, "mixed", ["lits117", "totalseg"])
    print(done.stdout)
    result = json.loads((run_dir / "result.json").read_text())
    validation = result["validation"]
    assert validation["mean_of"] == result["val_dice_mean_of"] == MEAN_OF_BOTH
    assert "highest mean validation Dice" in validation["best_checkpoint_chosen_by"]
    for which in ("base", "best"):
        figures = validation[which]
        assert 0.5 < figures["liver"] <= 1 and 0.3 < figures["tumor"] <= 1
        assert figures["mean"] == pytest.approx((figures["liver"] + figures["tumor"]) / 2)
    assert validation["best"]["epoch"] == result["best_epoch"]
    cases = {case["case"]: case for case in validation["cases"]}
    assert sorted(cases) == ["lits117", "totalseg"] and all(case["slices"] == 3 for case in cases.values())
    assert cases["lits117"]["has_tumor"] and cases["lits117"]["best"]["tumor"] > 0.3
    assert cases["lits117"]["best"]["tumor"] == pytest.approx(validation["best"]["tumor"])  # the only one with tumour
    assert not cases["totalseg"]["has_tumor"] and cases["totalseg"]["best"]["tumor"] is None
    assert 0.5 < cases["totalseg"]["best"]["liver"] <= 1
    markdown = (run_dir / "result.md").read_text()
    assert done.stdout.startswith(markdown)  # what is printed is result.md, then the JSON line for scripts
    tumour = f"{validation['best']['tumor']:.3f}"
    assert f"| tumour | {validation['base']['tumor']:.3f} | {tumour} |" in markdown
    assert "| mean of liver and tumour |" in markdown
    assert "| case | slices | liver base | liver best.pt | tumour base | tumour best.pt |" in markdown
    assert f"| lits117 | 3 | {cases['lits117']['base']['liver']:.3f} |" in markdown
    assert "| totalseg | 3 |" in markdown and "| no tumour | no tumour |" in markdown
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["best_val_dice_tumor"] == pytest.approx(validation["best"]["tumor"])
    assert last["val_dice_mean_of"] == MEAN_OF_BOTH
    assert "tumour best.pt" in done.stdout and "best.pt chosen by" in done.stdout


@pytest.mark.model
def test_a_mean_without_tumour_in_validation_says_it_is_the_liver_s_alone(shared, tmp_path, monkeypatch):
    """With validation cases without tumour, 'val Dice mean' silently became the liver's Dice: now the summary, the
    epoch lines, result.json, the checkpoint and the registered model's description say "liver only: the validation
    cases have no tumour"."""
    import torch

    from liversam.models import registered_models
    from liversam.training.report import register_best_model

    done, run_dir = _train(shared, "liver-only", ["totalseg"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["val_dice_mean_of"] == result["validation"]["mean_of"] == LIVER_ONLY
    assert result["validation"]["best"]["tumor"] is None
    assert result["validation"]["best"]["mean"] == pytest.approx(result["validation"]["best"]["liver"])
    markdown = (run_dir / "result.md").read_text()
    assert f"| mean ({LIVER_ONLY}) |" in markdown and "| tumour | no tumour | no tumour |" in markdown
    epoch_lines = [line for line in done.stderr.splitlines() if "liversam.training.trainer: epoch " in line]
    assert len(epoch_lines) == 2 and all(f"({LIVER_ONLY})" in line for line in epoch_lines), epoch_lines
    assert "tumour n/a (none in validation)" in epoch_lines[0]
    metadata = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["metadata"]
    assert metadata["val_dice_mean_of"] == LIVER_ONLY and metadata["val_cases"]["totalseg"]["dice_tumor"] is None
    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path / "home"))
    register_best_model(run_dir / "best.pt", "liver-only")
    [model] = [m for m in registered_models() if m.name == "liver-only"]
    assert model.description.endswith(f"validation Dice {result['best_val_dice_mean']:.3f} ({LIVER_ONLY})")


# --- curves.png ------------------------------------------------------------------------------------------------
def _history(tumour: bool = True) -> list[dict]:
    rows = []
    for epoch, (train, val) in enumerate([(None, 0.32), (0.90, 0.31), (0.60, 0.30), (0.45, 0.30)]):
        liver, tumor = 0.90 + 0.01 * epoch, (0.70 + 0.02 * epoch if tumour else None)
        rows.append({"epoch": epoch, "train_loss": train, "val_loss": val, "val_dice_liver": liver,
                     "val_dice_tumor": tumor, "val_dice_mean": (liver + tumor) / 2 if tumour else liver})  # fmt: skip
    return rows


def _drawn(history: list[dict], tmp_path: Path, monkeypatch):
    """The figure :func:`write_history` saves as curves.png (its matplotlib objects, not pixels)."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    write_history(history, tmp_path / "history.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000 and len(saved) == 1
    return saved[0]


def _axes_of(figure, values: list[float]):
    """The axes holding a line whose y values are ``values``."""
    return [axes for axes in figure.axes if any(list(line.get_ydata()) == values for line in axes.get_lines())]


def test_training_and_validation_loss_have_axes_of_their_own(tmp_path, monkeypatch):
    """curves.png drew the training loss (0.45-0.9 here) and the validation loss (0.30-0.32) on one axis, so the
    validation curve was a flat line at the bottom; they are different quantities (the training loss adds the IoU
    head's error, under jittered prompts). Each now has its own axes, scaled to it, with the quantity and its unit
    on the y axis."""
    history = _history()
    figure = _drawn(history, tmp_path, monkeypatch)
    [train_axes] = _axes_of(figure, [0.90, 0.60, 0.45])
    [val_axes] = _axes_of(figure, [0.32, 0.31, 0.30, 0.30])
    assert train_axes is not val_axes
    assert len(train_axes.get_lines()) == 1 and len(val_axes.get_lines()) == 1
    low, high = val_axes.get_ylim()
    assert low > 0.2 and high < 0.4  # scaled to the validation loss, not to the training loss
    assert "training" in train_axes.get_title() and "validation" in val_axes.get_title()
    assert "Dice + BCE" in train_axes.get_ylabel() and "unitless" in train_axes.get_ylabel()
    assert "Dice + BCE" in val_axes.get_ylabel() and "unitless" in val_axes.get_ylabel()
    for axes in (train_axes, val_axes):
        assert axes.get_xlabel().startswith("epoch")
    [dice_axes] = _axes_of(figure, [row["val_dice_liver"] for row in history])
    assert dice_axes not in (train_axes, val_axes) and "Dice" in dice_axes.get_ylabel()
    labels = [text.get_text() for text in dice_axes.get_legend().get_texts()]
    assert labels == ["liver", "tumour", "mean of liver and tumour"]


def test_the_curves_say_when_the_mean_dice_is_the_liver_s_alone(tmp_path, monkeypatch):
    history = _history(tumour=False)
    figure = _drawn(history, tmp_path, monkeypatch)
    [dice_axes] = _axes_of(figure, [row["val_dice_liver"] for row in history])
    labels = [text.get_text() for text in dice_axes.get_legend().get_texts()]
    assert labels[0] == "liver" and "tumour" not in labels[:-1]
    assert "liver only" in labels[-1] and "no tumour" in labels[-1]


# --- Ctrl-C while the caches are built ------------------------------------------------------------------------
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log"])
def test_ctrl_c_while_caching_closes_the_bar_before_the_interrupted_message(
    terminal, tmp_path, data_dir, capsys, monkeypatch
):
    """After Ctrl-C while a study's cache was built, `liversam train` printed "interrupted; ..." and then, when the
    exception's frames were freed, the cache's tqdm bar drew itself again below it (in a log, the stage never said it
    ended). The bar is now closed first: the message is the last thing on stderr."""
    import liversam.progress
    import liversam.training.cache as cache_module
    from liversam.cli import main

    data = tmp_path / "data" / "p1"
    data.mkdir(parents=True)
    for name in ("ct.nii.gz", "label.nii.gz"):
        (data / name).symlink_to(data_dir / "lits117" / name)
    monkeypatch.setattr(liversam.progress, "_is_terminal", lambda stream: terminal)
    calls = []

    def window_then_ctrl_c(*args, **kwargs):  # the third slice: Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = cache_module.window_slice
    monkeypatch.setattr(cache_module, "window_slice", window_then_ctrl_c)
    # --train-encoder last: the cache holds images only (nothing encoded before the interruption)
    code = main(["train", "--data", str(data.parent), "--out", str(tmp_path / "run"), "--max-slices", "4",
                 "--train-encoder", "last", "--device", "cpu", "--threads", "1", "--no-register"])  # fmt: skip
    gc.collect()  # frames the exception held are freed: an open bar would draw itself now
    err = capsys.readouterr().err
    assert code == 130
    message = "liversam train: interrupted; the run folder keeps its last finished epoch"
    assert message in err
    before, after = err.split(message, 1)
    assert after.strip().startswith("(and the caches of the studies already encoded)") and after.count("\n") == 1, (
        f"written after the message: {after!r}"
    )
    if terminal:
        assert "cache p1:" in before and "2/4" in before and before.endswith("\n"), before[-300:]
    else:
        assert "[liversam] cache p1: interrupted, 2/4 slices after" in before, before[-600:]


def test_the_test_report_gives_each_test_cases_dice_and_says_when_a_case_has_no_tumour():
    """test_report.md gave the mean over the test cases only; a case without tumour now reads "no tumour", not a
    Dice of an empty reference."""
    from liversam.training.report import _per_case_dice

    def case(case_id, liver, tumour, tumour_voxels):
        return {"id": case_id, "protocols": {"one-box": {
            "liver": {"dice": liver, "reference_voxels": 1000},
            "tumor": {"dice": tumour, "reference_voxels": tumour_voxels}}}}

    results = {"base": {"cases": [case("a", 0.95, 0.70, 300), case("b", 0.93, 1.0, 0)]},
               "trained": {"cases": [case("a", 0.96, 0.72, 300), case("b", 0.94, 1.0, 0)]}}
    rows = _per_case_dice(results, ["a", "b"])
    assert rows[0] == {"case": "a", "liver_base": 0.95, "liver_trained": 0.96, "tumor_base": 0.70,
                       "tumor_trained": 0.72, "has_tumor": True}
    assert rows[1]["has_tumor"] is False and rows[1]["liver_trained"] == 0.94
    (missing,) = _per_case_dice(results, ["c"])  # not evaluated: unknown, not "no tumour"
    assert missing["has_tumor"] is None and missing["liver_base"] is None

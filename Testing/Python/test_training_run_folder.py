"""`liversam train` run folders and inputs a user gets wrong: a run started over in a folder that holds an earlier
run's best.pt, a resume after the training data changed, a finished run resumed with a larger --patience / --epochs, a study folder with a file missing, a label volume given
as the CT, a label whose liver is too small on every slice. Real CT (lits117); the short runs are decoder-only
on a cache shared by the tests of this file (12 slices encoded once), 1 thread.

One finished run (``first_run``) is made once and copied by the tests that start a run over or resume it; runs refused
before training are run in this process (``main``, the command line's own entry point: its exit code and stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liversam.training import LabelConfig, TrainingConfig, TrainingDataError, discover_studies, load_study

REPO_ROOT = Path(__file__).resolve().parents[2]
# The settings of the first run: a learning rate that fine-tunes in one epoch, and best.pt the last epoch's model.
FIRST_RUN = ("--lr", "1e-3", "--select", "last", "--propagation-prompts", "0.7", "--no-register")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-folder")
    return {"root": root, "cache": root / "cache", "home": root / "home"}


def _arguments(data: Path, run_dir: Path, shared: dict, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(run_dir),
        "--max-slices", "12", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--threads", "1",
        "--seed", "0", "--no-progress", "--cache-dir", str(shared["cache"]), *extra,
    ]  # fmt: skip


def _train(data: Path, run_dir: Path, shared: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "liversam", *_arguments(data, run_dir, shared, *extra)]
    env = dict(os.environ, LIVERSAM_HOME=str(shared["home"]), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT / "LiverSAM") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _train_here(data: Path, run_dir: Path, shared: dict, monkeypatch, capsys, *extra: str) -> tuple[int, str, str]:
    """`liversam train` as :func:`_train` runs it, in this process (no interpreter, torch and model start-up): its exit
    code, stdout and stderr. What is process-wide is kept from this process: the torch threads (--threads) and the
    allocator thresholds of a training process."""
    import torch

    import liversam.training.allocator
    from liversam.cli import main

    monkeypatch.setenv("LIVERSAM_HOME", str(shared["home"]))
    monkeypatch.setattr(liversam.training.allocator, "keep_freed_memory_for_reuse", lambda: False)
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = main(_arguments(data, run_dir, shared, *extra))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def _checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def first_run(shared, data_dir):
    """One finished run on a copy of lits117's files (test_resuming_after_the_training_data_changed_is_refused changes
    its label, and puts it back), with the settings FIRST_RUN; the tests copy its folder."""
    data = shared["root"] / "data" / "lits117"
    data.mkdir(parents=True)
    for name in ("ct.nii.gz", "label.nii.gz"):
        shutil.copy(data_dir / "lits117" / name, data / name)
    run = shared["root"] / "first-run"
    done = _train(data, run, shared, *FIRST_RUN)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"data": data, "run": run, "stderr": done.stderr}


def _copy_of(first_run: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(first_run["run"], tmp_path / "run"))


@pytest.mark.model
def test_a_run_started_over_never_ships_the_earlier_run_s_best_checkpoint(tmp_path, shared, first_run, monkeypatch,
                                                                          capsys):  # fmt: skip
    """The refusal to resume with other settings says 'delete the folder's state.pt to start this run over'. The
    new run's best.pt must then be its own: when none of its epochs beats the base model, the base model (as the
    log says), not the earlier run's fine-tuned model left in the folder, which was registered under the new
    run's name."""
    import torch

    from liversam.models import load_model

    run, data = _copy_of(first_run, tmp_path), first_run["data"]
    earlier = _checkpoint(run / "best.pt")
    assert earlier["metadata"]["epoch"] == 1
    code, _out, err = _train_here(data, run, shared, monkeypatch, capsys, "--lr", "1e-12", "--lr-min", "0")
    assert code == 2 and "delete the folder's state.pt" in err, err
    (run / "state.pt").unlink()
    # A learning rate that changes nothing: no epoch beats the base model.
    again = _train(data, run, shared, "--lr", "1e-12", "--lr-min", "0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["best_epoch"] == 0
    assert "best.pt is the base model" in again.stderr
    shipped = _checkpoint(run / "best.pt")
    assert shipped["metadata"]["epoch"] == 0 and shipped["metadata"]["metrics"]["lr"] == 1e-12
    base = load_model("litemedsam", device="cpu").network.state_dict()
    changed = [k for k, v in earlier["model_state"].items() if not torch.equal(v, base[k])]
    assert changed  # the earlier run did fine-tune
    assert all(torch.equal(shipped["model_state"][k], base[k]) for k in changed)
    registry = json.loads((shared["home"] / "models" / "registry.json").read_text())
    assert [(m["name"], m["metadata"]["epoch"]) for m in registry] == [("run", 0)]


@pytest.mark.model
def test_a_run_started_over_splits_by_its_own_settings(tmp_path, shared, first_run):
    """Started over (state.pt deleted) with another --split, the old code reused the earlier run's split.json and
    trained on 9 slices instead of the 6 asked for (with another --max-slices: on the few slices both selections
    share, down to one)."""
    run = _copy_of(first_run, tmp_path)
    assert [len(v) for v in json.loads((run / "split.json").read_text())["slices"].values()] == [9, 2]
    (run / "state.pt").unlink()
    again = _train(first_run["data"], run, shared, "--no-register", "--split", "0.6,0.2,0.2")
    assert again.returncode == 0, again.stdout + again.stderr
    split = json.loads((run / "split.json").read_text())
    assert [len(split["slices"][k]) for k in ("train", "val")] == [6, 5]
    assert "6 training / 5 validation samples" in again.stderr
    assert _checkpoint(run / "best.pt")["metadata"]["split"] == split


@pytest.mark.model
def test_resuming_after_the_training_data_changed_is_refused(tmp_path, shared, first_run, monkeypatch, capsys):
    """A rerun resumes from state.pt. When a study's files changed since the run started (a corrected label), the
    old code rebuilt that study's cache and silently went on training the saved model on the new data; now it
    refuses, names the study, and leaves the run folder as it was."""
    run, data = _copy_of(first_run, tmp_path), first_run["data"]
    code, out, err = _train_here(data, run, shared, monkeypatch, capsys, *FIRST_RUN)  # same files: resumes
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["resumed_from_epoch"] == 1  # (nothing left to do)
    original = (data / "label.nii.gz").read_bytes()
    try:
        label = sitk.ReadImage(str(data / "label.nii.gz"))
        array = sitk.GetArrayFromImage(label)
        array[array == 2] = 1  # the tumours relabelled as liver
        corrected = sitk.GetImageFromArray(array)
        corrected.CopyInformation(label)
        sitk.WriteImage(corrected, str(data / "label.nii.gz"))
        before = {
            p.name: p.stat().st_mtime_ns
            for p in run.iterdir()
            if p.name in ("state.pt", "best.pt", "history.csv")
        }
        code, _out, err = _train_here(data, run, shared, monkeypatch, capsys, *FIRST_RUN)
        assert code == 2, err[-3000:]
        assert "training data changed" in err and "'lits117'" in err
        assert str(data / "label.nii.gz") in err and "new --out folder" in err
        assert {n: (run / n).stat().st_mtime_ns for n in before} == before
        assert len(list(shared["cache"].glob("lits117-*.h5"))) == 1  # nothing encoded for the changed study
    finally:
        (data / "label.nii.gz").write_bytes(original)  # first_run's data as it was


def _resume_config(data: Path, run_dir: Path, shared: dict, **changes) -> TrainingConfig:
    """The settings of :func:`_train` (same cache key: the shared cache is reused), with a learning rate that changes
    nothing, so no epoch beats the base model and early stopping is decided by --patience alone."""
    settings = dict(data=str(data), out=str(run_dir), max_slices_per_case=12, batch_size=4, device="cpu", seed=0,
                    cache_dir=str(shared["cache"]), lr=1e-12, lr_min=0.0, register=False, test_report=False)  # fmt: skip
    return TrainingConfig(**{**settings, **changes})


@pytest.mark.model
def test_a_finished_run_trains_on_when_patience_or_epochs_are_raised(tmp_path, shared, data_dir, caplog, monkeypatch):
    """A run that stopped early was 'finished' for good: resumed with a larger --patience the old code trained nothing
    (and refused a larger --epochs as a changed setting). Now the same run trains on from its checkpoint (same split,
    optimiser and scheduler state) until the new patience or epoch limit; with unchanged settings it says it is
    finished and which setting to raise; a lower --epochs is refused."""
    import logging

    from liversam import acceleration
    from liversam.models import load_model, safe_torch_load
    from liversam.training import Trainer, TrainingRunError

    # One model for the in-process runs, its encoder accelerated once (each `liversam train` process does this anew;
    # the shared cache is reused). Training changes only what each resumed run restores from state.pt.
    model = load_model("litemedsam", device="cpu")
    acceleration.enable_fast_encoder(model, "auto")
    acceleration.disable_fast_decoder(model)
    run = tmp_path / "run"
    data = data_dir / "lits117"
    caplog.set_level(logging.INFO, logger="liversam")

    def train(**changes):
        return Trainer(_resume_config(data, run, shared, **changes), model=model, progress=False).run()

    def state() -> dict:
        return safe_torch_load(run / "state.pt")

    epoch_lines: list[tuple[int, list[str]]] = []  # (the EPOCH line's epoch, history.csv's epochs when it is printed)
    printed = Trainer._event

    def event(self, kind: str, payload: dict) -> None:
        if kind == "EPOCH":
            rows = (run / "history.csv").read_text().splitlines()[1:] if (run / "history.csv").exists() else []
            epoch_lines.append((payload["epoch"], [row.split(",")[0] for row in rows]))
        printed(self, kind, payload)

    monkeypatch.setattr(Trainer, "_event", event)
    first = train(epochs=3, early_stopping_patience=1)
    assert [row["epoch"] for row in first.history] == [0, 1] and first.stopped_early
    # LiverSAMTrain reads history.csv when an EPOCH line arrives: each line comes once its row is written (epoch 0's
    # came before, so the chart stayed empty until epoch 1)
    assert epoch_lines == [(0, ["0"]), (1, ["0", "1"])]
    split = (run / "split.json").read_text()
    steps = state()["scheduler"]["last_epoch"]  # optimiser steps per epoch (9 training slices, batch 4: 3)
    assert steps == 3 and state()["finished"]

    caplog.clear()
    unchanged = train(epochs=3, early_stopping_patience=1)
    assert [row["epoch"] for row in unchanged.history] == [0, 1] and unchanged.resumed_from_epoch == 1
    assert (
        "is finished: it stopped early at epoch 1" in caplog.text
        and "raise --patience above 1" in caplog.text
    )

    caplog.clear()
    patient = train(epochs=3, early_stopping_patience=2)  # the old code trained nothing here
    assert [row["epoch"] for row in patient.history] == [0, 1, 2] and patient.resumed_from_epoch == 1
    assert patient.stopped_early and "is finished" not in caplog.text
    saved = state()
    assert saved["epoch"] == 2 and saved["epochs_without_improvement"] == 2
    # the optimiser and the schedule went on from epoch 1's state (not restarted), on the same split
    assert saved["scheduler"]["last_epoch"] == 2 * steps and saved["scheduler"]["T_max"] == 3 * steps
    assert max(int(moments["step"]) for moments in saved["optimizer"]["state"].values()) == 2 * steps
    assert (run / "split.json").read_text() == split

    longer = train(epochs=4, early_stopping_patience=3)  # the old code refused: "different settings (epochs)"
    assert [row["epoch"] for row in longer.history] == [0, 1, 2, 3] and longer.resumed_from_epoch == 2
    saved = state()
    assert saved["scheduler"]["T_max"] == 4 * steps  # the cosine now spans the 4 epochs
    assert saved["scheduler"]["last_epoch"] == 3 * steps and saved["epochs_without_improvement"] == 3

    with pytest.raises(TrainingRunError) as refused:
        train(epochs=3, early_stopping_patience=4)
    assert "--epochs 3 is lower than the 4" in str(refused.value) and "new --out folder" in str(refused.value)
    with pytest.raises(TrainingRunError, match=r"different settings \(lr\)"):
        train(epochs=4, lr=1e-3)


def test_a_raised_epoch_count_stretches_the_cosine_schedule_from_the_step_reached():
    """After a resume with a larger --epochs the learning rate follows, from the step reached, the cosine of a run
    started with the new count (the restored scheduler alone would run its old cosine past its end and back up)."""
    import torch

    from liversam.training.trainer import stretch_cosine_schedule

    def scheduler(total_steps: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=1e-6)

    short, planned = scheduler(10), scheduler(30)
    for _ in range(10):
        short.optimizer.step()
        short.step()
        planned.optimizer.step()
        planned.step()
    resumed = scheduler(10)
    resumed.load_state_dict(short.state_dict())  # what a resume restores
    assert not stretch_cosine_schedule(resumed, 10)  # the same horizon: left alone
    assert stretch_cosine_schedule(resumed, 30)
    assert resumed.get_last_lr() == pytest.approx(planned.get_last_lr())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(planned.optimizer.param_groups[0]["lr"])
    for _ in range(20):
        resumed.optimizer.step()
        resumed.step()
        planned.optimizer.step()
        planned.step()
        assert resumed.get_last_lr() == pytest.approx(planned.get_last_lr(), rel=1e-9)
    assert resumed.get_last_lr()[0] == pytest.approx(1e-6)


# --- inputs ------------------------------------------------------------------------------------------------------


def _study(
    folder: Path, data_dir: Path, ct: str | None = "ct.nii.gz", label: str | None = "label.nii.gz"
) -> Path:
    folder.mkdir(parents=True)
    if ct:
        (folder / ct).symlink_to(data_dir / "lits117" / "ct.nii.gz")
    if label:
        (folder / label).symlink_to(data_dir / "lits117" / "label.nii.gz")
    return folder


def test_a_study_folder_with_a_file_missing_is_named_not_left_out(tmp_path, data_dir):
    """Three study folders, one without its label: the old code trained on the other two without a word."""
    root = tmp_path / "data"
    _study(root / "p1", data_dir)
    _study(root / "p2", data_dir)
    _study(root / "p3", data_dir, label=None)
    (root / "p3" / "liver_seg.nii.gz").symlink_to(
        data_dir / "lits117" / "label.nii.gz"
    )  # a label under another name
    with pytest.raises(TrainingDataError) as error:
        discover_studies(root)
    message = str(error.value)
    assert str(root / "p3") in message and "no label" in message and "liver_seg.nii.gz" in message
    assert "label.<ext>" in message and "p1" not in message.replace(str(root), "")
    # A label without its CT, and half of the 3D-IRCADb layout.
    (root / "p3" / "liver_seg.nii.gz").rename(root / "p3" / "label.nii.gz")
    (root / "p3" / "ct.nii.gz").unlink()
    with pytest.raises(TrainingDataError, match=r"p3' has the label 'label.nii.gz' but no CT"):
        discover_studies(root)
    shutil.rmtree(root / "p3")
    (root / "p4" / "PATIENT_DICOM").mkdir(parents=True)
    with pytest.raises(TrainingDataError, match=r"p4' has PATIENT_DICOM/ but no MASKS_DICOM/"):
        discover_studies(root)
    shutil.rmtree(root / "p4")
    (root / "notes").mkdir()  # a folder without study files is no study and no error
    assert [s.case_id for s in discover_studies(root)] == ["p1", "p2"]
    # One study folder given as --data, without its label: said so, not "no training studies found".
    single = _study(tmp_path / "single", data_dir, label=None)
    with pytest.raises(TrainingDataError, match="has the CT 'ct.nii.gz' but no label"):
        discover_studies(single)


def test_a_label_volume_given_as_the_ct_is_refused(tmp_path, data_dir):
    """ct.nii.gz that is in fact the label map: the old code trained (and validated) the model on the masks."""
    folder = _study(tmp_path / "case1", data_dir, ct=None)
    (folder / "ct.nii.gz").symlink_to(data_dir / "lits117" / "label.nii.gz")
    [study] = discover_studies(folder)
    with pytest.raises(TrainingDataError) as error:
        load_study(study, LabelConfig())
    message = str(error.value)
    assert "'case1'" in message and "looks like a label mask" in message and "swapped" in message
    assert str(folder / "ct.nii.gz") in message


def test_a_label_with_too_little_liver_on_every_slice_is_a_data_error(tmp_path, data_dir, litemedsam, capsys):
    """The old code failed with an internal error (ValueError and a crash log) after loading the model."""
    from liversam.cli import main
    from liversam.training.cache import build_study_cache

    folder = tmp_path / "case1"
    folder.mkdir()
    (folder / "ct.nii.gz").symlink_to(data_dir / "lits117" / "ct.nii.gz")
    label = sitk.ReadImage(str(data_dir / "lits117" / "label.nii.gz"))
    array = np.zeros(sitk.GetArrayFromImage(label).shape, dtype=np.uint8)
    array[60, 60:62, 60:62] = 1  # 4 liver voxels
    small = sitk.GetImageFromArray(array)
    small.CopyInformation(label)
    sitk.WriteImage(small, str(folder / "label.nii.gz"))
    [study] = discover_studies(folder)
    config = TrainingConfig(data=str(folder), out=str(tmp_path / "run"), train_encoder="last")
    with pytest.raises(TrainingDataError) as error:
        build_study_cache(study, config, litemedsam, "id", progress=False)
    message = str(error.value)
    assert "'case1'" in message and "at least 16 liver voxels" in message and "4, slice 60" in message
    assert "--min-liver-voxels" in message
    code = main(
        [
            "train",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "run"),
            "--train-encoder",
            "last",
            "--device",
            "cpu",
            "--no-progress",
            "--no-register",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2 and "at least 16 liver voxels" in capsys.readouterr().err


def _two_cases(root: Path, data_dir: Path) -> Path:
    """Two different scans as two study folders (hcc0697's and hcc2144's CT and label, read in place)."""
    for case in ("hcc0697", "hcc2144"):
        (root / case).mkdir(parents=True)
        for name in ("ct.nii.gz", "label.nii.gz"):
            (root / case / name).symlink_to(data_dir / case / name)
    return root


@pytest.mark.model
def test_inputs_a_run_cannot_use_are_refused_before_any_slice_is_encoded(tmp_path, shared, data_dir, monkeypatch, capsys):
    """Each of these was found only after the caches were built (minutes to hours on a CPU), or, for the model's
    name, after the whole training: a split without validation cases, a built-in model's name (given, or the run
    folder's), the same CT listed twice (it went to training under one id and to validation under the other)."""
    cache = tmp_path / "cache"
    local = {**shared, "cache": cache}
    data = _two_cases(tmp_path / "data", data_dir)

    def train(data: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
        code, _out, err = _train_here(data, run_dir, local, monkeypatch, capsys, *extra)
        return code, err

    code, err = train(data, tmp_path / "run1", "--no-register", "--split", "1,0,0")
    assert code == 2 and "no validation cases" in err, err[-1500:]

    code, err = train(data, tmp_path / "run2", "--name", "litemedsam")
    assert code == 2 and "--name 'litemedsam' is a built-in model name" in err, err[-1500:]
    code, err = train(data, tmp_path / "litemedsam")
    assert code == 2 and "give --name NAME" in err, err[-1500:]

    manifest = tmp_path / "twice.json"
    manifest.write_text(json.dumps([
        {"id": "a", "ct": str(data_dir / "hcc0697" / "ct.nii.gz"), "label": str(data_dir / "hcc0697" / "label.nii.gz")},
        {"id": "b", "ct": str(data / "hcc0697" / "ct.nii.gz"), "label": str(data_dir / "hcc0697" / "label.nii.gz")},
        {"id": "c", "ct": str(data_dir / "hcc2144" / "ct.nii.gz"), "label": str(data_dir / "hcc2144" / "label.nii.gz")},
    ]))  # fmt: skip
    code, err = train(manifest, tmp_path / "run3", "--no-register")
    assert code == 2, err[-1500:]
    assert "Studies 'a'" in err and "'b'" in err and "have the same CT" in err
    assert "'c'" not in err.split("have the same CT")[0]
    assert not cache.exists() or not list(cache.iterdir())  # nothing encoded for any of them
    assert not any((tmp_path / run / "state.pt").exists() for run in ("run1", "run2", "litemedsam", "run3"))


@pytest.mark.model
def test_propagation_prompts_with_slices_too_far_apart_say_they_fall_back_to_boxes(first_run):
    """--max-slices keeps evenly spaced slices: 12 of lits117's liver lie 8 slices apart, so no slice has the
    neighbour --propagation-prompts needs and every prompt was an ordinary box without a word (first_run trains with
    --propagation-prompts 0.7)."""
    stderr = first_run["stderr"]
    assert "--propagation-prompts 0.7: only 0 of 9 training slices have a cached neighbour" in stderr, stderr
    assert "--max-slices 12 keeps slices too far apart" in stderr


def _slab(data_dir: Path, case: str, k0: int, k1: int, folder: Path) -> Path:
    """A study folder holding axial slices k0 <= k < k1 of ``case``'s CT and label (as ``liversam evaluate --slices
    k0:k1`` crops them)."""
    folder.mkdir(parents=True)
    for name in ("ct.nii.gz", "label.nii.gz"):
        sitk.WriteImage(sitk.ReadImage(str(data_dir / case / name))[:, :, k0:k1], str(folder / name), useCompression=True)
    return folder


@pytest.mark.model
def test_the_test_report_scores_both_models_as_liversam_evaluate_does(tmp_path, shared, data_dir):
    """The report after training compares the base and the trained model on the test patients. It ran without the
    dense CRF that `liversam evaluate` and `segment` apply by default (hcc0697 liver / tumour 0.943 / 0.683 against
    evaluate's 0.960 / 0.733) and ran the naive reference loop for both models without reporting it. It now runs
    evaluate's defaults, LiverSAM's propagation alone, and names the encoder each model ran on.

    The test case is hcc0697's slices 29:38 (its liver's lower end and its tumour; the whole scan took two thirds of
    this test's 137 s), validation 4 slices of hcc2144 (tumour included)."""
    import liversam.dense_crf

    data = tmp_path / "data"
    data.mkdir()
    (data / "lits117").symlink_to(data_dir / "lits117")
    _slab(data_dir, "hcc2144", 38, 42, data / "hcc2144")
    _slab(data_dir, "hcc0697", 29, 38, data / "hcc0697")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["lits117"], "val": ["hcc2144"], "test": ["hcc0697"]}))
    run = tmp_path / "run"
    done = _train(data, run, shared, "--no-register", "--split-file", str(split))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((run / "test_report.json").read_text())
    assert report["test_cases"] == ["hcc0697"]
    crf = ("liver", "tumor") if liversam.dense_crf.crf_available() else ()
    for label in ("base", "trained"):
        result = report["results"][label]
        assert tuple(result["settings"]["crf"]) == crf and result["settings"]["propagation_methods"] == ["liversam"]
        assert set(result["aggregate"]["one-box"]) >= {"liver", "tumor"}
        assert not any("naive" in key for key in json.dumps(result["aggregate"]).split('"'))
        assert result["acceleration"].startswith("encoder ")
    liver = next(r for r in report["comparison"] if (r["structure"], r["metric"]) == ("liver", "dice"))
    tumour = next(r for r in report["comparison"] if (r["structure"], r["metric"]) == ("tumor", "dice"))
    # The bundled model on these slices, as `liversam evaluate --protocol one-box --slices 29:38` scores them: liver
    # 0.957, tumour 0.736; without the CRF the tumour is 0.677 (liver 0.955), as on the whole scan (0.733 / 0.677).
    assert liver["base"] > 0.95, liver
    if crf:
        assert tumour["base"] > 0.70, tumour
    assert liver["trained"] > 0.80, liver  # one epoch on 12 slices of one case moves it little
    markdown = (run / "test_report.md").read_text()
    assert "- base model: encoder " in markdown and "- trained model: encoder " in markdown
    # per test case (the summary gave the mean only): one case here, so its figures are the means
    (case,) = report["per_case"]
    assert case["case"] == "hcc0697" and case["has_tumor"] and case["liver_base"] == liver["base"]
    assert f"| hcc0697 | {liver['base']:.3f} | {liver['trained']:.3f} |" in markdown, markdown
    # the finished run run again: it evaluated both models again (minutes on real data); the report is kept
    written = (run / "test_report.json").stat().st_mtime_ns
    again = _train(data, run, shared, "--no-register", "--split-file", str(split))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already scores this best.pt on these test cases; kept" in again.stderr, again.stderr[-2000:]
    assert (run / "test_report.json").stat().st_mtime_ns == written


def test_label_values_the_labels_do_not_name_are_shown_and_file_names_match_in_any_case(tmp_path, data_dir, caplog):
    """A 0/255 liver mask was refused without the values it holds ("no liver voxels with the configured labels");
    a value 3 was read as background without a word; `CT.nii.gz` beside `Label.nii.gz` was "a label but no CT"."""
    label = sitk.ReadImage(str(data_dir / "lits117" / "label.nii.gz"))
    array = sitk.GetArrayFromImage(label)

    def study_with(values: np.ndarray, name: str, ct: str = "ct.nii.gz", label_name: str = "label.nii.gz") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / ct).symlink_to(data_dir / "lits117" / "ct.nii.gz")
        image = sitk.GetImageFromArray(values.astype(np.uint8))
        image.CopyInformation(label)
        sitk.WriteImage(image, str(folder / label_name))
        return folder

    binary = study_with(np.where(array > 0, 255, 0), "v255")
    [study] = discover_studies(binary)
    with pytest.raises(TrainingDataError, match=r"liver labels \(1, 2\); the label holds the values 0, 255\)"):
        load_study(study, LabelConfig())

    extra = array.copy()
    extra[array.shape[0] // 2, :4, :4] = 3
    [study] = discover_studies(study_with(extra, "v0123"))
    with caplog.at_level("WARNING", logger="liversam.training.studies"):
        loaded = load_study(study, LabelConfig())
    assert loaded.liver_kji.any()
    assert any("label value(s) 3 of" in r.getMessage() and "read as background" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip

    capitals = study_with(array, "capitals", ct="CT.nii.gz", label_name="Label.nii.gz")
    [study] = discover_studies(capitals)
    assert (study.ct_path.name, study.label_path.name, study.kind) == ("CT.nii.gz", "Label.nii.gz", "labelmap")


def test_a_run_folder_in_the_training_data_is_refused(tmp_path, data_dir, capsys):
    """`--out` the data folder itself, or a study folder, was accepted and the run's files (caches, checkpoints,
    test_labels/) were mixed into the data."""
    from liversam.cli import main

    data = _two_cases(tmp_path / "data", data_dir)
    for out in (data, data / "hcc0697" / "run"):
        code = main(["train", "--data", str(data), "--out", str(out), "--no-register", "--no-progress"])
        message = capsys.readouterr().err
        assert code == 2 and "of the training data: the run's files would be mixed into it" in message, message
    assert sorted(p.name for p in data.iterdir()) == ["hcc0697", "hcc2144"]
    assert sorted(p.name for p in (data / "hcc0697").iterdir()) == ["ct.nii.gz", "label.nii.gz"]

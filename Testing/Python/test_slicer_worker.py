"""LiverSAMLib.InferenceWorker (one persistent thread, main-thread callbacks), ModelSession caching and
DependencyInstaller's requirement checks. Standard library + the core only: no model is run here."""

from __future__ import annotations

import threading
import time

import pytest

from slicer_harness import MODULE_DIR, ensure_module_on_path

ensure_module_on_path()

from LiverSAMLib.DependencyInstaller import (  # noqa: E402
    is_satisfied,
    missing_requirements,
    read_requirements,
    requirement_name,
)
from LiverSAMLib.InferenceWorker import InferenceWorker, Job  # noqa: E402
from LiverSAMLib.ModelSession import ModelSession, SessionSettings, core_postprocess_settings  # noqa: E402


@pytest.fixture
def worker():
    w = InferenceWorker()
    yield w
    w.shutdown()


def test_jobs_run_on_one_persistent_thread_and_callbacks_on_the_polling_thread(worker):
    job_threads, callback_threads, results = [], [], []

    def job(context, value):
        job_threads.append(threading.get_ident())
        return value * 2

    def done(result):
        callback_threads.append(threading.get_ident())
        results.append(result)

    for value in range(5):
        worker.run(job, value, on_done=done)
    assert worker.wait_idle(10)
    assert results == [0, 2, 4, 6, 8]
    assert len(set(job_threads)) == 1 and job_threads[0] != threading.get_ident()
    assert job_threads[0] == worker.thread_ident
    assert set(callback_threads) == {threading.get_ident()}  # main (polling) thread only


def test_callbacks_wait_for_poll(worker):
    results = []
    worker.run(lambda context: "x", on_done=results.append)
    deadline = time.monotonic() + 5
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert results == []  # nothing happens on the main thread until it polls
    assert worker.poll() == 1 and results == ["x"]


def test_live_jobs_coalesce_to_the_latest_prompt_state(worker):
    gate = threading.Event()
    ran = []
    worker.run(lambda context: gate.wait(5), name="blocker")
    for n in range(5):
        worker.submit(Job(function=lambda context, n=n: ran.append(n), coalesce_key="live"))
    gate.set()
    assert worker.wait_idle(10)
    assert ran == [4]


def test_cancel_stops_a_running_job_and_reports_it(worker):
    started, events = threading.Event(), []

    def long_job(context):
        started.set()
        for step in range(1000):
            context.progress(step, 1000)
            context.check_cancelled()
            time.sleep(0.005)
        return "finished"

    worker.run(long_job, on_done=events.append, on_cancelled=lambda: events.append("cancelled"),
               on_progress=lambda d, t, m: events.append(("progress", d)))  # fmt: skip
    assert started.wait(5)
    time.sleep(0.05)
    worker.cancel_all()
    assert worker.wait_idle(10)
    assert events[-1] == "cancelled" and "finished" not in events
    assert any(isinstance(e, tuple) for e in events)


def test_errors_reach_the_main_thread(worker):
    errors = []
    worker.run(lambda context: 1 / 0, on_error=errors.append)
    assert worker.wait_idle(10)
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
    # The thread survives a failing job.
    results = []
    worker.run(lambda context: "ok", on_done=results.append)
    assert worker.wait_idle(10) and results == ["ok"]


def test_model_session_loads_once_and_rebuilds_the_predictor_only_when_needed():
    import numpy as np

    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume

    class TinyModel:
        input_size = 256
        source = "tiny"
        name = "tiny"

    loads = []
    session = ModelSession(loader=lambda name, device: loads.append((name, device)) or TinyModel())
    geometry = ImageGeometry((8, 8, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    volume = CTVolume(np.zeros(geometry.shape_kji, np.int16), geometry)
    settings = SessionSettings(model="tiny", device="cpu")
    first = session.predictor(volume, ("vol", 1), settings)
    assert session.predictor(volume, ("vol", 1), settings) is first
    assert session.predictor(volume, ("vol", 2), settings) is not first  # voxels changed
    wider = SessionSettings(model="tiny", device="cpu", window_width_hu=1500)
    assert session.predictor(volume, ("vol", 2), wider).window.width == 1500
    assert loads == [("tiny", "cpu")]
    session.predictor(volume, ("vol", 2), SessionSettings(model="other", device="cpu"))
    assert loads[-1] == ("other", "cpu")


def test_postprocess_settings_map_onto_the_core_pipeline_settings():
    settings = core_postprocess_settings(
        fill_holes=False, min_island_mm3=250.0, keep_largest=True, closing_mm=1.5
    )
    assert (
        settings.slice_postprocess.fill_holes is False and settings.slice_postprocess.closing_radius_mm == 1.5
    )
    assert (
        settings.postprocess_3d["liver"].keep_largest
        and settings.postprocess_3d["liver"].min_island_mm3 == 250.0
    )
    assert not settings.default_3d.keep_largest and settings.default_3d.min_island_mm3 == 250.0


def test_requirements_file_parses_and_is_satisfied_in_the_test_environment(tmp_path):
    requirements = read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert "segment-anything>=1.0" in requirements and all(not r.startswith("#") for r in requirements)
    assert missing_requirements(requirements) == []
    assert requirement_name("scikit_image>=0.22") == "scikit-image"
    assert not is_satisfied("numpy<1.0")  # installed, but outside the specifier
    assert not is_satisfied("liversam-no-such-distribution>=1")
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\n-r other.txt\nnumpy>=1 # inline\n", encoding="utf-8")
    assert read_requirements(path) == ["numpy>=1"]


def test_model_choices_list_built_in_and_registered_models(tmp_path, monkeypatch):
    """The selector offers ``available_models()``: built-ins, LiverSAMTrain-registered models, extra paths."""
    from liversam.models import register_user_model
    from LiverSAMLib.ModelSession import model_choices

    monkeypatch.setenv("LIVERSAM_HOME", str(tmp_path / "home"))
    checkpoint = tmp_path / "liver_ft.pth"
    checkpoint.write_bytes(b"checkpoint")
    register_user_model("liver-ft", checkpoint, description="fine-tuned on 3 cases")
    choices = {c.name: c for c in model_choices(extra=["liver-ft", str(tmp_path / "missing.pth")])}
    assert list(choices)[0] == "litemedsam" and choices["litemedsam"].available
    assert choices["liver-ft"].available and choices["liver-ft"].tooltip == "fine-tuned on 3 cases"
    assert not choices["sam_vit_b"].available and "checkpoint needed" in choices["sam_vit_b"].label
    assert choices[str(tmp_path / "missing.pth")].label == "missing.pth"  # an extra path, listed once
    assert list(choices).count("liver-ft") == 1
    # An unreadable registry must not stop the module from opening: the bundled default is offered.
    (tmp_path / "home" / "models" / "registry.json").write_text("{not json", encoding="utf-8")
    assert [c.name for c in model_choices()] == ["litemedsam"]


def test_plan_repropagation_fixes_only_when_the_seeds_are_kept():
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from LiverSAMLib.ModelSession import PropagationRecord, plan_repropagation

    seeds = {3: SlicePrompts(boxes_ij=[(10, 10, 40, 40)]), 9: SlicePrompts(boxes_ij=[(12, 12, 38, 38)])}
    settings = core_postprocess_settings()
    record = PropagationRecord(
        dict(seeds), SegmentPrompts("liver", 1, slices=dict(seeds)), ("vol", 1), settings
    )
    fixed = {**seeds, 6: SlicePrompts(points_neg_ij=[(30, 30)])}
    assert plan_repropagation(record, fixed, ("vol", 1), settings) == [6]
    moved = {**fixed, 9: SlicePrompts(boxes_ij=[(12, 12, 30, 38)])}
    assert plan_repropagation(record, moved, ("vol", 1), settings) == [6, 9]
    assert plan_repropagation(record, dict(seeds), ("vol", 1), settings) == []  # nothing changed
    assert (
        plan_repropagation(record, {9: seeds[9], 6: fixed[6]}, ("vol", 1), settings) is None
    )  # seed removed
    assert plan_repropagation(record, fixed, ("vol", 2), settings) is None  # other voxels
    assert plan_repropagation(record, fixed, ("vol", 1), core_postprocess_settings(closing_mm=2)) is None
    assert plan_repropagation(None, fixed, ("vol", 1), settings) is None

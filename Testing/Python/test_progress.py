"""Progress display of long commands (liversam.progress): lines in a log, bars on a terminal, silence with --quiet."""

from __future__ import annotations

import io

import numpy as np
import pytest

from liversam import progress
from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from scripted_predictor import ScriptedPredictor, synthetic_volume


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _not_quiet():
    progress.configure(quiet=False)
    yield
    progress.configure(quiet=False)


def test_log_gets_a_line_when_each_stage_starts_and_ends() -> None:
    log = io.StringIO()  # not a terminal, like a log file or CI
    with progress.ProgressReporter(file=log) as report:
        for done in range(1, 11):
            report("propagating 'liver'", done, 10)
        report("propagating 'tumor'", 1, 128)  # a track that ends early: done stays below total
    lines = log.getvalue().splitlines()
    assert lines[0] == "[liversam] propagating 'liver': started, 10 slices"
    assert lines[1].startswith("[liversam] propagating 'liver': done, 10/10 slices in ")
    assert lines[2] == "[liversam] propagating 'tumor': started, 128 slices"
    assert lines[3].startswith("[liversam] propagating 'tumor': done, 1/128 slices in ")
    assert len(lines) == 4 and "\r" not in log.getvalue()


def test_stage_without_a_count_says_only_when_it_started_and_how_long_it_took() -> None:
    """segment_volume's per-segment and dense-CRF stages pass total 0: no "0/2 slices" that counts segments."""
    log = io.StringIO()
    with progress.ProgressReporter(file=log) as report:
        report("segment 'liver' (1 of 2)", 0, 0)
        report("propagating 'liver'", 5, 5)
        report("dense CRF 'tumor'", 0, 0)
    lines = log.getvalue().splitlines()
    assert lines[0] == "[liversam] segment 'liver' (1 of 2): started"
    assert lines[1].startswith("[liversam] segment 'liver' (1 of 2): done in ")
    assert lines[3].startswith("[liversam] propagating 'liver': done, 5/5 slices in ")
    assert lines[4] == "[liversam] dense CRF 'tumor': started"
    assert lines[5].startswith("[liversam] dense CRF 'tumor': done in ") and len(lines) == 6
    assert "slices" not in lines[1] + lines[5]
    terminal = _Terminal()
    with progress.ProgressReporter(file=terminal) as report:
        report("dense CRF 'tumor'", 0, 0)
    assert "dense CRF 'tumor': 00:0" in terminal.getvalue() and "slices" not in terminal.getvalue()


def test_stage_without_a_count_shows_its_postfix_after_done() -> None:
    log = io.StringIO()
    bar = progress.LineProgress(desc="export", file=log)
    bar.set_postfix(backend="openvino")
    bar.close()
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("[liversam] export: done (backend=openvino) in "), last


def test_segment_volume_counts_segments_in_the_stage_name() -> None:
    """What `liversam segment` prints for a two-segment prompts file (a scripted model, no weights)."""
    volume = synthetic_volume(np.full((3, 40, 40), 60, dtype=np.int16), (1.0, 1.0, 1.0))
    disk = np.zeros((40, 40), dtype=bool)
    disk[10:30, 10:30] = True
    predictor = ScriptedPredictor(volume, {k: (disk, 0.9) for k in range(3)})
    box = SlicePrompts(boxes_ij=[(8.0, 8.0, 32.0, 32.0)])
    prompts = [SegmentPrompts("liver", 1, slices={1: box}), SegmentPrompts("spleen", 2, slices={2: box})]
    log = io.StringIO()
    with progress.ProgressReporter(file=log) as report:
        segment_volume(volume, prompts, predictor, PipelineSettings(crf={}), progress=report)
    lines = log.getvalue().splitlines()
    assert lines[0] == "[liversam] segment 'liver' (1 of 2): started"
    assert "[liversam] segment 'spleen' (2 of 2): started" in lines
    assert not [line for line in lines if "/2 slices" in line]


def test_long_stage_reports_in_between_with_time_left() -> None:
    log = io.StringIO()
    bar = progress.LineProgress(desc="cache case1", total=4, unit="slice", file=log, interval_s=0.0)
    bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[1].startswith("[liversam] cache case1: 1/4 slices, about ") and lines[1].endswith(" left")
    assert "2/4 slices" in lines[2] and "(loss=0.1)" in lines[2]
    assert lines[-1].startswith("[liversam] cache case1: done, 2/4 slices")


def test_terminal_gets_a_tqdm_bar_and_quiet_gets_nothing() -> None:
    terminal = _Terminal()
    assert list(progress.progress_bar(range(3), desc="evaluate", unit="case", file=terminal)) == [0, 1, 2]
    assert "evaluate" in terminal.getvalue() and "3/3" in terminal.getvalue()
    progress.configure(quiet=True)
    for stream in (_Terminal(), io.StringIO()):
        with progress.ProgressReporter(file=stream) as report:
            report("segment 'liver'", 1, 2)
        assert list(progress.progress_bar(range(2), desc="x", file=stream)) == [0, 1]
        assert stream.getvalue() == ""


def test_a_terminal_stage_without_a_count_keeps_its_clock_running(monkeypatch) -> None:
    import threading
    import time

    monkeypatch.setattr(progress, "TICK_INTERVAL_S", 0.2)
    terminal = _Terminal()
    with progress.ProgressReporter(file=terminal) as report:
        report("dense CRF 'tumor'", 0, 0)  # no count and no update until the stage ends
        time.sleep(1.3)
        shown = terminal.getvalue()
    # before: drawn once at 00:00 and never again while the stage ran
    assert "dense CRF 'tumor': 00:01" in shown, shown
    assert not [t for t in threading.enumerate() if t.name == "liversam-progress-tick"], "the ticker outlived its stage"


def test_quiet_option_on_every_command() -> None:
    from liversam.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--quiet", "export", "a.seg.nrrd", "-o", "b.nii.gz"]).quiet
    args = parser.parse_args(["export", "a.seg.nrrd", "-o", "b.nii.gz", "--quiet"])
    assert args.quiet
    assert not parser.parse_args(["export", "a.seg.nrrd", "-o", "b.nii.gz"]).quiet
    for command in ("segment", "evaluate", "train", "benchmark"):
        assert "--quiet" in parser._subparsers._group_actions[0].choices[command].format_help()


def test_log_lines_count_tqdm_style_singular_units_in_the_plural() -> None:
    """`liversam evaluate` passes tqdm's unit "case": the log reads "4 cases", "2/4 cases", not "of 4 case"."""
    log = io.StringIO()
    bar = progress.LineProgress(desc="evaluate", total=4, unit="case", file=log, interval_s=0.0)
    bar.update(2)
    one = progress.LineProgress(desc="export", total=1, unit="case", file=log)
    one.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "[liversam] evaluate: started, 4 cases"
    assert lines[1].startswith("[liversam] evaluate: 2/4 cases, about "), lines[1]
    assert lines[2] == "[liversam] export: started, 1 case"
    assert lines[3].startswith("[liversam] export: done, 0/1 case in "), lines[3]
    epoch = progress.LineProgress(desc="epoch 1/4", total=38, unit="batch", file=log)
    assert log.getvalue().splitlines()[-1] == "[liversam] epoch 1/4: started, 38 batches"  # it read "38 batchs"
    epoch.close()


def test_a_stage_that_is_interrupted_or_fails_does_not_say_done() -> None:
    """Ctrl-C during a propagation printed "propagating 'liver': done, 53/128 slices", then "interrupted"."""
    for error, ended in ((KeyboardInterrupt, "interrupted"), (RuntimeError, "stopped")):
        log = io.StringIO()
        with pytest.raises(error), progress.ProgressReporter(file=log) as report:
            report("propagating 'liver'", 53, 128)
            raise error()
        last = log.getvalue().splitlines()[-1]
        assert last.startswith(f"[liversam] propagating 'liver': {ended}, 53/128 slices after "), last
    log = io.StringIO()  # an iterated bar (evaluate's cases) that stops on an error
    with pytest.raises(ValueError):
        for _case in progress.progress_bar(["a"], desc="evaluate", unit="case", file=log):
            raise ValueError("bad slice range")
    assert log.getvalue().splitlines()[-1].startswith("[liversam] evaluate: stopped, 0/1 case after ")
    log = io.StringIO()  # the same without a known length: it said "done"
    with pytest.raises(KeyboardInterrupt):
        for _case in progress.progress_bar(iter("ab"), desc="evaluate", unit="case", file=log):
            raise KeyboardInterrupt
    assert log.getvalue().splitlines()[-1].startswith("[liversam] evaluate: stopped after ")


def test_a_terminal_of_width_0_gets_lines_not_an_empty_bar(monkeypatch) -> None:
    """A pty of size 0 x 0 (``script`` from a non-interactive shell, some ``docker exec -t``) drew two empty lines."""

    class Pty(_Terminal):
        def fileno(self) -> int:
            return 2

    sizes = {"columns": 0}
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: __import__("os").terminal_size((sizes["columns"], 0)))
    stream = Pty()
    with progress.ProgressReporter(file=stream) as report:
        report("propagating 'liver'", 10, 10)
    assert stream.getvalue().startswith("[liversam] propagating 'liver': started, 10 slices\n")
    assert not progress._is_terminal(stream)
    sizes["columns"] = 120
    assert progress._is_terminal(Pty())  # a terminal with a width: a tqdm bar

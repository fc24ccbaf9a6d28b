"""Progress display of long commands (liversam.progress): lines in a log, bars on a terminal, silence with --quiet."""

from __future__ import annotations

import io

import pytest

from liversam import progress


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
    assert lines[0] == "[liversam] propagating 'liver': started of 10 slices"
    assert lines[1].startswith("[liversam] propagating 'liver': done, 10/10 slices in ")
    assert lines[2] == "[liversam] propagating 'tumor': started of 128 slices"
    assert lines[3].startswith("[liversam] propagating 'tumor': done, 1/128 slices in ")
    assert len(lines) == 4 and "\r" not in log.getvalue()


def test_long_stage_reports_in_between_with_time_left() -> None:
    log = io.StringIO()
    bar = progress.LineProgress(desc="cache case1", total=4, unit="slice", file=log, interval_s=0.0)
    bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[1].startswith("[liversam] cache case1: 1/4 slice, about ") and lines[1].endswith(" left")
    assert "2/4 slice" in lines[2] and "(loss=0.1)" in lines[2]
    assert lines[-1].startswith("[liversam] cache case1: done, 2/4 slice")


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


def test_quiet_option_on_every_command() -> None:
    from liversam.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--quiet", "export", "a.seg.nrrd", "-o", "b.nii.gz"]).quiet
    args = parser.parse_args(["export", "a.seg.nrrd", "-o", "b.nii.gz", "--quiet"])
    assert args.quiet
    assert not parser.parse_args(["export", "a.seg.nrrd", "-o", "b.nii.gz"]).quiet
    for command in ("segment", "evaluate", "train", "benchmark"):
        assert "--quiet" in parser._subparsers._group_actions[0].choices[command].format_help()

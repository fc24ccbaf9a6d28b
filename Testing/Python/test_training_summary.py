"""`liversam train` on Ctrl-C while a study's cache is built: the cache's progress bar is closed before the
"interrupted" message, never drawn again below it (on a terminal) and its stage says how it ended (in a log)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


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

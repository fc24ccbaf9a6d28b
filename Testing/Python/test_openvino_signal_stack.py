"""Ctrl-C still interrupts a process after it let go of an OpenVINO encoder.

OpenVINO's CPU plugin gives the thread that loads it a signal stack of its own (``sigaltstack``) and unmaps it when
the plugin goes with its last ``openvino.Core``; Python's SIGINT handler runs on that stack (``SA_ONSTACK``), so the
next Ctrl-C ended the process with a segmentation fault. ``liversam train`` lets go of its fast encoder once the
embedding caches are built, so every Ctrl-C during training crashed (exit -11) instead of saying "interrupted" (exit
130) (session 37's training review). LiverSAM now keeps one Core for the process
(``liversam.acceleration.backends.openvino_core``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")

SCRIPT = textwrap.dedent(
    """
    import gc, os, signal, time
    from liversam.models import load_model
    from liversam.training.trainer import fast_frozen_encoder

    model = load_model("litemedsam", device="cpu")
    with fast_frozen_encoder(model, frozen=True) as precision:  # as the training's cache stage does
        print("cache encoder", precision, flush=True)
    gc.collect()  # the encoder, its compiled graphs and requests are gone
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("no KeyboardInterrupt", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    """
)


def test_ctrl_c_after_the_training_caches_encoder_is_released_interrupts_instead_of_crashing():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode != -signal.SIGSEGV, f"segmentation fault on SIGINT:\n{done.stdout}\n{done.stderr[-2000:]}"
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache encoder" in done.stdout and done.stdout.strip().endswith("KeyboardInterrupt"), done.stdout

"""The error for a missing official checkpoint names only things that work: where to download the file, where
to put it, and the option that gives its path (there is no `liversam download-model` command)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from liversam.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lits117"


def liversam_commands() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return set(subparsers.choices)


def test_missing_checkpoint_message_names_only_real_commands_and_options(tmp_path):
    env = dict(os.environ, LIVERSAM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO / "LiverSAM"))
    output = tmp_path / "out.seg.nrrd"
    result = subprocess.run(
        [sys.executable, "-m", "liversam", "segment", str(EXAMPLE / "ct.nii.gz"), "--prompts",
         str(EXAMPLE / "prompts.json"), "--output", str(output), "--model", "sam_vit_b"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    message = result.stderr
    expected_place = tmp_path / "home" / "models" / "sam_vit_b_01ec64.pth"
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert f"put it at '{expected_place}'" in message
    assert "--model sam_vit_b=/path/to/sam_vit_b_01ec64.pth" in message
    named = set(re.findall(r"liversam ([a-z][\w-]*)", message))
    assert named <= liversam_commands(), f"the message names commands that do not exist: {named}"
    assert not output.exists()

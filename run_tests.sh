#!/usr/bin/env bash
# Run LiverSAM's checks: ruff, then pytest (core on real CT, Slicer logic on slicer-core's MRML).
#   bash run_tests.sh [extra pytest args]
# Real CT comes from $LIVERSAM_TEST_DATA (default: ../shared/data next to this checkout).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
export LIVERSAM_TEST_DATA="${LIVERSAM_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export LIVERSAM_HOME="${LIVERSAM_HOME:-$(mktemp -d)}"  # tests never touch the user's model registry
"$VENV/bin/ruff" check LiverSAM LiverSAMTrain Testing benchmarks web
"$VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=15 "$@"
# The web app's browser tests run in its own environment (trame-slicer needs slicer-core 5.11): Testing/web.
WEB_VENV="${LIVERSAM_WEB_VENV:-$HOME/.cache/liversam/web-venv}"
if [ "${LIVERSAM_SKIP_WEB:-0}" != "1" ]; then
  LIVERSAM_SERVER_PYTHON="$VENV/bin/python" "$WEB_VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=5 Testing/web
fi

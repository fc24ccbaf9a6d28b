#!/usr/bin/env bash
# Run LiverSAM's checks: ruff, then pytest (core on real CT, Slicer logic on slicer-core's MRML).
#   bash run_tests.sh [extra pytest args]
# Real CT comes from $LIVERSAM_TEST_DATA (default: ../shared/data next to this checkout).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
export LIVERSAM_TEST_DATA="${LIVERSAM_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export LIVERSAM_HOME="${LIVERSAM_HOME:-$(mktemp -d)}"  # tests never touch the user's model registry
"$VENV/bin/ruff" check LiverSAM LiverSAMTrain Testing benchmarks
"$VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=15 "$@"

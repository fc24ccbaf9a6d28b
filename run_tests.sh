#!/usr/bin/env bash
# Run LiverSAM's checks: ruff, then pytest (core on real CT, Slicer logic on slicer-core's MRML) and, at the same
# time, the web app's browser tests (Testing/web, in their own environment: trame-slicer needs slicer-core 5.11).
#   bash run_tests.sh [extra pytest args for the core tests]
# The two suites overlap because each leaves a core idle much of the time (subprocess start-ups, a browser waiting
# for the server, single-threaded Python); the web tests' output is printed after the core tests'.
# LIVERSAM_SKIP_WEB=1 leaves the web tests out.
# Real CT comes from $LIVERSAM_TEST_DATA (default: ../shared/data next to this checkout).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
WEB_VENV="${LIVERSAM_WEB_VENV:-$HOME/.cache/liversam/web-venv}"
export LIVERSAM_TEST_DATA="${LIVERSAM_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export LIVERSAM_HOME="${LIVERSAM_HOME:-$(mktemp -d)}"  # tests never touch the user's model registry
"$VENV/bin/ruff" check LiverSAM LiverSAMTrain Testing benchmarks web

web_pid=""
if [ "${LIVERSAM_SKIP_WEB:-0}" != "1" ]; then
  web_log="$(mktemp)"
  web_home="$(mktemp -d)"  # a registry of its own: the core tests' training runs never show in the web's lists
  echo "[run_tests] the web tests (Testing/web) run beside the core tests; their output follows"
  # in a session of its own (util-linux setsid; macOS has none), so an interrupted run stops the browser and the
  # server it started too
  group=()
  if command -v setsid > /dev/null; then group=(setsid --wait); fi
  ${group[@]+"${group[@]}"} env LIVERSAM_HOME="$web_home" LIVERSAM_SERVER_PYTHON="$VENV/bin/python" \
    "$WEB_VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=5 Testing/web > "$web_log" 2>&1 &
  web_pid=$!
  trap 'kill -TERM -- "-$web_pid" 2>/dev/null || kill -TERM "$web_pid" 2>/dev/null || true' INT TERM
fi

core_status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=15 "$@" || core_status=$?

web_status=0
if [ -n "$web_pid" ]; then
  wait "$web_pid" || web_status=$?
  trap - INT TERM
  echo "[run_tests] the web tests (Testing/web):"
  cat "$web_log"
  rm -rf "$web_log" "$web_home"
fi
if [ "$core_status" -ne 0 ] || [ "$web_status" -ne 0 ]; then
  echo "[run_tests] failed: core tests exit $core_status, web tests exit $web_status" >&2
  exit 1
fi

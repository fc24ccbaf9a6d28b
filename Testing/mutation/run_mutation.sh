#!/usr/bin/env bash
# Mutation testing of LiverSAM's pure modules with mutmut 3 (not part of run_tests.sh: minutes per module).
#   bash Testing/mutation/run_mutation.sh [module ...]     (default: every module below, one after another)
# Modules: geometry prompts metrics lesions review postprocess segmentation segmentation_io
# Each module is mutated in a scratch copy (src/liversam + Testing/Python) under $LIVERSAM_MUTATION_DIR
# (default /tmp/liversam-mutation/<module>), so the checkout is never touched; only the fast, model-free tests
# that exercise the module run against its mutants, and mutmut runs only the tests that reach each
# mutated function. Prints mutmut's per-mutant results and a summary line per module:
#   <module>: killed K / total T (score S %), survived N, timeouts ..., then the surviving mutants' names.
# Inspect one: cd /tmp/liversam-mutation/<module> && mutmut show <name>.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
export PATH="$VENV/bin:$PATH"
export LIVERSAM_TEST_DATA="${LIVERSAM_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export LIVERSAM_HOME="${LIVERSAM_HOME:-$(mktemp -d)}"
ROOT="${LIVERSAM_MUTATION_DIR:-/tmp/liversam-mutation}"
JOBS="${LIVERSAM_MUTATION_JOBS:-1}"  # mutmut workers; the default leaves a core for others

# module -> the test files that exercise it (model-free)
declare -A TESTS=(
  [geometry]="test_geometry.py test_prompts.py"
  [prompts]="test_prompts.py test_propagation_stop_rules.py"
  [metrics]="test_metrics.py"
  [lesions]="test_review_and_lesions.py"
  [review]="test_review_and_lesions.py"
  [postprocess]="test_postprocess_and_cache.py test_propagation_stop_rules.py test_pipeline_inside.py"
  [segmentation]="test_segmentation_io.py"
  [segmentation_io]="test_segmentation_io.py"
)
ORDER=(geometry prompts metrics lesions review postprocess segmentation segmentation_io)
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")

for module in "${modules[@]}"; do
  if [ -z "${TESTS[$module]+x}" ]; then
    echo "unknown module '$module'; choose from: ${ORDER[*]}" >&2
    exit 2
  fi
  work="$ROOT/$module"
  rm -rf "$work"
  mkdir -p "$work/src" "$work/Testing"
  cp -r "$REPO/LiverSAM/liversam" "$work/src/liversam"
  cp -r "$REPO/Testing/Python" "$work/Testing/Python"
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
  selection=""
  for t in ${TESTS[$module]}; do selection="$selection\"Testing/Python/$t\", "; done
  cat > "$work/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/liversam/$module.py"]
also_copy = ["Testing"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not model"]
pytest_add_cli_args_test_selection = [${selection%, }]

[tool.pytest.ini_options]
filterwarnings = ["ignore::FutureWarning:timm.*"]
markers = ["model: runs the LiteMedSAM model", "slicer: needs slicer-core's MRML"]
TOML
  echo "== $module: tests ${TESTS[$module]}"
  started=$(date +%s)
  (cd "$work" && mutmut run --max-children "$JOBS" > mutmut-run.log 2>&1) || {
    echo "mutmut run failed for $module, see $work/mutmut-run.log" >&2
    tail -20 "$work/mutmut-run.log" >&2
    exit 1
  }
  (cd "$work" && mutmut results --all true > results.txt 2>&1 || true)
  python - "$module" "$work/results.txt" "$(( $(date +%s) - started ))" <<'PY'
import collections, sys
module, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
status = {}
for line in open(path, encoding="utf-8"):
    if ":" in line and "__mutmut_" in line:
        name, _, state = line.strip().rpartition(":")
        status[name.strip()] = state.strip()
counts = collections.Counter(status.values())
total = len(status)
killed = counts.get("killed", 0)
score = 100.0 * killed / total if total else 0.0
others = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
print(f"{module}: killed {killed} / total {total} (score {score:.1f} %), {others or 'no others'}; {seconds} s")
for name, state in sorted(status.items()):
    if state != "killed":
        print(f"  {state}: {name}")
PY
done

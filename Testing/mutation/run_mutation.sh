#!/usr/bin/env bash
# Mutation testing of LiverSAM's pure modules with mutmut 3 (not part of run_tests.sh: minutes per module).
#   bash Testing/mutation/run_mutation.sh [module ...]
# Modules: geometry prompts metrics lesions review postprocess segmentation segmentation_io (default: all).
# The modules named are mutated together in one scratch copy (src/liversam + Testing/Python) under
# $LIVERSAM_MUTATION_DIR (default /tmp/liversam-mutation/<modules>), so the checkout is never touched. Only the
# fast, model-free tests that exercise those modules are selected, and mutmut runs, for each mutant, only the
# selected tests that reach the mutated function. Prints one summary line per module:
#   <module>: killed K / total T (score S %), survived N ...
# followed by the names of the mutants that were not killed. Inspect one with
#   cd /tmp/liversam-mutation/<modules> && mutmut show <name>
# LIVERSAM_MUTATION_JOBS (default 1) sets mutmut's parallel workers.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
VENV="${LIVERSAM_VENV:-$HOME/.cache/liversam/venv}"
export PATH="$VENV/bin:$PATH"
export LIVERSAM_TEST_DATA="${LIVERSAM_TEST_DATA:-$(cd .. && pwd)/shared/data}"
export LIVERSAM_HOME="${LIVERSAM_HOME:-$(mktemp -d)}"
JOBS="${LIVERSAM_MUTATION_JOBS:-1}"

# module -> the model-free test files that exercise it
declare -A TESTS=(
  [geometry]="test_geometry.py test_prompts.py"
  [prompts]="test_prompts.py"
  [metrics]="test_metrics.py"
  [lesions]="test_review_and_lesions.py"
  [review]="test_review_and_lesions.py"
  [postprocess]="test_postprocess_and_cache.py test_pipeline_inside.py"
  [segmentation]="test_segmentation_io.py"
  [segmentation_io]="test_segmentation_io.py"
)
ORDER=(geometry prompts metrics lesions review postprocess segmentation segmentation_io)
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")

only="" tests=""
for module in "${modules[@]}"; do
  if [ -z "${TESTS[$module]+x}" ]; then
    echo "unknown module '$module'; choose from: ${ORDER[*]}" >&2
    exit 2
  fi
  only="$only\"src/liversam/$module.py\", "
  for t in ${TESTS[$module]}; do
    case " $tests " in *" $t "*) ;; *) tests="$tests $t" ;; esac
  done
done
selection=""
for t in $tests; do selection="$selection\"Testing/Python/$t\", "; done

name=$(IFS=-; echo "${modules[*]}")
work="${LIVERSAM_MUTATION_DIR:-/tmp/liversam-mutation}/$name"
rm -rf "$work"
mkdir -p "$work/src" "$work/Testing"
cp -r "$REPO/LiverSAM/liversam" "$work/src/liversam"
cp -r "$REPO/Testing/Python" "$work/Testing/Python"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
cat > "$work/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["src"]
only_mutate = [${only%, }]
also_copy = ["Testing"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not model"]
pytest_add_cli_args_test_selection = [${selection%, }]

[tool.pytest.ini_options]
filterwarnings = ["ignore::FutureWarning:timm.*"]
markers = ["model: runs the LiteMedSAM model", "slicer: needs slicer-core's MRML"]
TOML
echo "== mutating ${modules[*]} (tests:$tests) in $work"
started=$(date +%s)
(cd "$work" && mutmut run --max-children "$JOBS" > mutmut-run.log 2>&1) || {
  echo "mutmut run failed, see $work/mutmut-run.log" >&2
  tail -20 "$work/mutmut-run.log" >&2
  exit 1
}
(cd "$work" && mutmut results --all true > results.txt 2>&1 || true)
python - "$work/results.txt" "$(( $(date +%s) - started ))" "${modules[@]}" <<'PY'
import collections
import sys

path, seconds, modules = sys.argv[1], sys.argv[2], sys.argv[3:]
status = {}
for line in open(path, encoding="utf-8"):
    name, _, state = line.strip().rpartition(":")
    if "__mutmut_" in name:
        status[name.strip()] = state.strip()
print(f"mutmut: {len(status)} mutants in {seconds} s")
for module in modules:
    mine = {n: s for n, s in status.items() if n.startswith(f"liversam.{module}.")}
    counts = collections.Counter(mine.values())
    killed = counts.get("killed", 0)
    score = 100.0 * killed / len(mine) if mine else 0.0
    others = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed") or "no others"
    print(f"{module}: killed {killed} / total {len(mine)} (score {score:.1f} %), {others}")
    for name, state in sorted(mine.items()):
        if state != "killed":
            print(f"  {state}: {name}")
PY

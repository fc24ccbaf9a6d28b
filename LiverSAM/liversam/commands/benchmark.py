"""``liversam benchmark``: run ``benchmarks/run_benchmarks.py`` from the LiverSAM source checkout.

The benchmark lives beside the package (``benchmarks/``), not inside it, so this command needs a source
checkout; an installed wheel without it gets a clear error. See that script for what is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

from ..errors import LiverSAMError

# LiverSAM/liversam/commands/benchmark.py -> repository root is three folders up from liversam/.
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "run_benchmarks.py"


def load_benchmark_script(path: Path = SCRIPT) -> ModuleType:
    """Import ``benchmarks/run_benchmarks.py`` as a module (nothing runs on import)."""
    if not path.is_file():
        raise LiverSAMError(
            f"The benchmark script '{path}' is not here: 'liversam benchmark' runs from a LiverSAM source "
            "checkout. Clone the repository and run 'python benchmarks/run_benchmarks.py' there."
        )
    spec = importlib.util.spec_from_file_location("liversam_run_benchmarks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "benchmark",
        help="measure encoder/decoder speed, one-box liver time and peak memory (benchmarks/run_benchmarks.py)",
        description="Speed and memory benchmark on the lits117 example CT; prints a summary and writes JSON.",
    )
    if SCRIPT.is_file():
        load_benchmark_script().add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..output_paths import check_outputs

    check_outputs({"--output": getattr(args, "output", None)}, [])  # before minutes of measuring, not after
    return int(load_benchmark_script().main(args))

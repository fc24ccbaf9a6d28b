"""Scale benchmark (not a unit test): propagate the liver through a 600-slice 512 x 512 CT from one box.

The CT is made by stacking a real case (default ``ircadb17``, 512 x 512 x 119) back and forth along k
(0..118, 118..0, 0..118, ...) to ``--slices`` slices: every slice is a real CT slice and neighbouring
slices stay neighbours, so the liver is one continuous structure per block. It is written to a temporary
uncompressed NRRD (never into the repository) and read back with ``liversam.ct_io.read_ct``, as the
command line does. One liver box on the largest liver slice of the first block, ``propagate: true``.

Prints the phases' wall time, the process's peak resident memory (``ru_maxrss``) and the resident memory
sampled every 50 ms per phase (so the step that sets the peak is visible), and the embedding cache's size
against its bound (``--cache-mb``, default 256 MB so that a long propagation has to evict).

The run uses ``liversam segment``'s settings (dense CRF where pydensecrf2 is installed; the embeddings
freed before writing). ``--cache-mb 2048`` is the command line's own cache bound.

Run:  python benchmarks/large_ct.py [--case ircadb17] [--slices 600] [--cache-mb 256] [--accelerate auto]
Target: peak memory <= 2.5 GB (issue 16), i.e. 2384 MiB of ``ru_maxrss``. ``python benchmarks/run_benchmarks.py``
runs this script too (595 slices, the command line's 2048 MiB cache bound) and prints the verdict with its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO.parent / "shared" / "data"))


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


class Sampler(threading.Thread):
    """Samples resident memory; remembers the highest value per named phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self.cache_peak_mb = 0.0
        self.cache = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            self.sample()

    def sample(self) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), _rss_mb())
        if self.cache is not None:
            self.cache_peak_mb = max(self.cache_peak_mb, self.cache.size_mb)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


TARGET_BYTES = 2.5e9  # issue 16: peak memory <= 2.5 GB on the 595-slice CT (2384 MiB)


def within_target(peak_mib: float) -> bool:
    """Whether a peak of ``peak_mib`` MiB (``ru_maxrss`` / 1024) is within the 2.5 GB target."""
    return peak_mib * 2**20 <= TARGET_BYTES


def stacked_indices(nk: int, slices: int) -> list[int]:
    forward = list(range(nk))
    order: list[int] = []
    while len(order) < slices:
        order += forward if (len(order) // nk) % 2 == 0 else forward[::-1]
    return order[:slices]


def make_ct(case: str, slices: int, path: Path) -> tuple[list, int]:
    """Write the stacked CT to ``path``; return the liver box (IJK) and the liver's slice count in the case."""
    import numpy as np
    import SimpleITK as sitk

    source = sitk.ReadImage(str(DATA / case / "ct.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / case / "label.nii.gz")))
    big = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(source)[stacked_indices(source.GetSize()[2], slices)])
    big.SetSpacing(source.GetSpacing())
    big.SetOrigin(source.GetOrigin())
    big.SetDirection(source.GetDirection())
    sitk.WriteImage(big, str(path), useCompression=False)
    liver = label > 0
    k = int(liver.sum(axis=(1, 2)).argmax())
    js, is_ = np.nonzero(liver[k])
    box = [[int(is_.min()), int(js.min()), k], [int(is_.max()), int(js.max()), k]]
    return box, int(np.count_nonzero(liver.any(axis=(1, 2))))


def measure(ct_path: Path, box: list, cache_mb: float, accelerate: str, threads: int) -> dict:
    """The measured run, alone in its process (so ``ru_maxrss`` is the run's own peak)."""
    import numpy as np

    from liversam.ct_io import read_ct
    from liversam.dense_crf import crf_for_segments
    from liversam.freed_memory import return_freed_memory_to_os
    from liversam.models import load_model
    from liversam.pipeline import PipelineSettings, segment_volume
    from liversam.predictor import SlicePredictor
    from liversam.prompts import parse_prompts
    from liversam.segmentation_io import write_segmentation

    if threads:
        import torch

        torch.set_num_threads(threads)
    sampler = Sampler()
    sampler.start()
    times: dict[str, float] = {}
    base_rss = _rss_mb()
    sampler.phase = "read CT"
    t0 = time.perf_counter()
    volume = read_ct(ct_path)
    times["read CT"] = time.perf_counter() - t0
    prompts = parse_prompts(
        {"coordinate_system": "IJK", "segments": [{"name": "liver", "label": 1, "propagate": True, "boxes": [box]}]},
        volume.geometry,
    )
    sampler.phase = "load model"
    t0 = time.perf_counter()
    model = load_model("litemedsam", device="cpu", accelerate=accelerate)
    times["load model"] = time.perf_counter() - t0
    predictor = SlicePredictor(model, volume, cache_mb=cache_mb)
    sampler.cache = predictor.cache
    sampler.phase = "propagate"
    t0 = time.perf_counter()
    # liversam segment's settings: the dense CRF where pydensecrf2 is installed (--crf auto)
    settings = PipelineSettings(crf=crf_for_segments("auto", prompts))
    result = segment_volume(volume, prompts, predictor, settings)
    times["propagate"] = time.perf_counter() - t0
    cache_entries = len(predictor.cache)
    predictor.cache.clear()  # as liversam segment does before writing
    return_freed_memory_to_os()
    sampler.phase = "write .seg.nrrd"
    t0 = time.perf_counter()
    write_segmentation(result, ct_path.with_name("large.seg.nrrd"), model_name=model.name)
    times["write .seg.nrrd"] = time.perf_counter() - t0
    sampler.stop()
    mask = result.segments[0].mask_kji
    return {
        "ct_size_ijk": list(volume.geometry.size_ijk),
        "ct_mb": round(volume.array_kji.nbytes / 2**20),
        "ct_dtype": str(volume.array_kji.dtype),
        "box": box,
        "liver_slices_segmented": int(np.count_nonzero(mask.any(axis=(1, 2)))),
        "slices_encoded": len(predictor.encoded_slices),
        "encode_seconds": round(predictor.encode_seconds, 1),
        "seconds": {name: round(value, 1) for name, value in times.items()},
        "wall_seconds": round(sum(times.values()), 1),
        "peak_rss_mb": round(_peak_mb()),
        "rss_at_start_mb": round(base_rss),
        "rss_peak_by_phase_mb": {name: round(value) for name, value in sampler.peaks.items()},
        "cache_bound_mb": cache_mb,
        "cache_peak_mb": round(sampler.cache_peak_mb, 1),
        "cache_entries_at_end": cache_entries,
        "crf": sorted(settings.crf),
        "accelerate": accelerate,
        "model": model.name,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="ircadb17")
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--cache-mb", type=float, default=256.0)
    parser.add_argument("--accelerate", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--measure", nargs=2, metavar=("CT", "BOX_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "LiverSAM"))
    if args.measure:
        figures = measure(Path(args.measure[0]), json.loads(args.measure[1]), args.cache_mb, args.accelerate,
                          args.threads)
        print(json.dumps(figures))
        return 0

    with tempfile.TemporaryDirectory(prefix="liversam-large-ct-") as tmp:
        ct_path = Path(tmp) / "large_ct.nrrd"
        t0 = time.perf_counter()
        box, liver_slices = make_ct(args.case, args.slices, ct_path)
        print(f"made {ct_path} from {args.case} ({args.slices} slices) in {time.perf_counter() - t0:.1f} s; "
              f"liver box {box}", flush=True)
        command = [sys.executable, __file__, "--measure", str(ct_path), json.dumps(box),
                   "--cache-mb", str(args.cache_mb), "--accelerate", args.accelerate, "--threads", str(args.threads)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return proc.returncode
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["case"] = args.case
    figures["liver_slices_in_source_case"] = liver_slices
    print(json.dumps(figures, indent=2))
    verdict = "within" if within_target(figures["peak_rss_mb"]) else "ABOVE"
    print(f"peak memory {figures['peak_rss_mb']} MiB ({figures['peak_rss_mb'] * 2**20 / 1e9:.2f} GB): {verdict} the "
          f"2.5 GB target; wall {figures['wall_seconds']} s; embedding cache peak {figures['cache_peak_mb']:.0f} MiB "
          f"of its {args.cache_mb:.0f} MiB bound")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["cache_peak_mb"] <= args.cache_mb else 1


if __name__ == "__main__":
    sys.exit(main())

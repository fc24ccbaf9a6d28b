"""``liversam serve`` round trips against the same work in-process (a benchmark, not a unit test).

Measures, on the lits117 example CT, with a real server process on a free port driven by the Slicer
module's client (``LiverSAMLib.ServerClient``):

1. one slice with a cached embedding: the HTTP round trip of ``predict_slice`` (JSON prompts in, packed-bit
   mask out) against the in-process ``SlicePredictor.predict`` call (target: round trip under 100 ms on CPU);
2. the one-box liver on ``--volume-slices`` slices (default 100, cold embedding cache, the protocol of
   ``run_benchmarks.py``): ``start_propagation`` -> poll -> ``job_result`` with the masks, against
   ``liversam.pipeline.segment_volume`` in this process (target: within 10 %). The masks must be equal.

Both sides use the same model, encoder backend (``--accelerate``) and torch threads; they run one after
the other, never at once.

Run:  python benchmarks/server_roundtrip.py [--accelerate auto] [--threads 2] [--output server.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO.parent / "shared" / "data")) / "lits117"
sys.path.insert(0, str(REPO / "LiverSAM"))


def _box(mask_ji):
    import numpy as np

    js, is_ = np.nonzero(mask_ji)
    return (float(is_.min()), float(js.min()), float(is_.max()), float(js.max()))


def _stats(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": 1000 * ordered[0], "runs": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with ct.nii.gz + label.nii.gz")
    parser.add_argument("--accelerate", default="auto", help="encoder backend for both sides (default auto)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    parser.add_argument("--volume-slices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=30, help="timed cached-slice predictions")
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from liversam.ct_io import read_ct
    from liversam.evaluate import crop_slices, read_label
    from liversam.models import load_model
    from liversam.pipeline import segment_volume
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from LiverSAMLib.ServerClient import LocalServerProcess, box_ijk, segment_spec

    torch.set_num_threads(args.threads)
    volume = read_ct(args.data / "ct.nii.gz")
    label = read_label(args.data / "label.nii.gz", volume.geometry, args.data / "ct.nii.gz")
    liver = np.isin(label, (1, 2))
    present = np.flatnonzero(liver.any(axis=(1, 2)))
    centre = int((present[0] + present[-1]) // 2)
    k0 = max(0, min(centre - args.volume_slices // 2, volume.num_slices - args.volume_slices))
    sub_volume, sub_label, (k0, k1) = crop_slices(volume, label, (k0, k0 + args.volume_slices))
    sub_liver = np.isin(sub_label, (1, 2))
    k_big = int(np.argmax(sub_liver.sum(axis=(1, 2))))
    box = _box(sub_liver[k_big])
    g = sub_volume.geometry
    figures: dict = {"accelerate": args.accelerate, "threads": args.threads, "slices": int(k1 - k0),
                     "slice_range": [int(k0), int(k1)], "prompt_slice": k_big}

    # --- in-process ------------------------------------------------------------------------------------
    model = load_model("litemedsam", device="cpu", accelerate=args.accelerate)
    predictor = SlicePredictor(model, sub_volume)
    prompts = SlicePrompts(boxes_ij=[box])
    predictor.predict(k_big, prompts)  # encode once
    local = []
    for _ in range(args.runs):
        start = time.perf_counter()
        predictor.predict(k_big, prompts)
        local.append(time.perf_counter() - start)
    figures["cached_slice_in_process"] = _stats(local)

    seg = SegmentPrompts(name="liver", label=1, slices={k_big: SlicePrompts(boxes_ij=[box])}, propagate=True)
    start = time.perf_counter()
    in_process = segment_volume(sub_volume, [seg], SlicePredictor(model, sub_volume)).segment("liver").mask_kji
    figures["propagation_in_process_s"] = time.perf_counter() - start
    del model, predictor

    # --- through the server --------------------------------------------------------------------------------
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "LiverSAM"), os.environ.get("PYTHONPATH", "")) if p))
    server = LocalServerProcess(sys.executable, ["--accelerate", args.accelerate, "--device", "cpu",
                                                 "--threads", str(args.threads)], startup_timeout=120, env=env)
    with server as client:
        start = time.perf_counter()
        session = client.open_volume(sub_volume.array_kji, g.spacing_mm, g.origin_lps, g.direction_lps.ravel())["session_id"]
        figures["open_volume_s"] = time.perf_counter() - start
        client.predict_slice(session, k_big, boxes_ij=[box])  # loads the model, encodes the slice
        remote = []
        for _ in range(args.runs):
            start = time.perf_counter()
            client.predict_slice(session, k_big, boxes_ij=[box])
            remote.append(time.perf_counter() - start)
        figures["cached_slice_round_trip"] = _stats(remote)
        info = client.info()["model"]
        figures["server_backend"] = {"encoder": info["encoder_backend"], "decoder": info["decoder_backend"]}
        client.close_session(session)
        idle_rss = client.info()["rss_mb"]

        # a fresh session: cold embedding cache, like the in-process run
        session = client.open_volume(sub_volume.array_kji, g.spacing_mm, g.origin_lps, g.direction_lps.ravel())["session_id"]
        start = time.perf_counter()
        job = client.start_propagation(session, [segment_spec("liver", 1, boxes_ijk=[box_ijk(*box, k_big)])])
        status = client.wait_job(job, timeout=3600, poll=0.1)
        result = client.job_result(job)
        figures["propagation_server_s"] = time.perf_counter() - start
        assert status["state"] == "done", status
        served = result["segments"][0]["mask"]
        figures["server_rss_mb"] = {"idle_with_model": idle_rss, "after_propagation": client.info()["rss_mb"]}
        client.close_session(session)
        figures["server_rss_mb"]["after_close"] = client.info()["rss_mb"]

    figures["segmented_slices"] = int(in_process.any(axis=(1, 2)).sum())
    figures["masks_equal"] = bool(np.array_equal(served, in_process))
    figures["propagation_overhead_pct"] = 100 * (figures["propagation_server_s"] / figures["propagation_in_process_s"] - 1)
    rt, lp = figures["cached_slice_round_trip"], figures["cached_slice_in_process"]
    print(f"backend {figures['server_backend']}, {args.threads} threads, lits117 slices {k0}..{k1 - 1}, box on slice {k_big}")
    print(f"cached slice: round trip median {rt['median_ms']:.1f} ms (p90 {rt['p90_ms']:.1f}) vs in-process "
          f"{lp['median_ms']:.1f} ms (p90 {lp['p90_ms']:.1f})  [target < 100 ms]")
    print(f"{figures['slices']}-slice liver propagation ({figures['segmented_slices']} slices segmented): server "
          f"{figures['propagation_server_s']:.1f} s vs in-process {figures['propagation_in_process_s']:.1f} s "
          f"({figures['propagation_overhead_pct']:+.1f} %) [target within 10 %]; masks equal: {figures['masks_equal']}")
    print(f"server memory (RSS MB): {figures['server_rss_mb']}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

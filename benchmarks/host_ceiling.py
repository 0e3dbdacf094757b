"""The host side of the GPU pipeline at 2048², on any machine: what it sustains without a GPU.

The GPU path's stages mostly wait for the device, with the GIL released, and do a little
host work with it held. This runs the real service (simulated camera through UniMMCore,
event loop, ZeroMQ publishing to a subscriber process on every topic) with the segmenter
replaced by one that *waits* for the GPU stage times measured on an H200 (session 3:
inference 4.4 ms, analysis on the device ≈ 13 ms; ``--infer-ms``, ``--analyse-ms``) and then
does the host work the GPU path does per frame: a new host copy of the int32 labels (as
``.cpu()``) and the measurement dicts from per-object sums (``objects_from_sums``). The
labels and sums are the simulator's ground truth of each replayed frame, measured once.

So the figures are the pipeline's ceiling on this host's CPUs when the GPU is infinitely
parallel to it: if they stay below 50 frames/s or above 50 ms p99, the host side alone
misses the issue's GPU targets here. Runs once with the service's garbage-collector policy
and once with Python's defaults.

    python benchmarks/host_ceiling.py [--camera-fps 50] [--mode free-run] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np

import livemask.analysis.measure as measure
import livemask.service.app as app
from livemask.acquisition.mode import Mode
from livemask.bench import BenchSettings, _run_pipeline, machine_info, prerender
from livemask.inference.segmenter import Segmenter
from livemask.log import setup_logging


class _Frame:
    """What the replaying segmenter needs of one replayed frame."""

    def __init__(self, labels: np.ndarray, sums: measure.ObjectSums, kw: dict[str, Any]) -> None:
        self.labels, self.sums, self.kw = labels, sums, kw


def _sums_of(labels: np.ndarray, image: np.ndarray) -> tuple[measure.ObjectSums, dict[str, Any]]:
    """The per-object sums ``measure_objects`` computes for ``labels`` (captured once)."""
    captured: dict[str, Any] = {}
    original = measure.objects_from_sums

    def capture(sums: measure.ObjectSums, **kw: Any) -> Any:
        captured.update(sums=sums, kw=kw)
        return original(sums, **kw)

    measure.objects_from_sums = capture  # type: ignore[assignment]
    try:
        measure.measure_objects(labels, image)
    finally:
        measure.objects_from_sums = original  # type: ignore[assignment]
    return captured["sums"], captured["kw"]


class ReplayingSegmenter:
    """Waits for the GPU's stage times, then does the GPU path's host work (see above)."""

    def __init__(self, real: Segmenter, frames: dict[bytes, _Frame], infer_ms: float,
                 analyse_ms: float) -> None:
        self.card, self.backend, self.device_resident = real.card, real.backend, True
        self._frames, self._infer_s, self._analyse_s = frames, infer_ms / 1e3, analyse_ms / 1e3

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run the host work twice, as ``Segmenter.warmup`` runs the GPU path twice."""
        frame = next(iter(self._frames.values()))
        for _ in range(2):
            self.analyse(frame, np.zeros(shape, np.uint16))

    def infer(self, image: np.ndarray) -> _Frame:
        """Wait as long as the GPU's inference stage (GIL released, like a stream sync)."""
        frame = self._frames[image[::64, ::64].tobytes()]
        time.sleep(self._infer_s)
        return frame

    def analyse(self, frame: _Frame, image: np.ndarray, *, pixel_size_um: float = 1.0
                ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Wait as long as the device analysis, then the host copy and the dicts."""
        time.sleep(self._analyse_s)
        labels = frame.labels.copy()
        kw = {**frame.kw, "pixel_size_um": pixel_size_um}
        objects, summary = measure.objects_from_sums(frame.sums, **kw)
        return labels, objects, summary


def run(settings: BenchSettings, infer_ms: float, analyse_ms: float) -> dict[str, Any]:
    """One pipeline run with the replaying segmenter."""
    rendered = prerender(settings)
    frames = {}
    for r in rendered:
        sums, kw = _sums_of(r.labels, r.image)
        frames[r.image[::64, ::64].tobytes()] = _Frame(r.labels.astype(np.int32), sums, kw)
    build = app.build_segmenter

    def replaying(cfg: Any, frame_shape: Any = None, card: Any = None) -> Any:
        return ReplayingSegmenter(build(cfg, frame_shape, card), frames, infer_ms,
                                  analyse_ms)

    app.build_segmenter = replaying  # type: ignore[assignment]
    try:
        result = asyncio.run(_run_pipeline(settings, rendered, "nuclei"))
    finally:
        app.build_segmenter = build  # type: ignore[assignment]
    result.pop("memory_mb", None)
    result["objects_per_frame"] = round(float(np.mean([f.sums.area.size for f in frames.values()])))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=300, help="frames to analyse per run")
    parser.add_argument("--exposure-ms", type=float, default=10.0)
    parser.add_argument("--camera-fps", type=float, help="pace the camera (default: free)")
    parser.add_argument("--infer-ms", type=float, default=4.4)
    parser.add_argument("--analyse-ms", type=float, default=13.0)
    parser.add_argument("--stage-threads", default="two", choices=("one", "two"))
    parser.add_argument("--mode", default="pipelined", choices=get_args(Mode),
                        help="acquisition.mode (free-run: frames skip analysis while the "
                        "camera is ahead)")
    parser.add_argument("--prefault-frames", type=int, default=8,
                        help="pipeline.prefault_frames (0 = off; compare in separate processes)")
    parser.add_argument("--queue-size", type=int, default=2,
                        help="pipeline.queue_size: frames that may wait for inference")
    parser.add_argument("--policy-only", action="store_true",
                        help="skip the run with Python's default garbage collector")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    setup_logging(quiet=True)
    record: dict[str, Any] = {"benchmark": "benchmarks/host_ceiling.py", "size": args.size,
                              "exposure_ms": args.exposure_ms, "camera_fps": args.camera_fps,
                              "infer_ms": args.infer_ms, "analyse_ms": args.analyse_ms,
                              "stage_threads": args.stage_threads, "mode": args.mode,
                              "prefault_frames": args.prefault_frames,
                              "queue_size": args.queue_size, "machine": machine_info()}
    runs: list[tuple[str, dict[str, Any]]] = [("service_gc_policy", {})]
    if not args.policy_only:
        runs.append(("python_gc_defaults", {"gc_freeze": False, "gc_threshold": 700}))
    for name, gc_args in runs:
        settings = BenchSettings(size=args.size, frames=args.frames, exposure_ms=args.exposure_ms,
                                 camera_fps=args.camera_fps, stage_threads=args.stage_threads,
                                 mode=args.mode,
                                 prefault_frames=args.prefault_frames,
                                 queue_size=args.queue_size, **gc_args)
        r = record[name] = run(settings, args.infer_ms, args.analyse_ms)
        e2e, g = r["latency_ms"]["end_to_end"], r["gc"]
        every = r["latency_ms_with_warmup"]["end_to_end"]
        print(f"{name}: {r['fps']} frames/s analysed (camera {r['camera_fps']}, "
              f"{r['frames_skipped']} of {r['frames_acquired']} skipped), end-to-end "
              f"p50/p99 {e2e['p50']}/{e2e['p99']} ms ({every['p50']}/{every['p99']} with the "
              f"first second), GC {g['collections']} "
              f"{sum(g['pause_ms'].values()):.0f} ms (max {g['max_pause_ms']} ms), "
              f"CPU ms/frame {r['cpu']['cpu_ms_per_frame'] if r['cpu'] else None}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

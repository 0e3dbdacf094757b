"""What Python's garbage collector costs when measurements are built for large frames.

Builds the per-object measurements of a frame with ``--objects`` nuclei (2,050 ≈ a 2048²
frame) ``--frames`` times from fixed per-object sums (``objects_from_sums``, the code both the
CPU and the GPU path run), keeping the last three frames' measurements alive as the service
does, in a process holding the service's modules (and torch with ``--torch``). Three
settings, one after the other: Python's defaults, the service's policy (``GcPolicy``: frozen
heap, young threshold 10,000), and the collector off (the floor).

    python benchmarks/gc_measurements.py [--torch] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import livemask.service.app  # noqa: F401  (the service's heap)
from livemask.analysis.measure import ObjectSums, objects_from_sums
from livemask.bench import machine_info
from livemask.service.gc_policy import GcMonitor, GcPolicy


def synthetic_sums(n: int, seed: int = 0) -> ObjectSums:
    """Per-object sums of ``n`` nuclei-sized objects on a 2048² frame."""
    rng = np.random.default_rng(seed)
    area = rng.integers(50, 300, n).astype(np.int64)
    return ObjectSums(
        labels=np.arange(1, n + 1), area=area, s_r=area * 100.0, s_c=area * 200.0,
        s_rr=area * 1e4 + area * 30, s_cc=area * 4e4 + area * 30, s_rc=area * 2e4 + 5.0,
        intensity=area * 1000.0, bbox=rng.integers(0, 2048, (n, 4)),
        local_background=rng.uniform(100.0, 200.0, n),
    )


def measure(sums: ObjectSums, frames: int) -> dict[str, Any]:
    """ms per frame and the collections while building ``frames`` frames' measurements."""
    alive: list[Any] = []
    monitor = GcMonitor()
    monitor.start()
    start = time.perf_counter()
    for _ in range(frames):
        alive.append(objects_from_sums(sums, shape=(2048, 2048), n_fg=300_000,
                                       background_mean=100.0, pixel_size_um=0.65))
        if len(alive) > 3:
            alive.pop(0)
    ms = (time.perf_counter() - start) / frames * 1e3
    monitor.stop()
    report = monitor.report()
    return {
        "ms_per_frame": round(ms, 3),
        "tracked_objects": len(gc.get_objects()),
        "collections": report["collections"],
        "pause_ms_total": round(sum(report["pause_ms"].values()), 1),
        "max_pause_ms": report["max_pause_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2050)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--torch", action="store_true", help="import torch first (GPU heap)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.torch:
        import torch  # noqa: F401

    sums = synthetic_sums(args.objects)
    results = {"python_default": measure(sums, args.frames)}
    policy = GcPolicy(freeze=True, threshold=10_000)
    policy.apply()
    results["service_policy"] = measure(sums, args.frames)
    policy.restore()
    gc.disable()
    results["collector_off"] = measure(sums, args.frames)
    gc.enable()
    record = {"objects": args.objects, "frames": args.frames, "torch": args.torch,
              "machine": machine_info(), "results": results}
    for name, r in results.items():
        print(f"{name:15s} {r['ms_per_frame']:6.2f} ms/frame, {r['tracked_objects']} tracked "
              f"objects, collections {r['collections']}, paused {r['pause_ms_total']} ms "
              f"(max {r['max_pause_ms']} ms)")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

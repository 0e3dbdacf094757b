"""Run the real service on the simulated microscope and measure what a user would see.

Reports frames acquired / analysed / skipped, acquire-to-publish latency percentiles (from
the published headers) and, with ground truth on, the F1 score at IoU 0.5 of the live
labels. Used for the acceptance figures in docs/performance.md:

    .venv/bin/python benchmarks/live_run.py --frames 1200 --interval 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from typing import Any

import numpy as np

from livemask.analysis.metrics import aggregate, match_instances
from livemask.client import AsyncSubscriber
from livemask.config import parse_config
from livemask.service.app import Service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def run(frames: int, interval: float, mode: str, score_every: int) -> dict[str, Any]:
    cfg = parse_config({
        "hardware": {"config_file": os.path.join(ROOT, "hardware", "simulated.cfg")},
        "simulation": {"truth": True},
        "acquisition": {"mode": mode, "autostart": False,
                        "sequence": {"time_plan": {"interval": interval, "loops": frames}}},
        "publish": {"pub_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"},
    })
    latencies: list[float] = []
    truth: dict[int, np.ndarray] = {}
    labels: dict[int, np.ndarray] = {}
    scores = []
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("measurements", "labels", "truth", "event")
    ) as sub:
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        svc.start_acquisition(None)
        finished = False
        while True:
            msg = await sub.recv(timeout_s=0.5)
            if msg is None:
                if finished and svc.pipeline.in_flight == 0:
                    break
                continue
            h = msg.header
            if msg.topic == "event" and h["kind"] == "acquisition_finished":
                finished = True
            elif msg.topic == "measurements":
                latencies.append((h["t"]["published"] - h["t"]["acquired"]) * 1e3)
            elif msg.topic in ("labels", "truth") and h["frame_id"] % score_every == 0:
                store = labels if msg.topic == "labels" else truth
                store[h["frame_id"]] = msg.arrays["labels"].copy()
                fid = h["frame_id"]
                if fid in labels and fid in truth:
                    scores.append(match_instances(truth.pop(fid), labels.pop(fid)))
        wall = time.monotonic() - t0
        status = svc.status()
    lat = np.asarray(latencies)
    total = aggregate(scores)
    return {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "mode": mode,
        "interval_s": interval,
        "frames_requested": frames,
        "frames_acquired": status["frames_acquired"],
        "frames_analysed": status["frames_analysed"],
        "frames_skipped": status["frames_skipped"],
        "frames_failed": status["frames_failed"],
        "wall_s": round(wall, 2),
        "acquired_fps": round(status["frames_acquired"] / wall, 2),
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1)
                       for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "stage_latency_ms": status["latency_ms"],
        "f1_iou50": round(total.f1, 4),
        "precision": round(total.precision, 4),
        "recall": round(total.recall, 4),
        "mean_matched_iou": round(total.mean_matched_iou, 4),
        "frames_scored": len(scores),
        "objects_true": total.n_true,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--mode", default="free-run", choices=["free-run", "synchronized"])
    ap.add_argument("--score-every", type=int, default=5, help="score every Nth frame")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    result = asyncio.run(run(args.frames, args.interval, args.mode, args.score_every))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

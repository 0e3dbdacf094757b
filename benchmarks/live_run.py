"""Run `livemask serve` on the simulated microscope and measure what a subscriber sees.

The service runs in its own process (as users run it); this process subscribes over
loopback, starts the acquisition over the control channel and records, per analysed frame,
the acquire-to-publish latency from the published timestamps, and scores the live labels
against the simulator's ground truth (topic `truth`) at IoU 0.5:

    .venv/bin/python benchmarks/live_run.py --frames 1200 --interval 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

from livemask.analysis.metrics import aggregate, match_instances
from livemask.client import ControlClient, Subscriber

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def run(frames: int, interval: float, mode: str, score_every: int) -> dict[str, Any]:
    pub, ctl = _free_address(), _free_address()
    cmd = [sys.executable, "-m", "livemask", "serve",
           "--config", os.path.join(ROOT, "configs", "simulated-nuclei.yaml"),
           "--truth", "--no-autostart", "--exit-when-done", "--mode", mode,
           "--frames", str(frames), "--interval", str(interval), "--pub", pub, "--control", ctl]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies: list[float] = []
    pending: dict[str, dict[int, np.ndarray]] = {"labels": {}, "truth": {}}
    scores = []
    status: dict[str, Any] = {}
    try:
        with Subscriber(pub, ("measurements", "labels", "truth", "event", "status")) as sub:
            while sub.recv(timeout_s=1.0) is None:  # wait for the service's heartbeat
                if proc.poll() is not None:
                    raise RuntimeError("livemask serve exited early")
            with ControlClient(ctl, timeout_s=5.0) as client:
                client.start()
            t0 = time.monotonic()
            wall = None
            while proc.poll() is None or wall is None:
                msg = sub.recv(timeout_s=1.0)
                if msg is None:
                    if proc.poll() is not None:
                        break
                    continue
                h = msg.header
                if msg.topic == "status":
                    status = h
                elif msg.topic == "event" and h["kind"] == "acquisition_finished":
                    wall = time.monotonic() - t0
                elif msg.topic == "measurements":
                    latencies.append((h["t"]["published"] - h["t"]["acquired"]) * 1e3)
                elif msg.topic in pending and h["frame_id"] % score_every == 0:
                    fid = h["frame_id"]
                    pending[msg.topic][fid] = msg.arrays["labels"].copy()
                    if fid in pending["labels"] and fid in pending["truth"]:
                        scores.append(match_instances(pending["truth"].pop(fid),
                                                      pending["labels"].pop(fid)))
            gaps = dict(sub.gaps)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)
    lat = np.asarray(latencies)
    total = aggregate(scores)
    return {
        "machine": f"{platform.node()}, {os.cpu_count()} cpus",
        "mode": mode,
        "interval_s": interval,
        "frames_requested": frames,
        "frames_acquired": status.get("frames_acquired"),
        "frames_analysed": status.get("frames_analysed"),
        "frames_skipped": status.get("frames_skipped"),
        "frames_failed": status.get("frames_failed"),
        "measurements_received": len(latencies),
        "subscriber_gaps": gaps,
        "wall_s": round(wall or 0.0, 2),
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1)
                       for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
        "stage_latency_ms_last_2000": status.get("latency_ms"),
        "f1_iou50": round(total.f1, 4),
        "precision": round(total.precision, 4),
        "recall": round(total.recall, 4),
        "mean_matched_iou": round(total.mean_matched_iou, 4),
        "frames_scored": len(scores),
        "objects_true": total.n_true,
        "exit_code": proc.returncode,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--mode", default="free-run", choices=["free-run", "pipelined", "synchronized"])
    ap.add_argument("--score-every", type=int, default=5, help="score every Nth frame")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    result = run(args.frames, args.interval, args.mode, args.score_every)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

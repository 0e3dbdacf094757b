"""A simulated run with recording on, then the recording read back and checked.

`livemask serve --record` runs in its own process (free-run, 10 frames/s by default, 1200
frames = 2 minutes); this process follows the status heartbeat (acquired frames, recorder
backlog), then opens the OME-Zarr with plain zarr and checks that every acquired frame was
saved and is readable, that labels exist exactly for analysed frames, and that the CSV has
one row per measured object. Prints the numbers as JSON. ``--baseline`` first runs the same
acquisition without recording, for the recorder's effect on skipped frames and latency:

    .venv/bin/python benchmarks/record_run.py [--frames 1200] [--interval 0.1] [--baseline]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from livemask.client import Subscriber

ROOT = Path(__file__).resolve().parent.parent


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _serve(frames: int, interval: float, mode: str, out: Path | None,
           log_path: Path) -> tuple[dict[str, Any], int, float]:
    """Run `livemask serve` to the end; the last status, the largest recorder backlog, wall s."""
    pub, ctl = _free_address(), _free_address()
    cmd = [sys.executable, "-m", "livemask", "serve",
           "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
           "--exit-when-done", "--mode", mode, "--frames", str(frames),
           "--interval", str(interval), "--pub", pub, "--control", ctl]
    if out is not None:
        cmd += ["--record", str(out)]
    status: dict[str, Any] = {}
    max_queued = 0
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            with Subscriber(pub, ("status",)) as sub:
                while proc.poll() is None:
                    msg = sub.recv(timeout_s=1.0)
                    if msg is not None:
                        status = msg.header
                        rec = status.get("recording") or {}
                        max_queued = max(max_queued, int(rec.get("frames_queued", 0)))
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"livemask serve exited with {rc}:\n{log_path.read_text()[-3000:]}")
    return status, max_queued, wall


def baseline(frames: int, interval: float, mode: str, tmp: Path) -> dict[str, Any]:
    """The same run without recording."""
    status, _, wall = _serve(frames, interval, mode, None, tmp / "baseline.log")
    return {
        "frames_acquired": status.get("frames_acquired"),
        "frames_analysed": status.get("frames_analysed"),
        "frames_skipped": status.get("frames_skipped"),
        "latency_end_to_end_ms": (status.get("latency_ms") or {}).get("end_to_end"),
        "wall_s": round(wall, 1),
    }


def run(frames: int, interval: float, mode: str, out: Path) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    status, max_queued, wall = _serve(frames, interval, mode, out, out.parent / "serve.log")
    (run_dir,) = sorted(out.glob("run-*"))
    t_read = time.monotonic()
    root = zarr.open_group(run_dir / "images.ome.zarr", mode="r")
    images, labels = root["0"], root["labels/masks/0"]
    attrs = root.attrs["livemask"]
    lines = [json.loads(x) for x in (run_dir / "frames.jsonl").read_text().splitlines()]
    by_id = {r["frame_id"]: r for r in lines}
    empty_images = labels_mismatch = 0
    for fid in range(images.shape[0]):  # every frame readable, labels where analysed
        img = images[fid]
        empty_images += int(img.max() == 0)
        rec = by_id.get(fid)
        has_labels = bool(labels[fid].max() > 0)
        expected = bool(rec and rec["analysed"] and (rec["objects"] or 0) > 0)
        labels_mismatch += int(has_labels != expected)
    read_s = time.monotonic() - t_read
    with (run_dir / "measurements.csv").open(encoding="utf-8") as fh:
        csv_rows = sum(1 for _ in csv.DictReader(fh))
    objects = sum(r["objects"] or 0 for r in lines if r["analysed"])
    acquired_status = status.get("frames_acquired")
    saved = int(images.shape[0])
    return {
        "frames_planned": frames,
        "interval_s": interval,
        "mode": mode,
        "frames_acquired_status": acquired_status,
        "frames_acquired_recorder_attr": attrs.get("frames_acquired"),
        "frames_saved_zarr": saved,
        "frames_in_jsonl": len(lines),
        "frame_ids_contiguous": sorted(by_id) == list(range(saved)),
        "frames_analysed": sum(r["analysed"] for r in lines),
        "frames_skipped": sum(r["skipped"] for r in lines),
        "frames_failed": sum(r["failed"] for r in lines),
        "empty_images": empty_images,
        "labels_mismatch": labels_mismatch,
        "measurement_rows_csv": csv_rows,
        "objects_in_frames_jsonl": objects,
        "complete": attrs.get("complete"),
        "max_recorder_backlog_frames": max_queued,
        "latency_end_to_end_ms": (status.get("latency_ms") or {}).get("end_to_end"),
        "bytes_on_disk": _du(run_dir),
        "mb_per_frame": round(_du(run_dir) / max(saved, 1) / 2**20, 3),
        "wall_s": round(wall, 1),
        "read_back_s": round(read_s, 1),
        "all_acquired_saved": saved == acquired_status == attrs.get("frames_acquired")
        == len(lines) and empty_images == 0 and labels_mismatch == 0 and csv_rows == objects,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--mode", default="free-run", choices=["free-run", "pipelined", "synchronized"])
    ap.add_argument("--out", type=Path, default=None, help="Keep the recording here.")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--baseline", action="store_true", help="Also run without recording.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="livemask-record-"))
    out = args.out or tmp / "rec"
    try:
        base = baseline(args.frames, args.interval, args.mode, tmp) if args.baseline else None
        result = run(args.frames, args.interval, args.mode, out)
        if base is not None:
            result["baseline_without_recording"] = base
    finally:
        if args.out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    sys.exit(0 if result["all_acquired_saved"] else 1)


if __name__ == "__main__":
    main()

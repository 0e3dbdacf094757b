"""Resident memory of the service over a long run (is it flat?).

Starts ``livemask serve`` on the simulated microscope in its own process (512×512, the
shipped nuclei model, free-run, a subscriber here taking every measurements message), samples
the service's resident memory (VmRSS from /proc) every ``--every`` seconds, and prints JSON:
the samples, RSS one minute in (after warm-up) and at the end, the largest, the growth
from the one-minute mark to the end in percent, and the growth from the median of the
second minute's samples to the median of the last minute's (two single samples move with
the ±2 % that RSS wanders from one sample to the next; the medians do not).

    python benchmarks/memory_run.py --minutes 10 --fps 5 --json benchmarks/results/memory-10min.json
    python benchmarks/memory_run.py --minutes 10 --free \
        --json benchmarks/results/memory-10min-free.json

``--free`` runs the camera as fast as it goes until the time is up, then stops the service
with SIGINT; in free-run mode (``--mode``, default) frames skip analysis when the camera is
ahead, in pipelined mode every frame is analysed and the camera waits for the model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def median_of(samples: list[tuple[float, float]], start: float, stop: float) -> float | None:
    """Median RSS (MiB) of the samples taken in ``[start, stop)`` seconds; None if none."""
    values = [v for t, v in samples if start <= t < stop]
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--free", action="store_true",
                    help="camera as fast as it goes for --minutes (ignores --fps)")
    ap.add_argument("--mode", default="free-run",
                    choices=["free-run", "pipelined", "synchronized"],
                    help="acquisition mode (pipelined: every frame analysed)")
    ap.add_argument("--every", type=float, default=5.0, help="sampling interval (s)")
    ap.add_argument("--port", type=int, default=5785)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from livemask.client import Subscriber

    # free: more events than a 200 frames/s camera takes in the time; stopped by SIGINT
    frames = int(args.minutes * 60 * (400 if args.free else args.fps))
    interval = 0.0 if args.free else 1 / args.fps
    pub, control = f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}"
    # the service's log goes to a file: a pipe nobody reads could fill up and stall it
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed at the end of main)
    cmd = [sys.executable, "-m", "livemask", "serve", "--config",
           str(ROOT / "configs" / "simulated-nuclei.yaml"), "--pub", pub, "--control", control,
           "--frames", str(frames), "--interval", str(interval), "--exit-when-done",
           "--mode", args.mode]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    samples: list[tuple[float, float]] = []
    received = 0
    last_status: dict[str, object] = {}
    t0 = time.monotonic()
    next_sample = t0
    try:
        with Subscriber(pub, topics=("measurements", "status")) as sub:
            while proc.poll() is None:
                msg = sub.recv(timeout_s=0.2)
                if msg is not None:
                    if msg.topic == "measurements":
                        received += 1
                    else:
                        last_status = msg.header
                now = time.monotonic()
                if now >= next_sample:
                    value = rss_mb(proc.pid)
                    if value is not None:
                        samples.append((round(now - t0, 1), round(value, 1)))
                    next_sample += args.every
                if now - t0 > args.minutes * 60 + (0 if args.free else 120):
                    proc.send_signal(signal.SIGINT)
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(30)
    if proc.returncode != 0:
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-20:]
        print(f"the service exited with code {proc.returncode}; its log ends:", *tail,
              sep="\n", file=sys.stderr)
    log.close()
    after_warmup = [v for t, v in samples if t >= 60]
    first, last = (after_warmup[0], after_warmup[-1]) if after_warmup else (None, None)
    end = max((t for t, _ in samples), default=0.0)
    second_minute = median_of(samples, 60.0, 120.0)
    last_minute = median_of(samples, max(120.0, end - 60.0), end + 1.0)
    result = {
        "benchmark": "benchmarks/memory_run.py",
        "cpu_count": os.cpu_count(),
        "frames_requested": frames,
        "fps": None if args.free else args.fps,
        "camera": "free" if args.free else "paced",
        "mode": args.mode,
        "minutes": args.minutes,
        "measurements_received": received,
        "frames_acquired": last_status.get("frames_acquired"),
        "frames_skipped": last_status.get("frames_skipped"),
        "exit_code": proc.returncode,
        "rss_mb_at_1_min": first,
        "rss_mb_at_end": last,
        "rss_mb_max": max((v for _, v in samples), default=None),
        "growth_after_1_min_percent": round(100 * (last - first) / first, 2)
        if first and last else None,
        "rss_mb_median_second_minute": second_minute,
        "rss_mb_median_last_minute": last_minute,
        "growth_of_minute_medians_percent": round(
            100 * (last_minute - second_minute) / second_minute, 2)
        if second_minute and last_minute else None,
        "samples": samples,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

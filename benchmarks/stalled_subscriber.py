"""What a subscriber that stops reading costs the service: resident memory with
``publish.max_queued_mb`` (the default 512) against none (``publish.sndhwm`` alone, 200).

Starts ``livemask serve`` on the simulated microscope in its own process (``--size``² frames,
the fast ``nuclei_classical`` model, synchronized mode so every frame is analysed and
published), connects a SUB here that takes ``frame`` and ``labels`` and never reads (its
receive queue 1 message, its kernel buffer small), and samples the service's VmRSS as
``--frames`` frames go out. Prints JSON with both runs' RSS before the first frame and at
the end:

    python benchmarks/stalled_subscriber.py --size 2048 --frames 60 \
        --json benchmarks/results/stalled-subscriber-2048.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_run import rss_mb

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(size: int, frames: int, max_queued_mb: float) -> dict[str, Any]:
    """One service run with a stalled subscriber; RSS samples and the mark in effect."""
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cfg = {
        "simulation": {"sensor_shape_px": [size, size], "truth": False},
        "model": {"name": "nuclei_classical"},
        "acquisition": {"mode": "synchronized", "autostart": True,
                        "sequence": {"time_plan": {"interval": 0.0, "loops": frames}}},
        "publish": {"pub_address": pub, "control_address": ctl,
                    "max_queued_mb": max_queued_mb},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(json.dumps(cfg))  # (YAML reads JSON)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.RCVBUF, 65536)
        for topic in (b"frame", b"labels"):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        status = ctx.socket(zmq.SUB)
        status.setsockopt(zmq.SUBSCRIBE, b"status")
        sub.connect(pub)
        status.connect(pub)
        proc = subprocess.Popen([sys.executable, "-m", "livemask", "serve", "--config",
                                 str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        samples: list[tuple[float, float | None, int]] = []
        hwm = None
        t0 = time.monotonic()
        try:
            published = 0
            while time.monotonic() - t0 < 600:
                if status.poll(500):
                    from livemask.protocol import decode

                    st = decode(status.recv_multipart()).header
                    hwm = (st.get("publisher") or {}).get("sndhwm", hwm)
                    published = int(st.get("frames_published") or 0)
                    samples.append((round(time.monotonic() - t0, 2), rss_mb(proc.pid),
                                    published))
                    if published >= frames or st.get("acquisitions_finished"):
                        break
            time.sleep(2.0)  # what is queued stays queued: the subscriber never reads
            samples.append((round(time.monotonic() - t0, 2), rss_mb(proc.pid), published))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            sub.close(linger=0)
            status.close(linger=0)
            ctx.term()
    first = next((rss for _, rss, n in samples if rss is not None and n == 0), None)
    return {"max_queued_mb": max_queued_mb, "sndhwm": hwm, "frames_published": published,
            "rss_mb_before_frames": first, "rss_mb_end": samples[-1][1],
            "rss_mb_max": max((rss for _, rss, _ in samples if rss is not None), default=None),
            "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = [run(args.size, args.frames, mb) for mb in (512.0, 0.0)]
    out = {"machine": platform.node(), "cpus": os.cpu_count(), "size": args.size,
           "frames": args.frames, "runs": runs}
    for r in runs:
        print(f"max_queued_mb {r['max_queued_mb']:g}: sndhwm {r['sndhwm']}, "
              f"{r['frames_published']} frames published, RSS "
              f"{r['rss_mb_before_frames']} MiB before the first frame -> {r['rss_mb_end']} "
              f"MiB at the end (max {r['rss_mb_max']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

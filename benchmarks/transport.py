"""Transport at camera rates: 2048×2048 frames plus labels through livemask's own PUB/SUB.

The publisher is ``livemask.transport.ZmqPublisher`` (zero-copy multipart) in this process;
the subscriber is ``livemask.client.Subscriber`` in a process of its own, decoding every
message into numpy arrays (views of the received buffers). Each frame is two messages:
``frame`` (uint16 image) and ``labels`` (int32 labels), as the service publishes them.
The publisher sends as fast as it can, keeping at most ``--window`` frames ahead of what the
subscriber acknowledged (so nothing is dropped at the high-water mark and the rate measured
is the rate delivered). Prints JSON: messages/s and GB/s delivered, and per-message checks.

    python benchmarks/transport.py --size 2048 --frames 600
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


def _subscriber(address: str, frames: int, conn: Connection, ack_every: int) -> None:
    from livemask.client import Subscriber

    got = {"frame": 0, "labels": 0}
    nbytes = 0
    bad = 0
    with Subscriber(address, topics=("frame", "labels", "status")) as sub:
        conn.send("ready")
        t0 = None
        while got["labels"] < frames:
            msg = sub.recv(timeout_s=10)
            if msg is None:
                break
            if msg.topic == "status":
                continue
            if t0 is None:
                t0 = time.perf_counter()
            arr = msg.arrays["image" if msg.topic == "frame" else "labels"]
            nbytes += arr.nbytes
            if int(arr[0, 0]) != msg.header["frame_id"] % 1000:  # content travelled intact
                bad += 1
            got[msg.topic] += 1
            if msg.topic == "labels" and got["labels"] % ack_every == 0:
                conn.send(("ack", got["labels"]))
        wall = time.perf_counter() - (t0 or time.perf_counter())
        conn.send(("done", {**got, "bytes": nbytes, "wall_s": wall, "bad": bad,
                            "gaps": dict(sub.gaps)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--window", type=int, default=4, help="frames in flight at most")
    args = ap.parse_args()

    from livemask.transport.publisher import ZmqPublisher

    h = w = args.size
    rng = np.random.default_rng(0)
    # a ring of buffers: a slot is written again only after the subscriber acknowledged the
    # frame that used it (published arrays are sent zero-copy and must not change meanwhile)
    ring = [(rng.integers(0, 4000, (h, w), dtype=np.uint16),
             rng.integers(0, 3000, (h, w), dtype=np.int32)) for _ in range(2 * args.window)]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with ZmqPublisher("tcp://127.0.0.1:*", sndhwm=4 * args.window) as pub:
        proc = ctx.Process(target=_subscriber,
                           args=(pub.bound_address, args.frames, child, 2), daemon=True)
        proc.start()
        while not parent.poll(0.05):  # the slow-joiner handshake: status until it listens
            pub.publish("status", {"hello": True})
        assert parent.recv() == "ready"
        for _ in range(20):
            pub.publish("status", {"hello": True})
            time.sleep(0.01)
        acked = 0
        result: dict[str, Any] | None = None
        t0 = time.perf_counter()
        for i in range(args.frames):
            while i - acked >= args.window:  # flow control: wait for the subscriber
                kind, value = parent.recv()
                if kind == "ack":
                    acked = value
            image, labels = ring[i % len(ring)]
            image[0, 0] = labels[0, 0] = i % 1000
            header = {"frame_id": i, "t": {"acquired": time.time()}}
            pub.publish("frame", header, {"image": image})
            pub.publish("labels", header, {"labels": labels})
        send_wall = time.perf_counter() - t0
        while result is None:
            kind, value = parent.recv()
            if kind == "done":
                result = value
        proc.join(10)
    wall = result["wall_s"]
    messages = result["frame"] + result["labels"]
    record = {
        "benchmark": "benchmarks/transport.py",
        "cpu_count": os.cpu_count(),
        "frame_shape": [h, w],
        "frames": args.frames,
        "message_bytes": {"frame": h * w * 2, "labels": h * w * 4},
        "messages_received": messages,
        "messages_per_s": round(messages / wall, 1) if wall else None,
        "frames_per_s": round(result["labels"] / wall, 1) if wall else None,
        "gb_per_s": round(result["bytes"] / wall / 1e9, 2) if wall else None,
        "publisher_wall_s": round(send_wall, 3),
        "content_errors": result["bad"],
        "subscriber_gaps": result["gaps"],
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

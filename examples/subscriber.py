"""Print the nuclei count of every analysed frame of a running `livemask serve`.

    python examples/subscriber.py [tcp://127.0.0.1:5555]
"""

from __future__ import annotations

import contextlib
import sys

from livemask.client import Subscriber


def main(address: str = "tcp://127.0.0.1:5555") -> None:
    with Subscriber(address, topics=("measurements", "event")) as sub:
        for msg in sub.messages():  # (says so when nothing comes)
            h = msg.header
            if msg.topic == "event":
                print("event:", h["kind"])
                continue
            latency_ms = (h["t"]["published"] - h["t"]["acquired"]) * 1e3
            print(f"frame {h['frame_id']:5d}  index {h['index']}  nuclei {h['summary']['count']:4d}"
                  f"  latency {latency_ms:6.1f} ms  gaps {sub.gaps}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the way to end it
        main(*sys.argv[1:])

"""A minimal external controller: when a frame shows many nuclei, image the next field.

It subscribes to measurements and sends `enqueue` over the control channel, which inserts
an event into the running acquisition. Run `livemask serve` first.

    python examples/controller.py
"""

from __future__ import annotations

from livemask.client import ControlClient, Subscriber

PUB, CONTROL = "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"
THRESHOLD = 140  # nuclei per field


def main() -> None:
    with Subscriber(PUB, topics=("measurements",), latest_only=True) as sub, \
            ControlClient(CONTROL) as ctl:
        x_um = 0.0
        for msg in sub:
            count = msg.header["summary"]["count"]
            if count > THRESHOLD:
                x_um += 400.0
                reply = ctl.enqueue([{"x_pos": x_um, "y_pos": 0.0}])
                print(f"frame {msg.header['frame_id']}: {count} nuclei -> move to x={x_um} µm "
                      f"({reply})")


if __name__ == "__main__":
    main()

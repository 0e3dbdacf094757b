"""A minimal external controller: when a frame shows many nuclei, image the next field.

It subscribes to measurements and sends `enqueue` over the control channel, which inserts
an event into the running acquisition. It reacts to planned frames only: its own events
carry the index key ``ext``, and their frames are not acted on again (else every frame of
a crowded sample would send the stage further, for ever). It stops after ``MAX_MOVES``.
Run `livemask serve` first.

    python examples/controller.py [PUB_ADDRESS [CONTROL_ADDRESS]]
"""

from __future__ import annotations

import sys

from livemask.client import ControlClient, Subscriber
from livemask.errors import ControlError

PUB, CONTROL = "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"
THRESHOLD = 140  # nuclei per field
MAX_MOVES = 10
EXT_KEY = "ext"  # index key of the events this controller enqueues
#: The fields it visits in turn (stage µm): within ± 499 µm of the simulated world's
#: centre, beyond which its world wraps around (the same nuclei again); on a real rig,
#: fields of your sample
FIELDS = [(-300.0, -300.0), (300.0, -300.0), (-300.0, 300.0), (300.0, 300.0)]


def main(pub: str = PUB, control: str = CONTROL) -> None:
    with Subscriber(pub, topics=("measurements",), latest_only=True) as sub, \
            ControlClient(control) as ctl:
        moves = 0
        for msg in sub.messages():  # (says so when nothing comes)
            header = msg.header
            if EXT_KEY in header.get("index", {}):
                continue  # a frame this controller asked for
            count = header["summary"]["count"]
            if count > THRESHOLD:
                x_um, y_um = FIELDS[moves % len(FIELDS)]
                moves += 1
                event = {"x_pos": x_um, "y_pos": y_um, "index": {EXT_KEY: moves}}
                reply = ctl.enqueue([event])
                print(f"frame {header['frame_id']}: {count} nuclei -> image x={x_um} "
                      f"y={y_um} µm ({reply})")
                if moves >= MAX_MOVES:
                    print(f"{MAX_MOVES} fields imaged; done")
                    return


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except KeyboardInterrupt:
        pass
    except ControlError as exc:  # refused, or no reply (ControlTimeout): one line, not a trace
        sys.exit(f"error: {exc}")

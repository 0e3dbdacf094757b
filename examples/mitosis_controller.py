"""An external feedback controller: catch nuclei entering mitosis, from another process.

The same idea as the `mitosis` rule of ``configs/smart-mitosis.yaml``, but outside the
service: subscribe to ``measurements``, compare each overview frame with the previous one
at the same stage position, and when a nucleus became much brighter while keeping its
integrated signal (it condensed), send ``enqueue`` over the control channel with a burst of
events centred on it. Use it with the service's own rule switched off::

    livemask serve --config configs/smart-mitosis.yaml      # in one terminal
    python examples/mitosis_controller.py --disable-rule mitosis

The controller marks its events with the index key ``ext`` (so it can recognise their frames
and ignore them for detection) and prints the reaction time it observed: from the triggering
frame's ``t.acquired`` to the ``t.acquired`` of the first burst frame. An external controller
reacts a frame later than a rule in the service: it sees a frame only after it was published,
and in synchronized mode the next planned event has been released by then.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from livemask.client import ControlClient, Subscriber
from livemask.errors import ControlError
from livemask.feedback import EventPlanner, FeatureTracker, FrameContext
from livemask.feedback.actions import ActionError

EXT_KEY = "ext"  # index key of the events this controller enqueues


class MitosisController:
    """Decides bursts from measurements messages; keeps per-position history."""

    def __init__(
        self,
        *,
        intensity_change: float = 1.5,
        integrated_range: tuple[float, float] = (0.65, 1.6),
        area_rel_range: tuple[float, float] = (0.3, 1.6),
        burst_frames: int = 4,
        exposure_ms: float | None = None,
    ) -> None:
        self.intensity_change = intensity_change
        self.integrated_range = integrated_range
        self.area_rel_range = area_rel_range
        self.burst_frames = burst_frames
        self.exposure_ms = exposure_ms
        self.tracker = FeatureTracker(baseline_frames=3)
        self.sent = 0
        self.pending: dict[int, float] = {}  # burst id -> t.acquired of the triggering frame
        self.reactions_ms: list[float] = []
        self.log: list[dict[str, Any]] = []  # one entry per burst sent

    def on_measurements(
        self, header: dict[str, Any], shape: tuple[int, int] | None = None
    ) -> list[dict]:
        """Events to enqueue because of this measurements message (usually none), of a
        frame of ``shape`` (rows, columns; default: the message's own ``image_shape``)."""
        index = header.get("index") or {}
        if EXT_KEY in index:  # one of our burst frames: note the reaction time once
            started = self.pending.pop(int(index[EXT_KEY]), None)
            if started is not None:
                self.reactions_ms.append((header["t"]["acquired"] - started) * 1e3)
            return []
        if "fb" in index:  # a frame made by a rule inside the service
            return []
        ctx = FrameContext.from_measurements(header, shape)
        features = self.tracker.compute(ctx)
        lo, hi = self.integrated_range
        small, big = self.area_rel_range
        hits = [
            f
            for f in features
            if (f["mean_intensity_change"] or 0) > self.intensity_change
            and lo < (f["integrated_change"] or 0) < hi
            and small < (f["area_rel"] or 0) < big
        ]
        if not hits:
            return []
        best = max(hits, key=lambda f: f["mean_intensity_change"] or 0)
        planner = EventPlanner.for_pixel_size(ctx.pixel_size_um)
        try:
            x, y = planner.centred(ctx, (best["centroid_y"] or 0.0, best["centroid_x"] or 0.0))
        except ActionError as exc:
            print(f"frame {ctx.frame_id}: cannot centre ({exc})")
            return []
        self.sent += 1
        self.pending[self.sent] = ctx.acquired
        self.log.append({"id": self.sent, "frame_id": ctx.frame_id, "index": dict(index),
                         "x_um": x, "y_um": y, "target": best})
        keep = {k: v for k, v in index.items() if k in ("t", "p")}
        event: dict[str, Any] = {
            "index": {**keep, EXT_KEY: self.sent},
            "x_pos": x,
            "y_pos": y,
            "z_pos": ctx.position.get("z_um"),
        }
        if self.exposure_ms is not None:
            event["exposure"] = self.exposure_ms
        return [dict(event) for _ in range(self.burst_frames)]


def main() -> None:
    ap = argparse.ArgumentParser(description="External mitosis controller for livemask")
    ap.add_argument("--pub", default="tcp://127.0.0.1:5555")
    ap.add_argument("--control", default="tcp://127.0.0.1:5556")
    ap.add_argument("--frames", type=int, default=4, help="burst frames")
    ap.add_argument("--disable-rule", action="append", default=[], help="service rule to turn off")
    ap.add_argument("--duration-s", type=float, default=None, help="stop after this long")
    args = ap.parse_args()

    controller = MitosisController(burst_frames=args.frames)
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
    with Subscriber(args.pub, topics=("measurements",)) as sub, ControlClient(
        args.control
    ) as ctl:
        if args.disable_rule:
            ctl.request("rules", enabled={name: False for name in args.disable_rule})
        hint_at: float | None = time.monotonic() + 5.0  # say so when nothing comes
        while deadline is None or time.monotonic() < deadline:
            msg = sub.recv(timeout_s=1.0)
            if msg is None:
                if hint_at is not None and time.monotonic() > hint_at:
                    hint_at = None
                    print(f"no measurements from {args.pub} after 5 s: is `livemask serve` "
                          "running there, with feedback or frames to analyse?", file=sys.stderr)
                continue
            hint_at = None
            # (the frame's size comes with its measurements: image_shape)
            events = controller.on_measurements(dict(msg.header))
            if events:
                reply = ctl.enqueue(events)
                print(f"frame {msg.header['frame_id']}: burst {controller.sent} at "
                      f"x={events[0]['x_pos']:.1f} y={events[0]['y_pos']:.1f} µm ({reply})")
            if controller.reactions_ms:
                r = controller.reactions_ms
                print(f"reaction (trigger acquired -> first burst frame acquired): last "
                      f"{r[-1]:.0f} ms, {len(r)} bursts")
                controller.reactions_ms = []


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except ControlError as exc:  # refused, or no reply (ControlTimeout): one line, not a trace
        sys.exit(f"error: {exc}")

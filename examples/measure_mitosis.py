"""Measure the smart-mitosis demo against the simulator's ground truth.

Runs the real service in this process on ``configs/smart-mitosis.yaml`` (simulated
microscope, synchronized mode unless ``--mode`` says otherwise), records the published
``measurements`` and ``event`` messages, and compares the feedback bursts with the
simulator's log of mitoses (``NucleiSample.mitosis_log``):

- a mitosis *counts* when it starts (nucleus condenses) inside one of the overview fields,
  after the acquisition started and early enough to end (divide) before it stopped;
- it is *captured* when a burst whose first frame was taken while the nucleus was mitotic
  (from its start step to the step it divides, inclusive) is centred within 10 % of the
  field width of the nucleus;
- reaction latency is ``reaction_ms`` of the ``feedback_action`` events (triggering frame's
  ``t.acquired`` to the MDA runner's ``eventStarted`` of the burst's first event);
- ordering: every burst frame must come before the next overview frame at its position.

The simulator's time is snap-driven: each frame advances the sample by one step, whatever
the wall-clock interval, so the capture rate does not depend on ``--interval``.

    python examples/measure_mitosis.py --loops 60 --division-rate 0.0005 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from livemask.acquisition.simulated.nuclei import NucleiParams
from livemask.acquisition.simulated.world import get_world
from livemask.client import AsyncSubscriber, ControlClient, Subscriber
from livemask.config import ServiceConfig, load_config
from livemask.feedback import FeatureTracker, FrameContext
from livemask.service.app import Service

ROOT = Path(__file__).resolve().parent.parent


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of ``values`` (ms)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    p = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p[0]), 1),
        "p95": round(float(p[1]), 1),
        "p99": round(float(p[2]), 1),
        "max": round(float(max(values)), 1),
    }


def _external_controller() -> Any:
    spec = importlib.util.spec_from_file_location(
        "mitosis_controller", Path(__file__).with_name("mitosis_controller.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MitosisController(burst_frames=4)


def _run_external(ctrl: Any, pub: str, control: str, stop: threading.Event,
                  ready: threading.Event, shape: tuple[int, int]) -> None:
    with Subscriber(pub, topics=("measurements",), rcvhwm=100_000) as sub, \
            ControlClient(control) as ctl:
        ready.set()
        while not stop.is_set():
            msg = sub.recv(timeout_s=0.1)
            if msg is None:
                continue
            events = ctrl.on_measurements(dict(msg.header), shape)
            if events:
                try:
                    ctl.enqueue(events)
                except Exception as exc:  # the acquisition ended meanwhile
                    print(f"enqueue failed: {exc}")


async def record(
    cfg: ServiceConfig, division_rate: float | None, external: bool = False
) -> dict[str, Any]:
    """Run the acquisition; return the messages, the status and the mitosis log."""
    if external:  # the same decision made by examples/mitosis_controller.py instead
        cfg.feedback.rules = []
    if division_rate is not None:  # the service builds the world with this rate
        cfg.simulation.division_rate_per_step = division_rate
    async with Service(cfg) as svc:
        sim = cfg.simulation
        meas: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        load_before = os.getloadavg()
        ctrl = _external_controller() if external else None
        stop, ready = threading.Event(), threading.Event()
        worker = None
        if ctrl is not None:
            worker = threading.Thread(
                target=_run_external,
                args=(ctrl, svc.publisher.bound_address, svc.control.bound_address, stop, ready,
                      tuple(sim.sensor_shape_px)),
                daemon=True,
            )
            worker.start()
            await asyncio.to_thread(ready.wait, 10.0)
        async with AsyncSubscriber(
            svc.publisher.bound_address, ("measurements", "event"), rcvhwm=100_000
        ) as sub:
            await asyncio.sleep(0.3)
            t0 = time.time()
            svc.start_acquisition(None)
            done = False
            drain_until: float | None = None
            while True:
                msg = await sub.recv(timeout_s=0.1)
                if msg is not None:
                    head = dict(msg.header)
                    if msg.topic == "measurements":
                        if "fb" in head["index"] or "ext" in head["index"]:
                            head.pop("objects", None)  # kept for overview frames only
                        meas.append(head)
                    else:
                        events.append(head)
                        done |= head.get("kind") == "acquisition_finished"
                if drain_until is None and done and svc.pipeline.in_flight == 0:
                    drain_until = time.monotonic() + 0.5
                if drain_until is not None and time.monotonic() > drain_until:
                    break
            wall = time.time() - t0
        stop.set()
        if worker is not None:
            await asyncio.to_thread(worker.join, 5.0)
        status = svc.status()
        world = get_world()
        return {
            "measurements": meas,
            "events": events,
            "status": status,
            "mitoses": list(world.sample.mitosis_log),  # type: ignore[union-attr]
            "world_frames": world.frames,
            "world_shape": world.sample.params.world_shape_px,
            "mitosis_steps": world.sample.params.mitosis_steps,  # type: ignore[union-attr]
            "wall_s": wall,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "external_log": ctrl.log if ctrl is not None else None,
        }


def analyse(cfg: ServiceConfig, rec: dict[str, Any]) -> dict[str, Any]:
    """Capture rate, precision, ordering and reaction latency from a recording."""
    sim = cfg.simulation
    px = sim.pixel_size_um
    fh, fw = sim.sensor_shape_px
    wh, ww = rec["world_shape"]
    spf = sim.steps_per_frame
    tol_px = 0.10 * fw

    def step_of(frame_id: int) -> int:
        return (frame_id + 1) * spf

    def centre_px(x_um: float, y_um: float) -> tuple[float, float]:
        # field origin (world px) + the middle pixel, as the simulated world maps the stage
        return (y_um / px + wh / 2 - fh / 2 + (fh - 1) / 2,
                x_um / px + ww / 2 - fw / 2 + (fw - 1) / 2)

    def wrap_dist(a: tuple[float, float], b: tuple[float, float]) -> float:
        dy = (a[0] - b[0] + wh / 2) % wh - wh / 2
        dx = (a[1] - b[1] + ww / 2) % ww - ww / 2
        return math.hypot(dy, dx)

    meas = sorted(rec["measurements"], key=lambda m: m["frame_id"])
    external = rec.get("external_log") is not None
    key = "ext" if external else "fb"
    overview = [m for m in meas if "fb" not in m["index"] and "ext" not in m["index"]]
    by_id = {m["frame_id"]: m for m in meas}
    fb_frames: dict[int, list[dict[str, Any]]] = {}
    for m in meas:
        if key in m["index"]:
            fb_frames.setdefault(int(m["index"][key]), []).append(m)
    positions = {
        int(m["index"]["p"]): (m["position"]["x_um"], m["position"]["y_um"]) for m in overview
    }
    field_centres = {p: centre_px(x, y) for p, (x, y) in positions.items()}
    n_frames = len(meas)
    first_step, last_step = step_of(0), step_of(n_frames - 1)
    steps = rec["mitosis_steps"]

    refused = [e for e in rec["events"] if e.get("kind") == "feedback_refused"]
    if external:  # the controller's log in the shape of feedback_action events
        actions = [
            {"action_id": e["id"], "frame_id": e["frame_id"], "index": e["index"],
             "position": by_id[e["frame_id"]]["position"], "target": e["target"],
             "events": [{"x_pos": e["x_um"], "y_pos": e["y_um"]}]}
            for e in rec["external_log"]
        ]
    else:
        actions = [e for e in rec["events"] if e.get("kind") == "feedback_action"]
    bursts: list[dict[str, Any]] = []
    first_frame_ms = []
    order_ok = True
    for a in actions:
        frames = fb_frames.get(int(a["action_id"]), [])
        if not frames:
            continue
        first = min(f["frame_id"] for f in frames)
        first_frame_ms.append(
            (by_id[first]["t"]["acquired"] - by_id[a["frame_id"]]["t"]["acquired"]) * 1e3
        )
        ev = a["events"][0]
        centre = centre_px(ev["x_pos"], ev["y_pos"])
        bursts.append({"step": step_of(first), "centre": centre, "action": a})
        p = a["index"].get("p")
        later = [m["frame_id"] for m in overview if m["frame_id"] > a["frame_id"]
                 and m["index"].get("p") == p]
        if later and max(f["frame_id"] for f in frames) > min(later):
            order_ok = False

    def in_field(y: float, x: float) -> int | None:
        for p, (cy, cx) in field_centres.items():
            dy = (y - cy + wh / 2) % wh - wh / 2
            dx = (x - cx + ww / 2) % ww - ww / 2
            if abs(dy) <= fh / 2 and abs(dx) <= fw / 2:
                return p
        return None

    counted, captured, observable, observable_captured = 0, 0, 0, 0
    ovw_steps: dict[int, list[int]] = {}
    for m in overview:
        ovw_steps.setdefault(int(m["index"]["p"]), []).append(step_of(m["frame_id"]))
    # the features the rule saw, replayed over the overview frames (for the misses)
    tracker = FeatureTracker(cfg.feedback.match_radius_px, cfg.feedback.baseline_frames)
    seen_features: dict[int, list[dict[str, Any]]] = {}
    for m in overview:
        ctx = FrameContext.from_measurements(m, (fh, fw))
        seen_features[m["frame_id"]] = tracker.compute(ctx)
    frame_at_step = {step_of(m["frame_id"]): m for m in overview}

    def nearest_object(step: int, y: float, x: float) -> dict[str, Any] | None:
        m = frame_at_step.get(step)
        if m is None:
            return None
        cy, cx = field_centres[int(m["index"]["p"])]
        best, best_d = None, 10.0
        for f in seen_features[m["frame_id"]]:
            oy = cy - (fh - 1) / 2 + (f["centroid_y"] or 0)
            ox = cx - (fw - 1) / 2 + (f["centroid_x"] or 0)
            d = wrap_dist((oy, ox), (y, x))
            if d < best_d:
                best, best_d = f, d
        if best is None:
            return None
        keys = ("mean_intensity_change", "integrated_change", "area_change", "area_rel",
                "area_px", "edge_distance_px")
        return {k: None if best[k] is None else round(best[k], 2) for k in keys}

    misses = []
    for rec_m in rec["mitoses"]:
        s = rec_m.start_step
        if s < first_step or s + steps > last_step:
            continue
        p = in_field(rec_m.y, rec_m.x)
        if p is None:
            continue
        counted += 1
        seen = [st for st in ovw_steps.get(p, []) if s <= st < s + steps]
        before = [st for st in ovw_steps.get(p, []) if st < s]
        is_observable = bool(seen and before)
        observable += is_observable
        hit = any(
            s <= b["step"] <= s + steps and wrap_dist(b["centre"], (rec_m.y, rec_m.x)) <= tol_px
            for b in bursts
        )
        captured += hit
        observable_captured += hit and is_observable
        if not hit:
            misses.append({"id": rec_m.nucleus_id, "start_step": s, "p": p,
                           "overview_seen_at": seen, "observable": is_observable,
                           "object_seen": [nearest_object(st, rec_m.y, rec_m.x) for st in seen]})

    # what each action was aimed at: the nearest nucleus in mitosis at the trigger frame
    aimed = []
    for b in bursts:
        a = b["action"]
        trig_step = step_of(a["frame_id"])
        tgt = a.get("target") or {}
        x, y = a["position"]["x_um"], a["position"]["y_um"]
        cy, cx = centre_px(x, y)
        ty = cy + (tgt.get("centroid_y") or 0) - (fh - 1) / 2
        tx = cx + (tgt.get("centroid_x") or 0) - (fw - 1) / 2
        near = [
            (wrap_dist((ty, tx), (r.y, r.x)), trig_step - r.start_step)
            for r in rec["mitoses"]
            if r.start_step <= trig_step < r.start_step + steps
        ]
        d, age = min(near) if near else (math.inf, None)
        aimed.append({
            "action_id": a["action_id"],
            "trigger_step": trig_step,
            "burst_step": b["step"],
            "nearest_mitosis_px": round(d, 1),
            "mitosis_age_steps": age,
            "intensity_change": tgt.get("mean_intensity_change"),
            "area_change": tgt.get("area_change"),
            "area_px": tgt.get("area_px"),
        })
    # precision: bursts that were centred on a nucleus in mitosis at the time
    true_bursts = sum(
        any(
            r.start_step <= b["step"] <= r.start_step + steps
            and wrap_dist(b["centre"], (r.y, r.x)) <= tol_px
            for r in rec["mitoses"]
        )
        for b in bursts
    )
    reaction = [e["reaction_ms"] for e in actions if e.get("reaction_ms") is not None]
    sources = sorted({str(e.get("reaction_from")) for e in actions})
    e2e = [(m["t"]["published"] - m["t"]["acquired"]) * 1e3 for m in meas]
    return {
        "frames": n_frames,
        "overview_frames": len(overview),
        "feedback_frames": n_frames - len(overview),
        "world_frames": rec["world_frames"],
        "wall_s": round(rec["wall_s"], 1),
        "load_avg_before_after": [round(x, 2) for x in rec["load_before"] + rec["load_after"]],
        "mitoses_counted": counted,
        "mitoses_captured": captured,
        "capture_rate": round(captured / counted, 3) if counted else None,
        "mitoses_observable": observable,
        "observable_capture_rate": round(observable_captured / observable, 3)
        if observable else None,
        "actions": len(actions),
        # every refusal (events report a repeated one at its 1st, 10th, 100th, ... time)
        "refused": (rec["status"].get("feedback") or {}).get("refused", len(refused)),
        "refusal_reasons": sorted({str(e.get("limit")) for e in refused}),
        "bursts_on_a_mitosis": true_bursts,
        "burst_precision": round(true_bursts / len(bursts), 3) if bursts else None,
        "bursts_before_next_overview_at_position": order_ok,
        "reaction_ms": percentiles(reaction),
        "reaction_from": sources,
        "reaction_to_first_frame_ms": percentiles(first_frame_ms),
        "end_to_end_ms": percentiles(e2e),
        "status_feedback": rec["status"].get("feedback"),
        "aimed": aimed[:60],
        "misses": misses[:20],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smart-mitosis.yaml"))
    ap.add_argument("--loops", type=int, default=None, help="overview rounds (default: config)")
    ap.add_argument("--interval", type=float, default=None, help="overview interval s")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--mode", choices=["free-run", "pipelined", "synchronized"], default=None)
    ap.add_argument(
        "--division-rate",
        type=float,
        default=None,
        help="simulated mitosis rate per nucleus and step (default: the config's, 0.00015 in "
        "configs/smart-mitosis.yaml)",
    )
    ap.add_argument("--external", action="store_true",
                    help="decide in examples/mitosis_controller.py (enqueue) instead of the rule")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--dump", type=Path, default=None, help="pickle the raw recording here")
    args = ap.parse_args()

    cfg = load_config(args.config)
    cfg.acquisition.autostart = False
    cfg.publish.pub_address = "tcp://127.0.0.1:*"
    cfg.publish.control_address = "tcp://127.0.0.1:*"
    seq = dict(cfg.acquisition.sequence)
    tp = dict(seq.get("time_plan") or {})
    if args.loops is not None:
        tp["loops"] = args.loops
    if args.interval is not None:
        tp["interval"] = args.interval
    seq["time_plan"] = tp
    cfg.acquisition.sequence = seq
    if args.seed is not None:
        cfg.simulation.seed = args.seed
    if args.mode is not None:
        cfg.acquisition.mode = args.mode
    rec = asyncio.run(record(cfg, args.division_rate, args.external))
    if args.dump is not None:
        import pickle

        args.dump.write_bytes(pickle.dumps({k: v for k, v in rec.items() if k != "status"}))
    result = {
        "config": args.config,
        "mode": cfg.acquisition.mode,
        "decided_by": "external controller" if args.external else "rule in the service",
        "loops": tp.get("loops"),
        "interval_s": tp.get("interval"),
        "seed": cfg.simulation.seed,
        "division_rate_per_step": cfg.simulation.division_rate_per_step
        or NucleiParams().division_rate_per_step,
        "cpu_count": os.cpu_count(),
        **analyse(cfg, rec),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Feedback in the running service: rules fire, actions run, events and refusals published."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.client import ControlClient, Subscriber
from livemask.config import load_config
from livemask.errors import ControlError
from livemask.feedback import FeedbackConfig, FeedbackController
from livemask.protocol import Message
from livemask.service.app import Service
from tests.conftest import ROOT, make_config
from tests.test_service import collect_run, control, enqueue_and_watch

TWO_POSITIONS = {
    "stage_positions": [{"x": -200.0, "y": 0.0, "z": 0.0}, {"x": 200.0, "y": 0.0, "z": 0.0}],
    "time_plan": {"interval": 0.0, "loops": 4},
    "channels": [{"config": "DAPI", "exposure": 10.0}],
}
# fires once, on the second overview frame at position 0: centre the object nearest the
# field centre and take a 3-frame burst there
BURST_RULE = {
    "name": "burst-once",
    "when": {"objects": {"where": {"area_px": {"gt": 40}}}},
    "persist_frames": 2,
    "max_fires": 1,
    "action": {"burst": {"frames": 3, "interval_s": 0.05, "centre": True}},
}


def feedback_config(rules: list[dict[str, Any]], **acq: Any) -> Any:
    return make_config(
        acquisition={"sequence": TWO_POSITIONS, **acq},
        feedback={"rules": rules, "limits": {"stage_x_range_um": [-600, 600]}},
    )


def by_kind(got: dict[str, list[Message]], kind: str) -> list[dict[str, Any]]:
    return [m.header for m in got["event"] if m.header["kind"] == kind]


# ------------------------------------------------------------------ end to end
async def test_rule_fires_and_burst_runs_before_next_overview_frame() -> None:
    async with Service(feedback_config([BURST_RULE])) as svc:
        got = await collect_run(svc, ("measurements", "event", "status"))
        status = await control(svc, "status")
    meas = sorted((m.header for m in got["measurements"]), key=lambda h: h["frame_id"])
    (action,) = by_kind(got, "feedback_action")
    assert action["rule"] == "burst-once" and action["action"]["kind"] == "burst"
    assert len(action["events"]) == 3
    trigger = next(h for h in meas if h["frame_id"] == action["frame_id"])
    assert trigger["index"] == {"t": 1, "p": 0, "c": 0}
    assert action["reaction_from"] == "eventStarted"
    assert 0 < action["reaction_ms"] < 10_000
    assert action["reaction_ms"] >= action["decision_ms"]

    burst = [h for h in meas if h["index"].get("fb") == action["action_id"]]
    assert len(burst) == 3 and len(meas) == 8 + 3
    # the burst comes right after the trigger (synchronized), before the next overview
    # frame at position 0 (and before anything else)
    order = [h["frame_id"] for h in meas]
    i = order.index(trigger["frame_id"])
    assert [h["frame_id"] for h in burst] == order[i + 1 : i + 4]
    next_p0 = [h for h in meas if "fb" not in h["index"] and h["index"]["p"] == 0
               and h["frame_id"] > trigger["frame_id"]]
    assert all(b["frame_id"] < next_p0[0]["frame_id"] for b in burst)
    # the burst is centred on the target: its stage position is the trigger's plus the
    # target's offset from the image centre, in µm
    target = action["target"]
    px = trigger["pixel_size_um"]
    expect_x = trigger["position"]["x_um"] + (target["centroid_x"] - 255.5) * px
    expect_y = trigger["position"]["y_um"] + (target["centroid_y"] - 255.5) * px
    for b in burst:
        assert b["position"]["x_um"] == pytest.approx(expect_x)
        assert b["position"]["y_um"] == pytest.approx(expect_y)
        assert b["index"]["p"] == 0
    # the frames were taken at the given interval (runner min_start_time)
    acquired = [b["t"]["acquired"] for b in burst]
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(acquired))
    fb = status["feedback"]
    assert fb["actions"] == 1 and fb["refused"] == 0 and fb["pending"] == 0
    assert fb["reaction_ms"]["n"] == 1 and fb["reaction_ms"]["p95"] is not None
    assert fb["rules"][0] == {"name": "burst-once", "kind": "declarative", "enabled": True,
                              "fired": 1, "actions": 1, "refused": 0, "errors": 0}
    assert fb["dose_ms"]["p0"] == pytest.approx(4 * 10.0 + 3 * 10.0)


async def test_refused_action_is_published_and_not_run() -> None:
    rule = {
        "name": "too-far",
        "when": {"values": [{"path": "summary.count", "ge": 0}]},
        "max_fires": 1,
        "action": {"move": {"dx_um": 5000.0, "dy_um": 0.0}},
    }
    async with Service(feedback_config([rule])) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    (refused,) = by_kind(got, "feedback_refused")
    assert refused["limit"] == "stage_x_range_um" and "feedback.limits" in refused["reason"]
    assert refused["rule"] == "too-far" and refused["events"][0]["x_pos"] == pytest.approx(4800)
    assert by_kind(got, "feedback_action") == []
    assert len(got["measurements"]) == 8


async def test_stop_and_skip_actions() -> None:
    rules = [
        {  # position 1 is empty of interest: skip its remaining visits
            "name": "skip-p1",
            "when": {"values": [{"path": "index.p", "eq": 1}]},
            "max_fires": 1,
            "action": {"skip": {}},
        },
        {  # enough frames seen: stop
            "name": "enough",
            "scope": "global",
            "persist_frames": 4,
            "when": {"values": [{"path": "summary.count", "ge": 1}]},
            "action": {"stop": True},
        },
    ]
    async with Service(feedback_config(rules)) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    meas = [m.header for m in got["measurements"]]
    # p0 t0, p1 t0 (skip fires), p0 t1, p0 t2 -> 4th frame: stop
    assert [(h["index"]["t"], h["index"]["p"]) for h in meas] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    kinds = [a["action"]["kind"] for a in by_kind(got, "feedback_action")]
    assert kinds == ["skip", "stop"]
    assert all(a["reaction_from"] == "applied" for a in by_kind(got, "feedback_action"))


async def test_rules_command_lists_replaces_and_toggles() -> None:
    async with Service(feedback_config([BURST_RULE])) as svc:
        rules = await control(svc, "rules")
        assert [r["name"] for r in rules] == ["burst-once"]
        rules = await control(svc, "rules", enabled={"burst-once": False})
        assert rules[0]["enabled"] is False
        with pytest.raises(ControlError) as info:
            await control(svc, "rules", enabled={"nope": True})
        assert info.value.code == "invalid_args" and "burst-once" in info.value.message
        with pytest.raises(ControlError) as info:
            await control(svc, "rules", rules=[{"name": "x", "when": {}}])
        assert info.value.code == "invalid_args"
        with pytest.raises(ControlError) as info:
            await control(svc, "rules", rules=[{"name": "x", "use": "no_such_mod:R"}])
        assert info.value.code == "invalid_args" and "feedback.rules" in info.value.message
        new = dict(BURST_RULE, name="renamed")
        with pytest.raises(ControlError) as info:  # the rig has no such preset
            await control(svc, "rules", rules=[{**BURST_RULE, "action": {
                "channel": {"channel": "NOPE", "frames": 1}}}])
        assert info.value.code == "invalid_args" and "channel 'NOPE'" in info.value.message
        with pytest.raises(ControlError) as info:  # one bad part: nothing is applied
            await control(svc, "rules", rules=[new], enabled={"nope": True})
        assert info.value.code == "invalid_args" and "'nope'" in info.value.message
        assert [r["name"] for r in await control(svc, "rules")] == ["burst-once"]
        rules = await control(svc, "rules", rules=[new])
        assert [r["name"] for r in rules] == ["renamed"]


class _Quiet:
    """A user rule that never acts."""

    def __init__(self, name: str = "quiet") -> None:
        self.name = name

    def evaluate(self, ctx: Any) -> list[Any]:
        return []


async def test_rules_command_runs_only_user_rules_the_config_names(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lab_rules", SimpleNamespace(Quiet=_Quiet))
    marker = tmp_path / "ran"
    cfg = feedback_config([{"name": "q", "use": "lab_rules:Quiet"}])
    async with Service(cfg) as svc:
        # any importable callable would run as the service's user: refused before import
        for use, params in (("subprocess:Popen", {"args": ["touch", str(marker)]}),
                            ("os:_exit", {"status": 3})):
            with pytest.raises(ControlError) as info:
                await control(svc, "rules", rules=[{"name": "x", "use": use, "params": params}])
            assert info.value.code == "invalid_args" and "lab_rules:Quiet" in info.value.message
        assert not marker.exists()
        rules = await control(svc, "rules", rules=[
            {"name": "q2", "use": "lab_rules:Quiet", "params": {"name": "q2"}}, BURST_RULE])
        assert [r["name"] for r in rules] == ["q2", "burst-once"]


# ------------------------------------------------------------------ external controller
def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_external_controller_enqueues_and_sees_its_events_run() -> None:
    """The control-channel path: subscribe, decide outside, enqueue, see the frames."""
    example = _load_example("mitosis_controller")
    cfg = feedback_config([])
    cfg.acquisition.sequence = dict(TWO_POSITIONS, time_plan={"interval": 0.0, "loops": 6})
    async with Service(cfg) as svc:
        pub, ctl_addr = svc.publisher.bound_address, svc.control.bound_address
        seen: list[dict[str, Any]] = []
        stop = threading.Event()
        ready = threading.Event()

        def external() -> None:
            ctrl = example.MitosisController(burst_frames=2)
            sent = False
            with Subscriber(pub, topics=("measurements",)) as sub, ControlClient(ctl_addr) as c:
                ready.set()
                while not stop.is_set():
                    msg = sub.recv(timeout_s=0.2)
                    if msg is None:
                        continue
                    header = dict(msg.header)
                    seen.append(header)
                    assert header["image_shape"] == [512, 512]
                    ctrl.on_measurements(header)  # features, reaction bookkeeping
                    if not sent and header["index"].get("p") == 0:
                        # a burst centred on this frame's first object, as the controller
                        # would send it for a mitosis
                        obj = header["objects"][0]
                        ctrl.sent += 1
                        ctrl.pending[ctrl.sent] = header["t"]["acquired"]
                        x = header["position"]["x_um"] + (obj["centroid_yx"][1] - 255.5) * 0.65
                        events = [{"index": {"p": 0, "ext": ctrl.sent}, "x_pos": x,
                                   "y_pos": header["position"]["y_um"]}] * 2
                        assert c.enqueue(events) == {"enqueued": 2, "started": False}
                        sent = True
            svc_reactions.extend(ctrl.reactions_ms)

        svc_reactions: list[float] = []
        worker = threading.Thread(target=external, daemon=True)
        worker.start()
        await asyncio.to_thread(ready.wait, 5.0)
        await asyncio.sleep(0.3)
        await control(svc, "start")
        deadline = time.monotonic() + 60
        while svc.acquiring or svc.pipeline.in_flight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.to_thread(worker.join, 5.0)
    ext = [h for h in seen if "ext" in h["index"]]
    assert len(ext) == 2, "the enqueued events never produced frames"
    assert len(seen) == 12 + 2
    assert len(svc_reactions) == 1 and svc_reactions[0] > 0


def test_example_controller_detects_a_condensing_nucleus() -> None:
    example = _load_example("mitosis_controller")
    ctrl = example.MitosisController(burst_frames=3)

    def header(frame_id: int, area: int, intensity: float) -> dict[str, Any]:
        others = [{"label": k + 2, "area_px": 250, "centroid_yx": [50.0 + 60 * k, 50.0],
                   "mean_intensity": 600.0} for k in range(6)]
        objs = [{"label": 1, "area_px": area, "centroid_yx": [300.0, 200.0],
                 "mean_intensity": intensity}, *others]
        return {"frame_id": frame_id, "index": {"t": frame_id, "p": 0},
                "position": {"x_um": 10.0, "y_um": 20.0, "z_um": 0.0},
                "t": {"acquired": float(frame_id)}, "pixel_size_um": 0.5,
                "summary": {"count": len(objs), "background_mean": 100.0}, "objects": objs}

    assert ctrl.on_measurements(header(0, 250, 600.0), (512, 512)) == []
    events = ctrl.on_measurements(header(1, 140, 100 + 500 * 1.8), (512, 512))
    assert len(events) == 3
    assert events[0]["x_pos"] == pytest.approx(10.0 + (200 - 255.5) * 0.5)
    assert events[0]["y_pos"] == pytest.approx(20.0 + (300 - 255.5) * 0.5)
    assert events[0]["index"] == {"t": 1, "p": 0, "ext": 1}
    # its own burst frames are not analysed for detection, and give the reaction time
    burst = header(2, 140, 1000.0)
    burst["index"] = events[0]["index"]
    burst["t"] = {"acquired": 1.25}
    assert ctrl.on_measurements(burst, (512, 512)) == []
    assert ctrl.reactions_ms == [pytest.approx(250.0)]


# ------------------------------------------------------------------ controller unit
class _Frame(SimpleNamespace):
    pass


def _message(frame_id: int, index: dict[str, int], acquired: float) -> dict[str, Any]:
    return {
        "frame_id": frame_id, "index": index, "t": {"acquired": acquired},
        "position": {"x_um": 0.0, "y_um": 0.0, "z_um": 0.0}, "pixel_size_um": 1.0,
        "summary": {"count": 1, "background_mean": 100.0},
        "objects": [{"label": 1, "area_px": 100, "centroid_yx": [10.0, 20.0],
                     "mean_intensity": 500.0}],
    }


@pytest.fixture
async def controller_parts() -> AsyncIterator[tuple[FeedbackController, list[Any], list[Any]]]:
    injected: list[list[useq.MDAEvent]] = []
    published: list[tuple[str, dict[str, Any]]] = []
    cfg = FeedbackConfig.model_validate({"rules": [
        {"name": "b", "when": {"objects": {"where": {"area_px": {"gt": 0}}}}, "max_fires": 1,
         "action": {"burst": {"frames": 2}}}]})
    ctl = FeedbackController(
        cfg, pixel_size_um=1.0, inject=lambda ev: injected.append(ev) or len(ev),
        publish=lambda kind, detail: published.append((kind, detail)),
        loop=asyncio.get_running_loop(),
    )
    ctl.acquisition_started()  # rules run while an acquisition runs
    yield ctl, injected, published


async def test_controller_reaction_from_first_frame_without_a_core(
    controller_parts: tuple[FeedbackController, list[Any], list[Any]],
) -> None:
    ctl, injected, published = controller_parts
    frame = _Frame(image=np.zeros((64, 64), np.uint16))
    ctl.on_measurements(frame, _message(0, {"t": 0, "p": 0}, 100.0))
    (events,) = injected
    assert [e.index["fb"] for e in events] == [1, 1]
    assert published == []  # published when the first event starts
    ctl.on_measurements(frame, _message(1, dict(events[0].index), 100.25))
    ((kind, detail),) = published
    assert kind == "feedback_action" and detail["reaction_from"] == "frameReady"
    assert detail["reaction_ms"] == pytest.approx(250.0)
    assert ctl.report()["reaction_ms"]["n"] == 1


async def test_controller_event_started_clock_and_unstarted_actions(
    controller_parts: tuple[FeedbackController, list[Any], list[Any]],
) -> None:
    ctl, injected, published = controller_parts
    frame = _Frame(image=np.zeros((64, 64), np.uint16))
    ctl.on_measurements(frame, _message(0, {"t": 0}, time.time()))
    (events,) = injected
    await asyncio.to_thread(ctl.on_event_started, events[1])  # not the first: ignored
    await asyncio.to_thread(ctl.on_event_started, useq.MDAEvent())  # not ours: ignored
    await asyncio.sleep(0.01)
    assert published == []
    await asyncio.to_thread(ctl.on_event_started, events[0])  # runner thread
    await asyncio.sleep(0.01)
    ((kind, detail),) = published
    assert detail["reaction_from"] == "eventStarted" and detail["reaction_ms"] >= 0
    # an action whose events never start is reported when the acquisition ends
    ctl.engine.slot("b").spec.max_fires = None
    ctl.on_measurements(frame, _message(1, {"t": 1}, time.time()))
    ctl.acquisition_finished()
    kind, detail = published[-1]
    assert kind == "feedback_action" and detail["started"] is False
    assert detail["reaction_ms"] is None


async def test_controller_refuses_when_injection_fails() -> None:
    published: list[tuple[str, dict[str, Any]]] = []

    def inject(events: list[useq.MDAEvent]) -> int:
        raise RuntimeError("no acquisition is running")

    cfg = FeedbackConfig.model_validate({"rules": [
        {"name": "b", "when": {"values": [{"path": "summary.count", "ge": 0}]},
         "action": {"channel": {"frames": 1}}}]})
    ctl = FeedbackController(cfg, pixel_size_um=1.0, inject=inject,
                             publish=lambda k, d: published.append((k, d)))
    ctl.acquisition_started()
    ctl.on_measurements(_Frame(image=np.zeros((8, 8))), _message(0, {"t": 0}, 1.0))
    ((kind, detail),) = published
    assert kind == "feedback_refused" and detail["limit"] == "not_acquiring"


async def test_a_rule_acting_in_a_channel_the_rig_lacks_fails_at_start_up() -> None:
    from livemask.errors import ConfigError

    rule = {**BURST_RULE, "action": {"channel": {"channel": "NOPE", "frames": 1}}}
    # (the rule named: before, only "feedback.rules: channel 'NOPE' ...")
    with pytest.raises(ConfigError,
                       match=r"feedback\.rules\[0\] \('burst-once'\): channel 'NOPE' is not a"):
        async with Service(feedback_config([rule])):
            pass


def test_replacing_the_rules_keeps_the_safety_ledgers() -> None:
    # before: replacing the rules reset the light-dose ledger, so a client could resend
    # the same rule under a new name and go past light_dose_budget_ms
    cfg = FeedbackConfig.model_validate({"rules": [BURST_RULE],
                                         "limits": {"light_dose_budget_ms": 150}})
    ctl = FeedbackController(cfg, pixel_size_um=0.65, inject=len, publish=lambda k, d: None)
    ctl.engine.guard.commit([useq.MDAEvent(exposure=10.0)] * 12, "p0")
    before = (ctl.engine.guard.dose_snapshot(), ctl.engine.guard.added_last_minute())
    ctl.set_rules([ctl.engine.slots[0].spec.model_copy(update={"name": "again"})])
    assert (ctl.engine.guard.dose_snapshot(), ctl.engine.guard.added_last_minute()) == before
    assert before[0] == {"p0": 120.0}


# ------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("name", ["smart-mitosis.yaml", "smart-grains.yaml"])
def test_shipped_feedback_configs_load_and_build(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.feedback.rules
    ctl = FeedbackController(cfg.feedback, pixel_size_um=0.65, inject=len,
                             publish=lambda k, d: None)
    assert [s.name for s in ctl.engine.slots] == [r.name for r in cfg.feedback.rules]


async def test_feedback_can_be_switched_off() -> None:
    async with Service(make_config(feedback={"enabled": False, "rules": [BURST_RULE]})) as svc:
        assert svc.feedback is None and svc.pipeline.on_measurements is None
        assert (await control(svc, "status"))["feedback"] is None
        with pytest.raises(ControlError) as info:
            await control(svc, "rules")
        assert info.value.code == "invalid_state"


# ------------------------------------------------------------------ shipped demos, short
def _shipped(name: str, **sequence: Any) -> Any:
    cfg = load_config(ROOT / "configs" / name)
    cfg.acquisition.autostart = False
    cfg.publish.pub_address = cfg.publish.control_address = "tcp://127.0.0.1:*"
    cfg.acquisition.sequence = {**cfg.acquisition.sequence, **sequence}
    return cfg


async def test_mitosis_demo_bursts_on_a_real_simulated_mitosis() -> None:
    from livemask.acquisition.simulated.world import get_world

    cfg = _shipped("smart-mitosis.yaml", time_plan={"interval": 0.0, "loops": 5})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
        world = get_world()
    steps = world.sample.params.mitosis_steps  # type: ignore[union-attr]
    log = world.sample.mitosis_log  # type: ignore[union-attr]
    (wh, ww), (fh, fw), px = world.sample.params.world_shape_px, (512, 512), 0.65
    actions = by_kind(got, "feedback_action")
    assert actions, "the mitosis rule never fired"
    meas = sorted((m.header for m in got["measurements"]), key=lambda h: h["frame_id"])
    on_mitosis = 0
    for a in actions:
        step = a["frame_id"] + 1  # one sample step per frame, the first frame is step 1
        # the target in world pixels (the simulated stage maps (0, 0) to the world centre)
        ty = a["position"]["y_um"] / px + wh / 2 - fh / 2 + a["target"]["centroid_y"]
        tx = a["position"]["x_um"] / px + ww / 2 - fw / 2 + a["target"]["centroid_x"]
        on_mitosis += any(
            r.start_step <= step < r.start_step + steps
            and np.hypot((r.y - ty + wh / 2) % wh - wh / 2, (r.x - tx + ww / 2) % ww - ww / 2) < 5
            for r in log
        )
        burst = [h["frame_id"] for h in meas if h["index"].get("fb") == a["action_id"]]
        later = [h["frame_id"] for h in meas if "fb" not in h["index"]
                 and h["index"]["p"] == a["index"]["p"] and h["frame_id"] > a["frame_id"]]
        assert len(burst) == 4 and (not later or max(burst) < min(later))
        assert a["reaction_from"] == "eventStarted"
    assert on_mitosis >= 1 and on_mitosis >= len(actions) - 1


async def test_grain_scan_stops_when_the_size_is_known_well_enough() -> None:
    async with Service(_shipped("smart-grains.yaml")) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    meas = sorted((m.header for m in got["measurements"]), key=lambda h: h["frame_id"])

    def rel_width(h: dict[str, Any]) -> float:
        ci = h["grains"]["cumulative"]["mean_equivalent_diameter_ci95_um"]
        return (ci[1] - ci[0]) / ((ci[1] + ci[0]) / 2) if ci else float("inf")

    (stop,) = by_kind(got, "feedback_action")
    assert stop["action"] == {"kind": "stop"} and stop["rule"] == "enough-grains"
    assert 2 <= len(meas) < 16  # stopped before the end of the 4x4 grid
    assert stop["frame_id"] == meas[-1]["frame_id"]  # no tile after the stopping one
    assert rel_width(meas[-1]) < 0.04 <= rel_width(meas[-2])
    (finished,) = by_kind(got, "acquisition_finished")
    assert finished["error"] is None


async def test_a_rig_without_pixel_size_measures_in_pixels_and_refuses_centring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real rig whose .cfg has no pixel-size preset used to measure, and centre the stage,
    with the simulator's 0.65 µm per pixel."""
    import livemask.service.app as app

    cfg_text = SIMULATED_CFG.read_text()
    rig = tmp_path / "uncalibrated.cfg"
    rig.write_text("\n".join(line for line in cfg_text.splitlines() if "PixelSize" not in line))
    monkeypatch.setattr(app, "uses_simulated_devices", lambda path: False)  # a "real" rig
    cfg = feedback_config([BURST_RULE])
    cfg.hardware.config_file = rig
    with caplog.at_level(logging.WARNING, logger="livemask"):
        async with Service(cfg) as svc:
            got = await collect_run(svc, ("measurements", "event"))
    assert "no pixel size" in caplog.text and "hardware.pixel_size_um" in caplog.text
    meas = got["measurements"][0].header
    assert meas["pixel_size_um"] == 1.0
    obj = meas["objects"][0]
    assert obj["area_um2"] == pytest.approx(obj["area_px"])
    (refused,) = by_kind(got, "feedback_refused")
    assert "pixel size is not calibrated" in refused["reason"]
    assert by_kind(got, "feedback_action") == []


# ------------------------------------------------------------------ settings, limits, runs
async def test_an_action_exposure_does_not_stay_on_for_the_planned_frames() -> None:
    """docs: "the planned events keep their own settings". Before: a rule's exposure_ms: 80
    stayed on the camera for every later event that gives no exposure of its own."""
    rule = {"name": "long", "max_fires": 1, "when": {"values": [{"path": "index.t", "eq": 1}]},
            "action": {"channel": {"frames": 1, "exposure_ms": 80.0}}}
    events = [{"index": {"t": 0, "p": 0}, "exposure": 10.0}]
    events += [{"index": {"t": t, "p": 0}} for t in range(1, 4)]  # keep the exposure
    async with Service(feedback_config([rule])) as svc:
        used: list[tuple[dict[str, int], float]] = []
        core = svc.source.core  # type: ignore[union-attr]
        core.mda.events.frameReady.connect(
            lambda img, ev, meta: used.append((dict(ev.index), meta["exposure_ms"])))
        _, published = await enqueue_and_watch(svc, events)
        status = await control(svc, "status")
    (action,) = [h for h in published if h["kind"] == "feedback_action"]
    fb = action["action_id"]
    assert used == [({"t": 0, "p": 0}, 10.0), ({"t": 1, "p": 0}, 10.0),
                    ({"t": 1, "p": 0, "fb": fb}, 80.0),
                    ({"t": 2, "p": 0}, 10.0), ({"t": 3, "p": 0}, 10.0)]
    assert action["restore"]["exposure"] == 10.0 and "action" in action["restore"]
    assert status["feedback"]["dose_ms"] == {"p0": 4 * 10.0 + 80.0}


async def test_a_plan_without_exposures_gets_the_cameras_own_back_after_an_action() -> None:
    """The bug hunt's case: a plan whose events set no exposure. The camera's exposure as
    the service knows it (as opened, of the last frame, or as last `set`) is put back."""
    rule = {"name": "long", "max_fires": 1, "when": {"values": [{"path": "index.t", "eq": 1}]},
            "action": {"channel": {"frames": 1, "exposure_ms": 80.0}}}
    events = [{"index": {"t": t, "p": 0}} for t in range(4)]
    async with Service(feedback_config([rule])) as svc:
        used: list[float] = []
        core = svc.source.core  # type: ignore[union-attr]
        await control(svc, "set", exposure_ms=12.0)  # the camera's own, set while idle
        core.mda.events.frameReady.connect(lambda img, ev, meta: used.append(meta["exposure_ms"]))
        _, published = await enqueue_and_watch(svc, events)
        status = await control(svc, "status")
    (action,) = [h for h in published if h["kind"] == "feedback_action"]
    assert used == [12.0, 12.0, 80.0, 12.0, 12.0]
    assert action["restore"]["exposure"] == 12.0
    assert status["feedback"]["dose_ms"] == {"p0": 4 * 12.0 + 80.0}


async def test_rules_stop_acting_when_the_acquisition_has_finished() -> None:
    """free-run: frames analysed after the run ended used to fire more `stop` actions,
    published as applied after acquisition_finished."""
    rule = {"name": "stop", "when": {"values": [{"path": "index.t", "ge": 3}]},
            "action": {"stop": True}}
    cfg = feedback_config([rule], mode="free-run")
    cfg.acquisition.sequence = {"time_plan": {"interval": 0.0, "loops": 300}}
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("event",))
        status = await control(svc, "status")
    kinds = [h["kind"] for m in got["event"] if (h := m.header)["kind"] in (
        "feedback_action", "feedback_refused", "acquisition_finished")]
    assert kinds == ["feedback_action", "acquisition_finished"]
    assert status["feedback"]["rules"][0]["actions"] == 1


async def test_a_burst_longer_than_the_action_duration_limit_is_a_config_error() -> None:
    from livemask.errors import ConfigError

    slow = {**BURST_RULE, "action": {"burst": {"frames": 2, "interval_s": 3600.0}}}
    with pytest.raises(ConfigError, match=r"max_action_duration_s"):
        feedback_config([slow])
    async with Service(feedback_config([BURST_RULE])) as svc:
        with pytest.raises(ControlError) as info:
            await control(svc, "rules", rules=[slow])
        assert info.value.code == "invalid_args"
        assert "burst.interval_s" in info.value.message
        assert "max_action_duration_s" in info.value.message
        revisit = {**BURST_RULE, "action": {"revisit": {"frames": 12, "interval_s": 60.0}}}
        with pytest.raises(ControlError, match=r"revisit\.interval_s"):
            await control(svc, "rules", rules=[revisit])
        assert [r["name"] for r in await control(svc, "rules")] == ["burst-once"]


async def test_a_rule_exposure_outside_the_camera_limits_is_refused_at_load() -> None:
    """enqueue refused exposure 30000 ms; a rule with it was accepted, published as carried
    out (the camera stayed at its exposure) and charged 30000 ms of light."""
    from livemask.errors import ConfigError

    rule = {**BURST_RULE, "action": {"channel": {"frames": 1, "exposure_ms": 30000.0}}}
    async with Service(feedback_config([BURST_RULE])) as svc:
        with pytest.raises(ControlError) as info:
            await control(svc, "rules", rules=[rule])
        assert info.value.code == "invalid_args"
        assert "exposure 30000 ms is outside" in info.value.message
    with pytest.raises(ConfigError,
                       match=r"feedback\.rules\[0\] \('burst-once'\): exposure 30000 ms is "):
        async with Service(feedback_config([rule])):
            pass


def test_a_rule_refused_on_every_frame_is_reported_at_1_10_100_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A spent light budget refused the rule on every frame: one log line and one event
    per frame for the rest of the run (about 5 GB of events in a week; long-run hunt)."""
    published: list[tuple[str, dict[str, Any]]] = []
    cfg = FeedbackConfig.model_validate({
        "rules": [{"name": "b", "when": {"values": [{"path": "summary.count", "ge": 0}]},
                   "action": {"burst": {"frames": 2, "centre": False}}}],
        "limits": {"light_dose_budget_ms": 1.0}})
    ctl = FeedbackController(cfg, pixel_size_um=1.0, inject=len,
                             publish=lambda kind, detail: published.append((kind, detail)))
    ctl.acquisition_started()
    frame = _Frame(image=np.zeros((64, 64), np.uint16))
    with caplog.at_level(logging.INFO, logger="livemask"):
        for t in range(250):
            ctl.on_measurements(frame, _message(t, {"t": t, "p": 0}, 1000.0 + t))
    refused = [d for kind, d in published if kind == "feedback_refused"]
    assert [d["repeats"] for d in refused] == [1, 10, 100]
    assert all(d["limit"] == "light_dose_budget_ms" for d in refused)
    assert caplog.text.count("feedback: refused") == 3
    assert ctl.report()["refused"] == 250  # every refusal still counted
    ctl.acquisition_started()  # a new acquisition reports its first refusal again
    ctl.on_measurements(frame, _message(0, {"t": 0, "p": 0}, 2000.0))
    assert [d["repeats"] for kind, d in published if kind == "feedback_refused"][-1] == 1


def test_a_refusal_after_the_rule_got_through_at_that_place_is_news_again() -> None:
    """Review: a rate limit refusing in minute 1 and again in minute 5 (the rule applied in
    between) counted as repeats 1 and 2, so the second was never reported."""
    from livemask.feedback.engine import Decision
    from livemask.feedback.safety import Violation

    published: list[tuple[str, dict[str, Any]]] = []
    ctl = FeedbackController(FeedbackConfig.model_validate({"rules": []}), pixel_size_um=1.0,
                             inject=len, publish=lambda k, d: published.append((k, d)))
    ctl.acquisition_started()

    def decision(rule: str, place: str, limit: str, message: str = "m") -> Decision:
        return Decision(action_id=0, rule=rule, action=None, frame_id=0, index={},
                        position={}, position_key=place, trigger_acquired=0.0,
                        violation=Violation(limit, message))

    for _ in range(3):
        ctl._refuse(decision("b", "p0", "max_added_frames_per_minute"))
    ctl._refuse(decision("b", "p1", "max_added_frames_per_minute"))  # another place: news
    ctl._refuse(decision("b", "p0", "not_applicable", "stage moved"))  # other causes: news
    ctl._refuse(decision("b", "p0", "not_applicable", "no such channel"))
    ctl._accepted_here(decision("b", "p0", "max_added_frames_per_minute"))
    ctl._refuse(decision("b", "p0", "max_added_frames_per_minute"))
    assert [d["repeats"] for _, d in published] == [1, 1, 1, 1, 1]
    assert ctl.refused == 7


async def test_a_user_rules_bad_actions_are_refused_on_the_rig_and_the_others_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user rule's channel the rig lacks and skip of a position the plan lacks were
    reported as carried out, SetMode('bogus') set the mode, and an exposure of -5 ms ended
    the frame's rule evaluation: the rule after it did not run."""
    from types import ModuleType

    from livemask.feedback import Burst, SetChannel, SetMode, SkipPosition

    class Bad:
        name = "bad"

        def evaluate(self, ctx: Any) -> list[Any]:
            return [SetChannel(channel="Bogus", frames=2),
                    SetChannel(exposure_ms=30000.0), SkipPosition(position=99),
                    SetMode("bogus"), Burst(frames=2, exposure_ms=-5)]  # type: ignore[arg-type]

    module = ModuleType("livemask_test_bad_rules")
    module.Bad = Bad  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "livemask_test_bad_rules", module)
    rules = [{"name": "bad", "use": "livemask_test_bad_rules:Bad", "max_fires": 1},
             {"name": "after", "when": {"values": [{"path": "summary.count", "ge": 0}]},
              "max_fires": 1, "action": {"channel": {"frames": 1}}}]
    async with Service(feedback_config(rules)) as svc:
        got = await collect_run(svc, ("measurements", "event"))
        assert svc.pipeline.mode == "synchronized"
        with pytest.raises(ValueError, match=r"mode 'bogus': give one of free-run"):
            await svc.apply_settings(mode="bogus")  # type: ignore[arg-type]
    refused = by_kind(got, "feedback_refused")
    assert [(r["rule"], r["limit"]) for r in refused] == [
        ("bad", "invalid_action"), ("bad", "invalid_action"), ("bad", "unknown_position"),
        ("bad", "invalid_action"), ("bad", "invalid_action")]
    assert "channel 'Bogus' is not a preset of group 'Channel'" in refused[0]["reason"]
    assert "exposure 30000 ms is outside" in refused[1]["reason"]
    assert "cannot skip position 99" in refused[2]["reason"]
    (done,) = by_kind(got, "feedback_action")
    assert done["rule"] == "after" and done["frame_id"] == refused[0]["frame_id"]
    assert len(got["measurements"]) == 8 + 1


async def test_a_second_burst_keeps_its_intervals() -> None:
    """Two targets of one frame (max_targets 2): the second burst runs after the first and
    its frames are still interval_s apart. Before, both bursts were timed from the decision,
    so the second one's times had passed and its frames came back to back (0.2-0.4 s apart
    for 0.5 s; controller hunt)."""
    rule = {**BURST_RULE, "max_targets": 2,
            "action": {"burst": {"frames": 3, "interval_s": 0.4, "centre": True}}}
    async with Service(feedback_config([rule], mode="synchronized")) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    actions = by_kind(got, "feedback_action")
    assert len(actions) == 2
    meas = [m.header for m in got["measurements"]]
    for action in actions:
        burst = sorted((h for h in meas if h["index"].get("fb") == action["action_id"]),
                       key=lambda h: h["frame_id"])
        acquired = [h["t"]["acquired"] for h in burst]
        assert len(acquired) == 3
        assert all(b - a >= 0.37 for a, b in itertools.pairwise(acquired)), acquired

"""Control fixes: arguments nested deeper than events can carry are refused, an event whose
field nests to the JSON encoder's limit is still published, a late ``set exposure_ms`` no
longer re-plans its stale exposure while a newer set is on its way, and ``rules`` errors no
longer repeat their prefix."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from livemask.client import AsyncSubscriber
from livemask.errors import ControlError
from livemask.protocol import MAX_NESTING, nesting_depth
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control


def _nested(levels: int) -> Any:
    """``levels`` objects, one inside the other: ``{"a": {"a": ... 1}}``."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def _event(sub: AsyncSubscriber, kind: str) -> dict[str, Any]:
    """The next event of ``kind``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = await sub.recv(timeout_s=0.2)
        if msg is not None and msg.topic == "event" and msg.header["kind"] == kind:
            return msg.header
    raise AssertionError(f"no {kind} event")


@pytest.mark.parametrize(("value", "depth"), [
    (1, 0), ("text", 0), ([], 1), ({"a": [1]}, 2), (({"a": ({},)},), 4), (_nested(5000), 5000),
])
def test_nesting_depth_counts_objects_and_arrays_without_recursion(value: Any,
                                                                   depth: int) -> None:
    assert nesting_depth(value, 10_000) == depth
    assert nesting_depth(value, 3) == min(depth, 3)


async def _raw_request(raw_socket: Any, svc: Service, request: str) -> dict[str, Any]:
    """The reply to ``request`` (JSON text: the client cannot encode 255 levels)."""
    import zmq

    sock = raw_socket(zmq.REQ, svc.control.bound_address)
    await sock.send(request.encode())
    assert await sock.poll(5000), "no reply"
    reply: dict[str, Any] = json.loads(await sock.recv())
    return reply


def _nested_text(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


async def test_arguments_nested_deeper_than_events_carry_are_refused_naming_them(
    raw_socket: Any,
) -> None:
    """A ``start`` whose sequence nested 254-493 levels deep answered ``internal``
    (pydantic's dump of it for acquisition_started gave up), one 252 deep got no
    acquisition_started at all; now anything deeper than MAX_NESTING is invalid_args, and a
    sequence at the limit starts, announced with its sequence."""
    async with Service(make_config(simulation={"truth": False})) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        sequence = '{"metadata": {"m": ' + _nested_text(300) + "}}"
        start = '{"id": 1, "cmd": "start", "args": {"sequence": ' + sequence + "}}"
        reply = await _raw_request(raw_socket, svc, start)
        assert reply["error"]["code"] == "invalid_args", reply  # before: internal
        assert reply["error"]["message"].startswith(
            f"start: args.sequence nests objects and arrays more than {MAX_NESTING} levels")
        with pytest.raises(ControlError, match=r"\] enqueue: args\.events nests") as info:
            await control(svc, "enqueue", events=[{"metadata": {"m": _nested(240)}}])
        assert info.value.code == "invalid_args"
        assert svc.pipeline.acquisition == 0
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        at_limit = {"metadata": {"m": _nested(MAX_NESTING - 2)},
                    "time_plan": {"interval": 0, "loops": 1}}
        await control(svc, "start", sequence=at_limit)
        started = await _event(sub, "acquisition_started")
    assert "not_encoded" not in started
    assert nesting_depth(started["sequence"], 10_000) == MAX_NESTING


async def test_an_event_whose_field_nests_to_the_encoders_limit_is_still_published() -> None:
    """orjson encodes 254 levels alone but not one level down in a header: the field was
    judged encodable, the retry failed too and the event was silently not sent."""
    async with Service(make_config(simulation={"truth": False})) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        svc._event("probe", {"deep": _nested(254), "n": 1})
        header = await _event(sub, "probe")
    assert header["deep"] is None and header["n"] == 1
    assert header["not_encoded"] == ["deep"]


def test_the_last_fallback_header_keeps_only_scalar_fields_and_t() -> None:
    """Where a header with the unencodable fields nulled still fails, only its scalar fields
    (and ``t``) are sent, every other field named in not_encoded: the event still goes out."""
    header = {"kind": "x", "t": {"sent": 1.0}, "a": {"b": 1}, "n": 2, "s": "ok",
              "not_encoded": ["gone"], "gone": None}
    out = Service._encodable(header, scalars_only=True)
    assert out == {"kind": "x", "t": {"sent": 1.0}, "a": None, "n": 2, "s": "ok",
                   "not_encoded": ["gone", "a"], "gone": None}


async def test_a_late_set_exposure_is_not_planned_while_a_newer_set_is_on_its_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """set 50 times out (the camera busy); set 60 plans 60 and waits its turn; 50 lands
    late. Its late() planned 50 again (only ``applied`` was checked: 60 had not landed yet),
    so frames were taken at 50 after set 60 (2 of 5 runs: before 60's reply, 50 announced
    late after it). Here 60's camera call is held while frames run."""
    import livemask.service.hardware_calls as hardware_calls

    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 0.3)
    seq = {"channels": [{"config": "DAPI", "exposure": 10.0}],
           "time_plan": {"interval": 0.05, "loops": 100000}}
    cfg = make_config(simulation={"truth": False}, acquisition={"sequence": seq,
                                                                "mode": "free-run"})
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        source = svc.source
        assert source is not None
        real_set = source.set_exposure
        gates = {50.0: threading.Event(), 60.0: threading.Event()}
        at_camera = threading.Event()

        def set_exposure(exposure_ms: float) -> None:
            if exposure_ms == 60.0:
                at_camera.set()
            gates[exposure_ms].wait(30)  # the camera busy in a long snap
            real_set(exposure_ms)

        monkeypatch.setattr(source, "set_exposure", set_exposure)
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        await control(svc, "start")
        try:
            with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
                await control(svc, "set", exposure_ms=50.0)
            monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 30.0)
            newer = asyncio.ensure_future(control(svc, "set", exposure_ms=60.0))
            await _until(lambda: svc.exposure.order.issued == 2, "set 60 was not issued")
            gates[50.0].set()  # 50 lands (late); 60 takes its turn at the camera
            assert await asyncio.to_thread(at_camera.wait, 10), "set 60 did not run"
            counters = svc.pipeline.counters
            seen = counters.snapshot()["frames_acquired"]
            await _until(lambda: counters.snapshot()["frames_acquired"] >= seen + 3,
                         "no frames while set 60 waits for the camera")
            assert source.core.getExposure() == 60.0  # before: 50, planned again
            gates[60.0].set()
            assert (await newer) == {"exposure_ms": 60.0}
            await control(svc, "set", mode="free-run")  # after the sets' announcements
            exposures = []
            while "mode" not in (changed := await _event(sub, "setting_changed")):
                exposures.append((changed["exposure_ms"], changed.get("late", False)))
        finally:
            for gate in gates.values():
                gate.set()
            await control(svc, "stop")
    assert exposures == [(60.0, False)]  # before: 50 (late) too


async def test_rules_errors_do_not_repeat_their_prefix() -> None:
    """Before: "rules: rules: List should have at most 100 items ...", "invalid rules[0]:
    rules[0]: Value error, ..." and "rules: rules[0] ('w'): zstack of 1001 frames ..."."""
    async with Service(make_config(simulation={"truth": False})) as svc:
        rule = {"name": "w", "when": {"values": [{"path": "summary.count", "ge": 0}]},
                "action": {"burst": {"frames": 2, "interval_s": 0.05}}}
        cases = [
            ([rule] * 101, "rules: args.rules: List should have at most 100 items"),
            ([{"name": "bad"}], "invalid rules[0]: rule 'bad': give either"),
            ([{"name": "b", "when": {}}], "invalid rules[0]: when: give"),
            ([{**rule, "action": {"zstack": {"range_um": 1000, "step_um": 1}}}],
             "rules[0] ('w'): zstack of 1001 frames"),
        ]
        for rules, start in cases:
            with pytest.raises(ControlError) as info:
                await control(svc, "rules", rules=rules)
            assert info.value.code == "invalid_args"
            assert str(info.value.message).startswith(start), info.value.message

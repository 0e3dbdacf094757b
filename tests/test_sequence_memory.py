"""useq's iteration memos stay bounded: long time-lapses and many starts keep no sequence.

useq (0.9) memoises every sequence it iterates, all its time points included, in
``functools.cache``s keyed by the sequence, for the life of the process. Before, each chunk of
a long time-lapse and each ``start`` added a sequence there: ~0.4 MB per 10,000 time points
that never came back (VmRSS 180 -> 307 MB after 300 starts).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
import useq
from useq import _iter_sequence as useq_iter

from livemask.acquisition.sequence import iter_events, release_iteration_caches
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_sequence import _dump
from tests.test_service import control

#: Entries useq's memo of the axes holds for one sequence (one per axis of its axis_order).
ONE_SEQUENCE = len(useq.MDASequence().axis_order)


def _memo() -> int:
    """Sequences' axes in useq's memo now."""
    return int(useq_iter._iter_axis.cache_info().currsize)


@pytest.fixture(autouse=True)
def _empty_memo() -> None:
    release_iteration_caches()  # (what other tests iterated)


def test_a_long_chunked_time_lapse_keeps_one_chunk_in_useqs_memo() -> None:
    seq = useq.MDASequence.model_validate(
        {"time_plan": {"interval": 0.1, "loops": 50}, "channels": ["DAPI", "GFP"]})
    sizes, events = [], []
    for event in iter_events(seq, chunk=10):  # 5 chunks
        sizes.append(_memo())
        events.append(event)
    assert max(sizes) <= ONE_SEQUENCE  # (was: one more sequence every chunk, 25 entries)
    assert _memo() == 0  # all taken: nothing kept
    assert _dump(events) == _dump(seq)  # the same events as useq's


@pytest.mark.parametrize("loops", [5, 50])  # not chunked, chunked
def test_a_stopped_iteration_leaves_nothing_in_useqs_memo(loops: int) -> None:
    seq = useq.MDASequence.model_validate({"time_plan": {"interval": 0, "loops": loops}})
    events = iter_events(seq, chunk=10)
    assert len(list(itertools.islice(events, 3))) == 3
    assert _memo() > 0
    events.close()  # (an acquisition stopped part way, its events dropped)
    assert _memo() == 0


def test_emptying_the_memo_while_a_sequence_is_iterated_changes_no_event() -> None:
    seq = useq.MDASequence.model_validate({
        "time_plan": {"interval": 0.5, "loops": 4},
        "stage_positions": [
            {"x": 0, "y": 0, "sequence": {"grid_plan": {"rows": 2, "columns": 2}}},
            {"x": 5, "y": 5},
        ],
        "channels": ["DAPI", "GFP"],
        "z_plan": {"range": 2, "step": 1},
    })
    expected = _dump(seq)
    got = []
    for event in iter(seq):  # useq's own iteration, its memo emptied at every event
        release_iteration_caches()
        got.append(event)
    assert _dump(got) == expected


def test_a_useq_without_these_memos_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    seq = useq.MDASequence.model_validate({"time_plan": {"interval": 0, "loops": 3}})
    useq_iter._iter_axis(seq, "t")
    monkeypatch.delattr(useq_iter, "_sizes")  # as a useq that memoises otherwise
    monkeypatch.setattr(useq_iter, "_used_axes", lambda seq: "t")  # (no cache_clear)
    release_iteration_caches()
    assert _memo() == 0  # (the memo that is there is emptied)


async def _until_idle(svc: Service) -> None:
    deadline = time.monotonic() + 20.0
    while svc.acquiring or svc.state != "idle":
        assert time.monotonic() < deadline, "the acquisition did not end"
        await asyncio.sleep(0.02)


async def test_starts_and_stops_keep_no_sequence_in_useqs_memo() -> None:
    """12 acquisitions: the config's, run to its end, and sequences given to ``start``
    (chunked or not) and the config's stopped part way."""
    cfg = make_config(acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 3}}})
    given: list[dict[str, Any] | None] = [
        None,
        {"time_plan": {"interval": 0.01, "loops": 5000}, "channels": ["DAPI"]},
        {"time_plan": {"interval": 0.01, "loops": 10**9}, "channels": ["DAPI"]},
    ]
    sizes = []
    async with Service(cfg) as svc:
        for i in range(12):
            if i % 4 == 0:
                await control(svc, "start")
            else:
                sequence = given[i % 4 - 1]
                await control(svc, "start", **({} if sequence is None else {"sequence": sequence}))
                await asyncio.sleep(0.05)
                await control(svc, "stop")
            await _until_idle(svc)
            sizes.append(_memo())
        assert svc.acquisitions_finished == 12
    assert max(sizes) == 0, sizes  # (was: one more sequence every start, 60 entries)

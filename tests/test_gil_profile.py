"""benchmarks/gil_profile.py: the summary of a py-spy --gil raw profile."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gil_profile.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gil_profile", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WORKER = "_worker (concurrent/futures/thread.py:81)"
RAW = "\n".join([
    f"thread (101): livemask-analyse_0;{_WORKER};measure_objects (livemask/analysis/measure.py:72)"
    ";_sum (numpy/_core/_methods.py:49) 6",
    f"thread (101): livemask-analyse_0;{_WORKER}"
    ";objects_from_sums (livemask/analysis/measure.py:200) 2",
    "thread (102): livemask-infer_0;run (livemask/inference/torch_backend.py:300)"
    ";synchronize (torch/cuda/streams.py:90) 1",
    "thread (100): MainThread;_run_once (asyncio/base_events.py:1900)"
    ";dumps_json (livemask/protocol.py:139) 3",
    "not a stack line",
])


def test_summary_shares_and_top_functions_per_thread() -> None:
    summary = _load().summarise(RAW, top=2)
    assert summary["samples"] == 12
    threads = summary["threads"]
    assert list(threads) == ["livemask-analyse", "MainThread", "livemask-infer"]  # by samples
    analyse = threads["livemask-analyse"]
    assert analyse["samples"] == 8 and analyse["share"] == round(8 / 12, 3)
    assert analyse["top"] == [["measure_objects > _sum", 6],
                              ["objects_from_sums > objects_from_sums", 2]]
    assert threads["livemask-infer"]["top"] == [["run > synchronize", 1]]

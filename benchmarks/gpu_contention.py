"""Where the GPU path's analysis loses time when inference runs beside it (one GPU).

In the service at 2048² the device analysis takes ≈ 17 ms alone (``gpu_check.py``) but
30+ ms with the inference stage in its own thread, and 18 ms with both stages in one thread
(``bench-gpu-2048-one.json``). This times the analysis' parts, each the median of
``--repeats`` synchronised calls, idle and with another thread running the model
(``Segmenter.infer`` back to back, or paced at ``--paced-fps``):

- ``graph``: the analysis' CUDA graph replay and its stream's synchronisation;
- ``rows_and_objects``: the objects' rows to the host and the measurement dicts;
- ``labels_pageable``: the int32 labels to the host as ``.cpu()`` does (pageable memory);
- ``labels_pinned``: the same through a reused pinned buffer, plus the copy out of it
  (the price of not handing the pinned buffer itself to the frame);
- ``analyse``: ``Segmenter.analyse`` as the pipeline calls it.

Also the CUDA kernels of one eager analysis (``torch.profiler``, top 15 by device time).
Writes one JSON record (``--json``) and prints it. ``--device cpu``: a dry run.

    python benchmarks/gpu_contention.py --size 2048 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpu_check import median_ms, write_record  # (benchmarks/ is on sys.path: the scripts' folder)


class _Inference:
    """A thread running the model on a frame, back to back or paced, until stopped."""

    def __init__(self, seg: Any, frame: np.ndarray, fps: float | None) -> None:
        self._seg, self._frame, self._period = seg, frame, (1.0 / fps if fps else 0.0)
        self._stop = threading.Event()
        self.calls = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self._seg.infer(self._frame)
            self.calls += 1
            if self._period:
                self._stop.wait(max(0.0, self._period - (time.perf_counter() - t)))

    def __enter__(self) -> _Inference:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--paced-fps", type=float, default=40.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run without a GPU")
    args = parser.parse_args()

    import torch

    from livemask.bench import BenchSettings, prerender
    from livemask.inference.models import load_model_card
    from livemask.inference.segmenter import DeviceProbabilities, Segmenter
    from livemask.inference.torch_analysis import TorchAnalysis, _objects
    from livemask.inference.torch_backend import TorchBackend
    from livemask.service.app import GPU_SWITCH_INTERVAL_S

    sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)  # as the service sets it on the GPU path
    on_gpu = args.device != "cpu"
    card = load_model_card("nuclei")
    backend = TorchBackend(device=args.device)
    backend.load(card)
    seg = Segmenter(card, backend, device_resident=True)
    frames = [r.image for r in prerender(BenchSettings(size=args.size, frames=2))]
    frame, other = frames[0], frames[-1]
    for _ in range(3):  # warm-up, graph capture
        seg.analyse(seg.infer(frame), frame, pixel_size_um=0.65)
    out = seg.infer(frame)
    assert isinstance(out, DeviceProbabilities)
    ta = seg._device
    assert ta is not None
    dev = ta.device
    params = seg._label_params()
    p = out.probabilities
    h, w = frame.shape
    key = (h, w, *params.key(ta.levels))
    level = ta._level(65535.0)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(dev)

    state: dict[str, Any] = {}

    def graph() -> None:
        with ta._on_stream():
            state["out"] = ta._run(("all", *key), ta._all_stages, [p[0], p[1], out.image, level],
                                   key)
            if ta._stream is not None:
                ta._stream.synchronize()

    graph()
    labels, head, rows = state["out"]
    labels = labels.clone()
    values = head.tolist()
    n, n_fg, total, fg_sum = int(values[3]), int(values[4]), values[5], values[6]

    def rows_and_objects() -> None:
        table = rows[1:n + 1].cpu().numpy()
        _objects(table[:, :7], table[:, 7:11].astype(np.int64), table[:, 11], shape=(h, w),
                 n_fg=n_fg, total=total, fg_sum=fg_sum, pixel_size_um=0.65, decimals=4,
                 saturated=table[:, 12].astype(np.int64))

    def labels_pageable() -> None:
        labels.cpu().numpy()

    pinned = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=on_gpu)

    def labels_pinned() -> None:
        pinned.copy_(labels, non_blocking=True)
        if on_gpu:
            torch.cuda.current_stream(dev).synchronize()
        np.array(pinned.numpy())

    def analyse() -> None:
        seg.analyse(out, frame, pixel_size_um=0.65)

    parts = [("graph", graph), ("rows_and_objects", rows_and_objects),
             ("labels_pageable", labels_pageable), ("labels_pinned", labels_pinned),
             ("analyse", analyse)]
    timings: dict[str, dict[str, float]] = {}
    for name, fn in parts:
        row = {"idle": median_ms(fn, sync if name != "analyse" else lambda: None,
                                  args.repeats)}
        for mode, fps in (("with_inference", None), ("with_paced_inference", args.paced_fps)):
            with _Inference(seg, other, fps) as bg:
                t = time.perf_counter()
                row[mode] = median_ms(fn, lambda: None, args.repeats)
                row[f"{mode}_calls_per_s"] = round(bg.calls / (time.perf_counter() - t), 1)
        timings[name] = row
        print(name, row, flush=True)

    # the kernels of one eager analysis (no graph: the profiler names each kernel)
    eager = TorchAnalysis(dev, graphs=False)
    for _ in range(2):
        eager.analyse(p[0], p[1], out.image, params, pixel_size_um=0.65, saturation=65535.0)
    sync()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        eager.analyse(p[0], p[1], out.image, params, pixel_size_um=0.65, saturation=65535.0)
        sync()
    table = "profile table failed"
    sorts = ("self_device_time_total", "self_cuda_time_total") if on_gpu else ()
    for sort in (*sorts, "self_cpu_time_total"):  # (the key's name changed across versions)
        try:
            table = f"sorted by {sort}\n" + prof.key_averages().table(sort_by=sort,
                                                                      row_limit=15)
            break
        except Exception as exc:
            table = f"profile table failed: {exc}"

    record = {
        "gpu": torch.cuda.get_device_name(dev) if on_gpu else "none (dry run on the CPU)",
        "torch": torch.__version__,
        "frame_px": args.size,
        "objects": n,
        "repeats": args.repeats,
        "paced_fps": args.paced_fps,
        "ms_median": timings,
        "eager_profile": table.splitlines(),
    }
    write_record(record, args.json)


if __name__ == "__main__":
    main()

"""Time the post-processing (labelling and measuring) on simulated frames of several sizes.

The shipped nuclei model turns a simulated camera frame into probabilities once per size
(cached under ``--cache``, so repeated runs and before/after comparisons see the very same
inputs); then ``labels_from_probabilities`` and ``measure_objects`` are timed ``--repeat``
times each and the median and minimum are printed:

    .venv/bin/python benchmarks/postprocess.py --sizes 512 2048 --repeat 15

Run it with ``PYTHONPATH=/path/to/other/src`` to time another version of the code on the
same inputs (the cache is keyed by size and seed only); equal ``labels sha1`` means equal
labels. Measured on the shared 2-core development machine (AMD EPYC, a training job
running, so medians are noisy), median ms, before → after the run-based rewrite:

    size   objects  labels_from_probabilities   measure_objects
    512²     133        5.5 → 4.3                  1.2 → 0.57
    2048²   1997       83   → 65                  31   → 11.6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import livemask
from livemask.analysis.instances import labels_from_probabilities
from livemask.analysis.measure import measure_objects


def frame(size: int, seed: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, probabilities) of one simulated frame of ``size``², cached on disk."""
    path = cache / f"postprocess-{size}-seed{seed}.npz"
    if path.is_file():
        data = np.load(path)
        return data["image"], data["probabilities"]
    from livemask.acquisition.simulated.nuclei import NucleiSample
    from livemask.offline import load_segmenter

    sample = NucleiSample(seed=seed)
    for _ in range(40):  # let the population grow and divide a little
        sample.step()
    image = sample.render((0.0, 0.0), (size, size)).image
    segmenter = load_segmenter("nuclei", threads=2)
    probabilities = segmenter.predict(image).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, image=image, probabilities=probabilities)
    return image, probabilities


def timed(fn: Any, repeat: int) -> tuple[list[float], Any]:
    """Milliseconds of ``repeat`` calls of ``fn`` (after one warm-up call), and its result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    print(f"livemask from {Path(livemask.__file__).parent}")
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    rows = []
    for size in args.sizes:
        image, prob = frame(size, args.seed, args.cache)
        t_lab, labels = timed(lambda p=prob: labels_from_probabilities(p[0], p[1]), args.repeat)
        t_mea, (objects, _) = timed(
            lambda lb=labels, im=image: measure_objects(lb, im), args.repeat
        )
        row = {
            "size": size,
            "objects": len(objects),
            "labels_ms_median": round(statistics.median(t_lab), 2),
            "labels_ms_min": round(min(t_lab), 2),
            "measure_ms_median": round(statistics.median(t_mea), 2),
            "measure_ms_min": round(min(t_mea), 2),
            "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest()[:12],
        }
        rows.append(row)
        print(
            f"{size:>5}²  {row['objects']:>5} objects  "
            f"labels_from_probabilities {row['labels_ms_median']:7.2f} ms (min "
            f"{row['labels_ms_min']:.2f})  measure_objects {row['measure_ms_median']:7.2f} ms "
            f"(min {row['measure_ms_min']:.2f})  labels sha1 {row['labels_sha1']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

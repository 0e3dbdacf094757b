"""Score a segmenter against simulator ground truth (object F1 at IoU 0.5 and timing)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from livemask.acquisition.simulated.nuclei import NucleiSample, random_field
from livemask.analysis.metrics import MatchResult, aggregate, match_instances
from livemask.inference.segmenter import Segmenter


@dataclass(frozen=True)
class Evaluation:
    """Aggregated accuracy and per-image timing of one hold-out set."""

    name: str
    images: int
    score: MatchResult
    predict_ms: float
    postprocess_ms: float

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain numbers for model cards and JSON."""
        s = self.score
        return {
            "holdout": self.name,
            "images": self.images,
            "f1_iou50": round(s.f1, 4),
            "precision_iou50": round(s.precision, 4),
            "recall_iou50": round(s.recall, 4),
            "mean_matched_iou": round(s.mean_matched_iou, 4),
            "objects": s.n_true,
            "predict_ms": round(self.predict_ms, 1),
            "postprocess_ms": round(self.postprocess_ms, 1),
        }


def live_holdout(n: int, seed: int = 1234) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Frames of the default time-lapse sample (as `make run` shows it), 512×512."""
    sample = NucleiSample(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for _ in range(5):
            sample.step()
        origin = (float(rng.uniform(0, 2048)), float(rng.uniform(0, 2048)))
        r = sample.render(origin, (512, 512), exposure_ms=10.0)
        yield r.image, r.labels


def varied_holdout(n: int, seed: int = 4321) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Widely varied random fields (sizes, densities, noise, blur), 256×256."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_field(rng, (256, 256))


def evaluate(
    segmenter: Segmenter, pairs: Iterator[tuple[np.ndarray, np.ndarray]], name: str
) -> Evaluation:
    """Segment every image, match against its truth, time both halves."""
    results = []
    t_pred = t_post = 0.0
    count = 0
    for image, truth in pairs:
        t0 = time.perf_counter()
        probs = segmenter.predict(image)
        t1 = time.perf_counter()
        labels = segmenter.labels(probs)
        t2 = time.perf_counter()
        t_pred += t1 - t0
        t_post += t2 - t1
        results.append(match_instances(truth, labels))
        count += 1
    return Evaluation(name, count, aggregate(results), 1e3 * t_pred / max(count, 1),
                      1e3 * t_post / max(count, 1))

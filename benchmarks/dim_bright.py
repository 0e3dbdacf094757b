"""Dim and bright nuclei in one field: a model's F1@0.5 when a random share of the nuclei is
made dimmer (the *Limitations* table of the ``nuclei`` card and docs/performance.md).

Fields: ``NucleiSample(seed=300 + i)`` of the default time-lapse sample after 5 steps; in
field ``i`` the nuclei with ``default_rng(i).random(n) < share`` get their ``brightness``
divided by the case's ratio; then ``render`` of 512² at (300 i mod 2048, 517 i mod 2048).
F1 from ``match_instances`` against the rendered labels; the recall of the dimmed nuclei
alone; their median pixel above the background (the median unlabelled pixel) in counts; and
the median normalised pixel (the card's normalisation) of the dimmed and of the other nuclei.

    .venv/bin/python benchmarks/dim_bright.py [--model nuclei] [--fields 20] [CASE ...]

CASE: ``RATIOxSHARE@EXPOSURE_MS``, e.g. ``10x0.5@10``: half of the nuclei 10 times dimmer, at
10 ms (``1x0.5@10``: none dimmer, the baseline and the recall of that half). Defaults:
the cases the docs cite (about a minute with 20 fields on two cores). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, NamedTuple

import numpy as np

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.metrics import MatchResult, aggregate, match_instances
from livemask.analysis.normalize import percentile_normalize
from livemask.inference.models import ModelCard
from livemask.inference.segmenter import Segmenter
from livemask.offline import load_segmenter

SIZE = (512, 512)
DEFAULT_CASES = ["1x0.5@10", "3x0.5@10", "10x0.5@10", "10x1@10", "20x1@10",
                 "1x0.5@3", "10x0.5@3"]
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_CASE = re.compile(rf"^(?P<ratio>{_NUMBER})x(?P<share>{_NUMBER})@(?P<ms>{_NUMBER})$")


class Case(NamedTuple):
    """A share of the nuclei ``ratio`` times dimmer, imaged at ``exposure_ms``."""

    ratio: float
    share: float
    exposure_ms: float

    @classmethod
    def parse(cls, text: str) -> Case:
        """``RATIOxSHARE@EXPOSURE_MS`` (``10x0.5@10``); ValueError naming the form."""
        found = _CASE.match(text.strip())
        if found is None:
            raise ValueError(f"case {text!r}: write RATIOxSHARE@EXPOSURE_MS, e.g. 10x0.5@10")
        case = cls(float(found["ratio"]), float(found["share"]), float(found["ms"]))
        if not (case.ratio >= 1.0 and 0.0 < case.share <= 1.0 and case.exposure_ms > 0.0):
            raise ValueError(f"case {text!r}: RATIO must be >= 1, SHARE in (0, 1] and "
                             "EXPOSURE_MS > 0")
        return case


def field(i: int, case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, truth labels and the truth labels of the dimmed nuclei of field ``i``."""
    sample = NucleiSample(seed=300 + i)
    for _ in range(5):
        sample.step()
    nuclei = sample.nuclei
    dim = np.random.default_rng(i).random(len(nuclei)) < case.share
    nuclei.brightness[dim] /= case.ratio
    origin = (float(i * 300 % 2048), float(i * 517 % 2048))
    result = sample.render(origin, SIZE, exposure_ms=case.exposure_ms)
    return result.image, result.labels, nuclei.ids[dim] + 1


def normalised(card: ModelCard, image: np.ndarray) -> np.ndarray:
    """``image`` normalised as the card says (what the model sees)."""
    norm = card.normalization
    return percentile_normalize(image, norm.low, norm.high, min_span_noise=norm.min_span_noise,
                                clip=norm.clip_range or False,
                                exclude_saturated=norm.exclude_saturated)


def score(segmenter: Segmenter, case: Case, fields: int) -> dict[str, Any]:
    """F1 and counts over ``fields`` fields, the dimmed nuclei's recall and levels."""
    every: list[MatchResult] = []
    dimmed: list[MatchResult] = []
    above, dim_level, other_level = [], [], []
    for i in range(fields):
        image, truth, dim_ids = field(i, case)
        labels = segmenter.segment(image)
        every.append(match_instances(truth, labels))
        is_dim = np.isin(truth, dim_ids) & (truth > 0)
        dimmed.append(match_instances(np.where(is_dim, truth, 0), labels))
        values = normalised(segmenter.card, image)
        background = float(np.median(image[truth == 0]))
        if is_dim.any():
            above.append(float(np.median(image[is_dim])) - background)
            dim_level.append(float(np.median(values[is_dim])))
        others = (truth > 0) & ~is_dim
        if others.any():
            other_level.append(float(np.median(values[others])))
    total, dim_total = aggregate(every), aggregate(dimmed)
    return {
        "f1": total.f1, "tp": total.tp, "fp": total.fp, "fn": total.fn,
        "dim_true": dim_total.tp + dim_total.fn,
        "dim_recall": dim_total.tp / max(dim_total.tp + dim_total.fn, 1),
        "dim_above_background": _median(above), "dim_normalised": _median(dim_level),
        "others_normalised": _median(other_level),
    }


def _median(values: list[float]) -> float | None:
    """The median of the per-field values, None without any."""
    return float(np.median(values)) if values else None


def _cell(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` places, a dash for None."""
    return "–" if value is None else f"{value:.{digits}f}"


def row(case: Case, r: dict[str, Any]) -> str:
    """One Markdown table row of :func:`score`'s result."""
    return (f"| {case.exposure_ms:g} | 1:{case.ratio:g} | {case.share:g} | {r['f1']:.3f} | "
            f"{r['tp']} / {r['fp']} / {r['fn']} | {r['dim_recall']:.3f} ({r['dim_true']}) | "
            f"{_cell(r['dim_above_background'], 1)} | {_cell(r['dim_normalised'], 3)} / "
            f"{_cell(r['others_normalised'], 3)} |")


HEADER = ("| ms | dim:bright | share dimmed | F1@0.5 | tp / fp / fn | recall of the dimmed "
          "(nuclei) | dimmed: median pixel above background | median normalised: dimmed / "
          "others |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES,
                        help="RATIOxSHARE@EXPOSURE_MS, e.g. 10x0.5@10 (default: the docs')")
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--fields", type=int, default=20, help="fields per case (default 20)")
    args = parser.parse_args(argv)
    if args.fields < 1:
        parser.error("--fields must be at least 1")
    try:
        cases = [Case.parse(text) for text in args.cases]
    except ValueError as exc:
        parser.error(str(exc))
    segmenter = load_segmenter(args.model)
    print(f"{args.model}, {args.fields} field(s) of {SIZE[0]}x{SIZE[1]} per case")
    print(HEADER)
    for case in cases:
        print(row(case, score(segmenter, case, args.fields)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

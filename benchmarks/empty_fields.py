"""Nuclei found in empty, sparse and dim fields, with and without the noise floor.

Percentile normalisation stretches a frame's 1st..99.8th percentile to 0..1. In a field with
(almost) no nuclei that range is camera noise, and a model finds nuclei in it. The shipped
``nuclei`` card sets ``normalization.min_span_noise``: the stretched span is at least that
many times the frame's noise. This script renders simulated 512² fields (seed 5) at several
densities and exposures, segments them with the card as shipped and with the floor off, and
prints the object F1, false and missed nuclei per case as JSON:

    .venv/bin/python benchmarks/empty_fields.py [--model nuclei] [--fields 8] [--floor 25]

``--floor N`` adds a run with ``min_span_noise: N`` (to try a floor on a card without one).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from livemask.acquisition.simulated.nuclei import NucleiParams, NucleiSample
from livemask.analysis.metrics import aggregate, match_instances
from livemask.analysis.normalize import noise_sigma
from livemask.inference.models import load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend

#: (name, nuclei per megapixel or None for the simulator's default, exposure in ms)
CASES = [
    ("empty", 1e-9, 10.0), ("empty", 1e-9, 3.0),
    ("sparse", 3.0, 10.0), ("sparse", 3.0, 3.0),
    ("dense", None, 10.0), ("dense", None, 1.0), ("dense", None, 0.3),
]


def score(segmenter: Segmenter, density: float | None, exposure_ms: float,
          fields: int) -> dict[str, Any]:
    """Object F1 and counts over ``fields`` simulated fields of one case."""
    params = NucleiParams() if density is None else NucleiParams(density_per_mpx=density)
    sample = NucleiSample(params, seed=5)
    results, spans = [], []
    for k in range(fields):
        render = sample.render((k * 300.0, k * 100.0), (512, 512), exposure_ms=exposure_ms)
        results.append(match_instances(render.labels, segmenter.segment(render.image)))
        strided = render.image[::4, ::4]  # the sample percentile_normalize takes at 512²
        lo, hi = np.percentile(strided, (1.0, 99.8))
        spans.append((hi - lo) / noise_sigma(strided))
    total = aggregate(results)
    return {"f1": round(total.f1, 4), "true": total.tp + total.fn,
            "found": total.tp + total.fp, "false": total.fp, "missed": total.fn,
            # the 1st..99.8th percentile span in noise levels (the floor acts below 25)
            "span_noise_min": round(float(min(spans)), 1),
            "span_noise_max": round(float(max(spans)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--floor", type=float, default=None,
                        help="also run with this min_span_noise")
    args = parser.parse_args()
    card = load_model_card(args.model)
    backend = load_backend("onnxruntime", card, threads=2)
    off = card.model_copy(update={
        "normalization": card.normalization.model_copy(update={"min_span_noise": None})})
    runs = {"shipped": Segmenter(card, backend), "floor off": Segmenter(off, backend)}
    if args.floor is not None:
        floor = card.model_copy(update={"normalization": card.normalization.model_copy(
            update={"min_span_noise": args.floor})})
        runs[f"floor {args.floor:g}"] = Segmenter(floor, backend)
    rows = []
    for name, density, exposure in CASES:
        row: dict[str, Any] = {"case": name, "exposure_ms": exposure}
        for label, segmenter in runs.items():
            row[label] = score(segmenter, density, exposure, args.fields)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"model": card.name, "min_span_noise": card.normalization.min_span_noise,
                      "fields_per_case": args.fields, "rows": rows}))


if __name__ == "__main__":
    main()

"""From model output to instance labels, per-object measurements and accuracy metrics.

Pure numpy / scipy / scikit-image: no I/O, no sockets, no microscope.
"""

from __future__ import annotations

from livemask.analysis.instances import labels_from_mask, labels_from_probabilities
from livemask.analysis.measure import UNITS, measure_objects
from livemask.analysis.metrics import (
    MatchResult,
    aggregate,
    f1_over_thresholds,
    match_instances,
)
from livemask.analysis.normalize import percentile_normalize

__all__ = [
    "UNITS",
    "MatchResult",
    "aggregate",
    "f1_over_thresholds",
    "labels_from_mask",
    "labels_from_probabilities",
    "match_instances",
    "measure_objects",
    "percentile_normalize",
]

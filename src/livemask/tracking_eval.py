"""Score the online tracker against the nuclei simulator's ground-truth tracks.

A simulated time-lapse (the default nuclei sample, one step per frame, 512x512 fields at one
or more stage positions) is segmented frame by frame, by a model or by the truth labels
themselves ("perfect segmentation", which isolates tracking errors), measured and tracked
exactly as the service does (:class:`~livemask.analysis.tracking.PositionTrackers`).
Predicted objects are matched one-to-one to true nuclei per frame at IoU >= 0.5
(:func:`match_ids`). The truth is a nucleus' persistent id; a division ends the mother and
starts two daughters with new ids
(:attr:`NucleiSample.parent_of <livemask.acquisition.simulated.nuclei.NucleiSample>`), the
convention the tracker follows too.

Figures:

- link accuracy: of the true frame-to-frame links (one nucleus in frames k-1 and k) whose both
  ends were matched, the fraction with the same ``track_id`` at both ends;
- false-link rate: of the predicted links (a track's consecutive observations, across gaps
  too) whose both ends were matched, the fraction joining two different nuclei;
- division recall: of the true divisions whose mother was matched in the 3 frames before and
  a daughter in the 3 frames from the division on, the fraction for which a predicted division
  event within +-2 frames has a parent track that was matched to the mother and a child track
  that was matched to a daughter; division precision: the fraction of predicted events that
  are such a match of some true division;
- fragmentation: mean number of distinct track ids over the matched observations of a nucleus
  (1.0 = never broken);
- ms per frame of the tracker (``PositionTrackers.apply`` on the measurement dicts).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.measure import measure_objects
from livemask.analysis.metrics import matched_pairs
from livemask.analysis.tracking import PositionTrackers, TrackerParams

__all__ = [
    "SimFrame",
    "SimRun",
    "TrackingEvaluation",
    "evaluate_tracking",
    "match_ids",
    "score_tracking",
    "simulate",
]

FIELD = (512, 512)
#: field origins (world row, col) of up to 4 non-overlapping positions in the 2048 px world
ORIGINS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 1024.0), (1024.0, 0.0),
                                            (1024.0, 1024.0))
DIVISION_WINDOW = 2  # frames either side of the true division


def match_ids(truth: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict[int, int]:
    """Predicted label -> truth label, one-to-one, for pairs with IoU >= ``iou``: the
    matching of :func:`livemask.analysis.metrics.match_instances` (most matches, then the
    largest summed IoU), so at IoU exactly 0.5 a truth that ties with two predictions (a
    nucleus split into equal halves) gets only one of them. Labels may be any integer dtype
    (0 = background, no negative labels)."""
    return {p: t for t, p in matched_pairs(truth, pred, iou_threshold=iou)}


@dataclass
class TrackingEvaluation:
    """Counts and timings of one tracking evaluation run."""

    segmentation: str
    frames: int
    positions: int
    objects: int = 0  # predicted objects, all frames
    matched: int = 0  # of them matched to a nucleus
    true_objects: int = 0
    true_links: int = 0
    correct_links: int = 0
    pred_links: int = 0
    false_links: int = 0
    true_divisions: int = 0
    detected_divisions: int = 0
    pred_divisions: int = 0
    correct_pred_divisions: int = 0
    fragmentation: float = 0.0
    track_ms: list[float] = field(default_factory=list)
    segment_ms: list[float] = field(default_factory=list)

    @staticmethod
    def _ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (None where undefined)."""

        def r(x: float | None, nd: int = 4) -> float | None:
            return None if x is None else round(x, nd)

        ms = np.asarray(self.track_ms) if self.track_ms else np.zeros(1)
        seg = np.asarray(self.segment_ms) if self.segment_ms else np.zeros(1)
        return {
            "segmentation": self.segmentation,
            "frames": self.frames,
            "positions": self.positions,
            "objects_per_frame": r(self.objects / max(self.frames * self.positions, 1), 1),
            "matched_fraction": r(self._ratio(self.matched, self.objects)),
            "object_recall": r(self._ratio(self.matched, self.true_objects)),
            "true_links": self.true_links,
            "link_accuracy": r(self._ratio(self.correct_links, self.true_links)),
            "pred_links": self.pred_links,
            "false_link_rate": r(self._ratio(self.false_links, self.pred_links)),
            "true_divisions": self.true_divisions,
            "division_recall": r(self._ratio(self.detected_divisions, self.true_divisions)),
            "pred_divisions": self.pred_divisions,
            "division_precision": r(
                self._ratio(self.correct_pred_divisions, self.pred_divisions)
            ),
            "fragmentation": r(self.fragmentation, 3),
            "track_ms_median": r(float(np.median(ms)), 3),
            "track_ms_p95": r(float(np.percentile(ms, 95)), 3),
            "segment_ms_mean": r(float(seg.mean()), 1),
        }


@dataclass
class SimFrame:
    """One segmented, measured frame of a simulated time-lapse, with its truth."""

    t: int
    p: int
    objects: list[dict[str, Any]]  # measure_objects output
    truth_of: dict[int, int]  # predicted label -> nucleus id (IoU >= 0.5)
    present: set[int]  # nucleus ids in the field
    segment_ms: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # measure_objects' frame summary


@dataclass
class SimRun:
    """A simulated, segmented time-lapse, ready to be tracked (more than once)."""

    segmentation: str
    frames: int
    positions: int
    records: list[SimFrame]
    parent_of: dict[int, int]  # daughter nucleus id -> mother id
    division_at: dict[int, int]  # daughter nucleus id -> first frame it exists


@dataclass
class _Obs:
    """Everything recorded at one position."""

    # per frame: {track_id: nucleus id or -1}
    frames: list[dict[int, int]] = field(default_factory=list)
    # predicted division events: (frame, parent track, children)
    events: list[tuple[int, int, list[int]]] = field(default_factory=list)


def simulate(
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    frames: int = 150,
    positions: int = 1,
    seed: int = 7,
    name: str | None = None,
    render: bool = True,
) -> SimRun:
    """Render, segment and measure a time-lapse of the default nuclei sample.

    ``segment`` maps a camera image to instance labels (e.g. ``Segmenter.segment``); None
    uses the truth labels as the segmentation. Both render the same time-lapse for a seed
    (camera noise draws from the sample's random stream). ``render=False`` (truth labels
    only) skips the camera image: faster, but a different time-lapse than a model run's.
    """
    if not 1 <= positions <= len(ORIGINS):
        raise ValueError(f"positions must be 1..{len(ORIGINS)}, got {positions}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    sample = NucleiSample(seed=seed)
    records: list[SimFrame] = []
    division_at: dict[int, int] = {}
    for k in range(frames):
        sample.step()
        for daughter in sample.new_daughters:
            division_at[daughter] = k
        for pos in range(positions):
            origin = ORIGINS[pos]
            seg_ms = None
            if render or segment is not None:
                rendered = sample.render(origin, FIELD, exposure_ms=10.0)
                image, truth = rendered.image, rendered.labels
            else:
                image, truth = sample.render_truth(origin, FIELD)
            if segment is None:
                labels = truth
            else:
                t0 = time.perf_counter()
                labels = segment(image)
                seg_ms = 1e3 * (time.perf_counter() - t0)
            objects, summary = measure_objects(labels, image)
            present = np.unique(truth)
            records.append(SimFrame(
                k, pos, objects,
                {a: b - 1 for a, b in match_ids(truth, labels).items()},
                {int(v) - 1 for v in present[present > 0].tolist()},
                seg_ms,
                summary,
            ))
    return SimRun(name or ("truth labels" if segment is None else "model"), frames, positions,
                  records, dict(sample.parent_of), division_at)


def score_tracking(run: SimRun, params: TrackerParams | None = None) -> TrackingEvaluation:
    """Track a simulated run as the service does and score it against the truth."""
    trackers = PositionTrackers(params)
    result = TrackingEvaluation(run.segmentation, run.frames, run.positions)
    obs = [_Obs() for _ in range(run.positions)]
    for rec in run.records:
        objects = [dict(o) for o in rec.objects]
        summary = dict(rec.summary)
        t0 = time.perf_counter()
        trackers.apply(objects, summary, index={"t": rec.t, "p": rec.p})
        result.track_ms.append(1e3 * (time.perf_counter() - t0))
        if rec.segment_ms is not None:
            result.segment_ms.append(rec.segment_ms)
        o = obs[rec.p]
        o.frames.append({obj["track_id"]: rec.truth_of.get(obj["label"], -1) for obj in objects})
        o.events.extend((rec.t, d["parent"], d["children"]) for d in summary["divisions"])
        result.objects += len(objects)
        result.matched += len(rec.truth_of)
        result.true_objects += len(rec.present)
    _score(result, obs, run.parent_of, run.division_at)
    return result


def evaluate_tracking(
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    frames: int = 150,
    positions: int = 1,
    seed: int = 7,
    params: TrackerParams | None = None,
    name: str | None = None,
) -> TrackingEvaluation:
    """Simulate, segment, track and score (:func:`simulate` then :func:`score_tracking`)."""
    run = simulate(segment, frames=frames, positions=positions, seed=seed, name=name)
    return score_tracking(run, params)


def _score(
    result: TrackingEvaluation,
    obs: list[_Obs],
    parent_of: dict[int, int],
    division_at: dict[int, int],
) -> None:
    children_of: dict[int, list[int]] = defaultdict(list)
    for d, m in parent_of.items():
        children_of[m].append(d)
    tracks_per_nucleus: list[int] = []
    for o in obs:
        # nucleus -> track per frame, and every track a nucleus was ever matched to
        by_truth = [{tid: tr for tr, tid in f.items() if tid >= 0} for f in o.frames]
        tracks_of: dict[int, set[int]] = defaultdict(set)
        matched_frames: dict[int, list[int]] = defaultdict(list)
        for k, f in enumerate(by_truth):
            for nid, tr in f.items():
                tracks_of[nid].add(tr)
                matched_frames[nid].append(k)
        tracks_per_nucleus.extend(len(v) for v in tracks_of.values())
        # true links: one nucleus matched in consecutive frames
        for k in range(1, len(by_truth)):
            prev, cur = by_truth[k - 1], by_truth[k]
            for nid, tr in cur.items():
                if nid in prev:
                    result.true_links += 1
                    result.correct_links += int(prev[nid] == tr)
        # predicted links: consecutive observations of a track, both ends matched
        last: dict[int, int] = {}
        for f in o.frames:
            for tr, nid in f.items():
                before = last.get(tr)
                if before is not None and before >= 0 and nid >= 0:
                    result.pred_links += 1
                    result.false_links += int(before != nid)
                last[tr] = nid
        # divisions
        true_divs = []
        for mother, daughters in children_of.items():
            k_div = division_at[daughters[0]]
            if k_div >= len(o.frames):
                continue
            mother_seen = any(k_div - 3 <= k < k_div for k in matched_frames.get(mother, []))
            daughter_seen = any(
                k_div <= k < k_div + 3 for d in daughters for k in matched_frames.get(d, [])
            )
            child_tracks = set().union(*(tracks_of.get(d, set()) for d in daughters))
            true_divs.append((k_div, tracks_of.get(mother, set()), child_tracks,
                              mother_seen and daughter_seen))

        def hit(event: tuple[int, int, list[int]], div: tuple[int, set[int], set[int], bool]) -> (
            bool
        ):
            k, parent, children = event
            return (
                abs(k - div[0]) <= DIVISION_WINDOW
                and parent in div[1]
                and bool(div[2].intersection(children))
            )

        for div in true_divs:
            if div[3]:
                result.true_divisions += 1
                result.detected_divisions += int(any(hit(e, div) for e in o.events))
        result.pred_divisions += len(o.events)
        result.correct_pred_divisions += sum(
            any(hit(e, div) for div in true_divs) for e in o.events
        )
    result.fragmentation = float(np.mean(tracks_per_nucleus)) if tracks_per_nucleus else 0.0


def format_rows(results: list[TrackingEvaluation]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted rows for a table of results."""

    def pct(x: float | None, nd: int = 1) -> str:
        return "-" if x is None else f"{x:.{nd}%}"

    cols = ["segmentation", "frames x pos", "objects/frame", "precision", "recall", "link acc.",
            "false links", "div. recall", "div. precision", "fragment.", "ms track (median)",
            "ms segment"]
    rows = []
    for res in results:
        d = res.as_dict()
        rows.append([
            d["segmentation"], f"{d['frames']} x {d['positions']}",
            f"{d['objects_per_frame']:.0f}", pct(d["matched_fraction"]), pct(d["object_recall"]),
            pct(d["link_accuracy"], 2), pct(d["false_link_rate"], 2),
            f"{pct(d['division_recall'])} of {d['true_divisions']}",
            f"{pct(d['division_precision'])} of {d['pred_divisions']}",
            f"{d['fragmentation']:.3f}", f"{d['track_ms_median']:.2f}",
            f"{d['segment_ms_mean']:.0f}" if res.segment_ms else "-",
        ])
    return cols, rows

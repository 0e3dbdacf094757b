"""Train the random-forest baselines (``nuclei_rf``, ``grains_rf``) on simulator fields.

Needs the ``train`` extra (scikit-learn, skl2onnx); running the result needs only ONNX Runtime.
Every field is percentile-normalised like the Segmenter does, described by
:func:`~livemask.inference.random_forest.pixel_features`, and labelled per pixel:

- ``nuclei``: fields from :func:`~livemask.acquisition.simulated.nuclei.random_field`; 0
  background, 1 nucleus rim, 2 nucleus core (the seed channel of
  :func:`~livemask.training.targets.targets_from_labels`);
- ``grains``: fields from :func:`~livemask.acquisition.simulated.grains.random_grain_field`;
  0 grain interior, 1 grain boundary (:func:`~livemask.training.targets.boundary_targets`,
  2 px wide, the grains network's target).

Classes are sampled balanced per field. The ONNX file and card are ``{task}_rf.onnx/.yaml``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from livemask.acquisition.simulated.grains import random_grain_field
from livemask.acquisition.simulated.nuclei import random_field
from livemask.analysis.normalize import percentile_normalize
from livemask.errors import ModelError
from livemask.evaluation import write_card, write_card_metrics
from livemask.inference.models import Normalization
from livemask.inference.random_forest import DEFAULT_SCALES, feature_names, pixel_features
from livemask.training.output import check_output_folder, shipped_settings, staged_output
from livemask.training.targets import SEED_FRACTION, boundary_targets, targets_from_labels

log = logging.getLogger("livemask")

#: Class index → meaning, as written to the card (nuclei).
CLASSES = ("background", "rim", "core")
#: Class index → meaning for grains.
GRAIN_CLASSES = ("interior", "boundary")
#: Width (px) of the boundary class of the grains forest (as the grains network's target).
BOUNDARY_WIDTH_PX = 2
#: Boundary-probability threshold of the shipped ``grains_rf`` card (chosen on tuning fields,
#: not on the hold-outs: see grains_rf.md).
GRAINS_THRESHOLD = 0.35
TASKS = ("nuclei", "grains")
#: Per task, the training settings of the shipped model (``train_random_forest`` defaults).
DEFAULTS: dict[str, dict[str, int]] = {
    "nuclei": {
        "fields": 80,
        "pixels_per_field": 4000,
        "trees": 12,
        "depth": 16,
        "min_samples_leaf": 5,
    },
    "grains": {
        "fields": 80,
        "pixels_per_field": 6000,
        "trees": 12,
        "depth": 16,
        "min_samples_leaf": 20,
    },
}
#: Simulator field size used for training.
FIELD_SHAPE = (256, 256)


def pixel_classes(labels: np.ndarray) -> np.ndarray:
    """Per-pixel class (uint8): 0 background, 1 rim (foreground minus core), 2 core (seed)."""
    targets = targets_from_labels(labels, SEED_FRACTION)
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[targets[0] > 0] = 1
    classes[targets[1] > 0] = 2
    return classes


def grain_pixel_classes(labels: np.ndarray) -> np.ndarray:
    """Per-pixel class (uint8): 0 grain interior, 1 grain boundary (2 px wide)."""
    return (boundary_targets(labels, BOUNDARY_WIDTH_PX)[0] > 0).astype(np.uint8)


def _task_data(
    task: str,
) -> tuple[
    Callable[[np.random.Generator, tuple[int, int]], tuple[np.ndarray, np.ndarray]],
    Callable[[np.ndarray], np.ndarray],
    tuple[str, ...],
]:
    """Field generator, per-pixel class function and class names of ``task``."""
    if task == "nuclei":
        return random_field, pixel_classes, CLASSES
    if task == "grains":
        return random_grain_field, grain_pixel_classes, GRAIN_CLASSES
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def training_pixels(
    fields: int,
    pixels_per_field: int,
    *,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    seed: int = 0,
    task: str = "nuclei",
) -> tuple[np.ndarray, np.ndarray]:
    """Features (M, F) float32 and classes (M,) int64, balanced across classes per field."""
    make_field, classes_of, names = _task_data(task)
    rng = np.random.default_rng(seed)
    norm = Normalization()
    per_class = max(1, pixels_per_field // len(names))
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for _ in range(fields):
        image, labels = make_field(rng, FIELD_SHAPE)
        x = percentile_normalize(image, norm.low, norm.high)
        features = pixel_features(x, scales)
        classes = classes_of(labels).ravel()
        for c in range(len(names)):
            idx = np.flatnonzero(classes == c)
            if idx.size == 0:
                continue
            take = rng.choice(idx, size=min(per_class, idx.size), replace=False)
            xs.append(features[take])
            ys.append(np.full(take.size, c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def train_random_forest(
    out_dir: Path,
    *,
    task: str = "nuclei",
    fields: int | None = None,
    pixels_per_field: int | None = None,
    trees: int | None = None,
    depth: int | None = None,
    seed: int = 0,
    min_samples_leaf: int | None = None,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    evaluate: bool = False,
    n_jobs: int = 2,
    force: bool = False,
) -> Path:
    """Train, export ``{task}_rf.onnx`` and write its card ``{task}_rf.yaml``; return the card.

    Settings left at ``None`` take the task's :data:`DEFAULTS`, which reproduce the shipped
    model: for nuclei (about 20 s on 2 cores) 12 trees of depth 16 keep the ONNX file under
    4 MB and inference near 100 ms per 512×512 frame on 2 cores; for grains (about 30 s) the
    same forest on 80 fields × 6000 pixels with at least 20 samples per leaf (about 4 MB).

    With ``evaluate``, also score the model on the task's simulator hold-outs (20 live frames,
    60 varied fields) and record the figures in the card's ``metrics``.

    The card's version, normalisation and post-processing are the shipped ``{task}_rf``
    card's. The files are written to a temporary folder in ``out_dir`` and moved into place
    at the end (an interrupted run leaves ``out_dir`` as it was); ``out_dir`` may be the
    shipped models folder only with ``force``.
    """
    require_train_extra()
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    _, _, class_names = _task_data(task)
    name = f"{task}_rf"
    shipped = shipped_settings(name)
    method = "boundary-label" if task == "grains" else "seeded-watershed"
    if shipped["postprocessing"]["method"] != method:  # before the training, not after
        raise ModelError(f"the shipped {name}.yaml has postprocessing.method "
                         f"{shipped['postprocessing']['method']}; the forest needs {method}")
    d = DEFAULTS[task]
    fields = d["fields"] if fields is None else fields
    pixels_per_field = d["pixels_per_field"] if pixels_per_field is None else pixels_per_field
    trees = d["trees"] if trees is None else trees
    depth = d["depth"] if depth is None else depth
    if min_samples_leaf is None:
        min_samples_leaf = d["min_samples_leaf"]
    out_dir = check_output_folder(Path(out_dir), force=force)
    t0 = time.perf_counter()
    x, y = training_pixels(fields, pixels_per_field, scales=scales, seed=seed, task=task)
    clf = RandomForestClassifier(
        n_estimators=trees,
        max_depth=depth,
        min_samples_leaf=min_samples_leaf,
        n_jobs=n_jobs,
        random_state=seed,
    )
    clf.fit(x, y)
    minutes = (time.perf_counter() - t0) / 60
    names = feature_names(scales)
    onx = to_onnx(
        clf,
        initial_types=[("features", FloatTensorType([None, len(names)]))],
        options={id(clf): {"zipmap": False}},
    )
    onnx_bytes = compact_tree_ensemble(onx).SerializeToString()
    parameters: dict[str, Any] = {
        "scales": [float(s) for s in scales],
        "features": names,
        "classes": list(class_names),
    }
    training: dict[str, Any] = {}
    if task == "grains":
        parameters["boundary_classes"] = [1]
        outputs = ["boundary"]
        data = "livemask.acquisition.simulated.grains.random_grain_field"
        training["boundary_width_px"] = BOUNDARY_WIDTH_PX
    else:
        parameters["foreground_classes"] = [1, 2]
        parameters["seed_classes"] = [2]
        outputs = ["foreground", "seeds"]
        data = "livemask.acquisition.simulated.nuclei.random_field"
        training["seed_fraction"] = SEED_FRACTION
    card: dict[str, Any] = {
        "name": name,
        "version": shipped["version"],
        "task": task,
        "runtime": "random-forest",
        "file": f"{name}.onnx",
        "architecture": f"random forest, {trees} trees, max depth {depth}, "
        f"{len(names)} multi-scale filter features, {len(class_names)} pixel classes "
        "(scikit-learn → skl2onnx)",
        "input_name": "features",
        "output_name": "probabilities",
        "outputs": outputs,
        "size_multiple": 1,
        "normalization": shipped["normalization"],
        "parameters": parameters,
        "postprocessing": shipped["postprocessing"],
        "training": {
            "data": f"{data}, {FIELD_SHAPE[0]}x{FIELD_SHAPE[1]}",
            "fields": fields,
            "pixels_per_field": pixels_per_field,
            "samples": int(y.size),
            "class_counts": np.bincount(y, minlength=len(class_names)).tolist(),
            "trees": trees,
            "max_depth": depth,
            "min_samples_leaf": min_samples_leaf,
            "seed": seed,
            **training,
            "minutes": round(minutes, 2),
            "onnx_bytes": len(onnx_bytes),
        },
        "metrics": {},
    }
    with staged_output(out_dir) as stage:
        (stage / f"{name}.onnx").write_bytes(onnx_bytes)
        write_card(stage / f"{name}.yaml", card)
        if evaluate:
            write_card_metrics(stage / f"{name}.yaml")
    card_path = out_dir / f"{name}.yaml"
    log.info("wrote %s (%d bytes) and %s", out_dir / f"{name}.onnx", len(onnx_bytes),
             card_path)
    return card_path


def require_train_extra() -> None:
    """ImportError saying to install the train extra when scikit-learn or skl2onnx is missing."""
    try:
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{exc}; install the train extra: pip install 'livemask[train]' "
                          "(in a checkout: pip install -e '.[train]')") from None


def compact_tree_ensemble(model: Any) -> Any:
    """Shrink a skl2onnx tree ensemble in place without changing its outputs.

    Drops the optional ``nodes_hitrates`` and all-false ``nodes_missing_value_tracks_true``
    attributes and the zero leaf weights (the class weights are a sparse list: a leaf without
    an entry for a class adds nothing to it). Returns ``model``.
    """
    from onnx import helper

    for node in model.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        drop = {"nodes_hitrates"}
        tracks = attrs.get("nodes_missing_value_tracks_true")
        if tracks is not None and not any(tracks.ints):
            drop.add("nodes_missing_value_tracks_true")
        prefix = "class_" if "class_weights" in attrs else "target_"
        weights = attrs.get(prefix + "weights")
        replaced = {}
        if weights is not None:
            w = np.asarray(weights.floats, dtype=np.float32)
            keep = np.flatnonzero(w != 0)
            for key in ("nodeids", "treeids", "ids"):
                values = np.asarray(attrs[prefix + key].ints, dtype=np.int64)[keep]
                replaced[prefix + key] = helper.make_attribute(prefix + key, values.tolist())
            replaced[prefix + "weights"] = helper.make_attribute(
                prefix + "weights", w[keep].tolist()
            )
        new = [replaced.get(a.name, a) for a in node.attribute if a.name not in drop]
        del node.attribute[:]
        node.attribute.extend(new)
    return model

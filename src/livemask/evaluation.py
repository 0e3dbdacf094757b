"""Score segmenters against ground truth: simulator hold-outs or the user's annotated images.

Object metrics follow the usual instance-segmentation convention (as in StarDist/Cellpose
papers): predicted and true objects are matched one-to-one on IoU; F1, precision and recall
at IoU 0.5, and F1 averaged over IoU thresholds 0.5, 0.55, ..., 0.9.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from livemask.acquisition.simulated.nuclei import NucleiSample, random_field
from livemask.analysis.metrics import MatchResult, aggregate, match_instances
from livemask.inference.segmenter import Segmenter, without_non_finite
from livemask.offline import check_image, is_zarr, read_image, read_image_file, zarr_not_read

log = logging.getLogger("livemask")

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
#: Image file extensions (matched case-insensitively; ``x.ome.tif`` has the stem ``x``).
IMAGE_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Mask file extensions: lossless formats only (a JPEG blurs the labels).
MASK_EXTENSIONS = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".png")
#: What may follow an image's stem in its mask's name ("" only when masks are elsewhere).
MASK_SUFFIXES = ("", "_mask", "_masks", "_labels", "_label", "_seg")

#: Grain masks: 0-valued lines up to this wide (px) are grain boundaries, filled from the
#: nearest grain before scoring; wider 0 areas (pores, a substrate) are left as drawn.
BOUNDARY_LINE_MAX_PX = 4

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class Evaluation:
    """Aggregated accuracy and per-image timing of one model on one image set."""

    holdout: str
    model: str
    images: int = 0
    by_iou: dict[float, MatchResult] = field(default_factory=dict)
    count_errors: list[float] = field(default_factory=list)
    # grains: Δ mean area of the inside grains / truth (signed; the error is its |.|)
    area_biases: list[float] = field(default_factory=list)
    # grains: Δ planimetric mean area 1/N_A / truth (signed), images with a predicted grain
    planimetric_biases: list[float] = field(default_factory=list)
    astm_errors: list[float] = field(default_factory=list)  # grains: |Δ G planimetric|
    g_undefined: int = 0  # grains: images with true grains and no predicted one (G undefined)
    diameters_true: list[np.ndarray] = field(default_factory=list)
    diameters_pred: list[np.ndarray] = field(default_factory=list)
    predict_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def score(self) -> MatchResult:
        """The micro-averaged match at IoU 0.5."""
        return self.by_iou[0.5]

    @property
    def mean_f1(self) -> float:
        """F1 averaged over IoU 0.5–0.9."""
        return float(np.mean([r.f1 for r in self.by_iou.values()]))

    @property
    def count_error(self) -> float:
        """Mean relative error of the object count per image."""
        return float(np.mean(self.count_errors)) if self.count_errors else 0.0

    @property
    def area_errors(self) -> list[float]:
        """|Δ mean area of the inside grains| / truth, per image."""
        return [abs(b) for b in self.area_biases]

    def grain_dict(self) -> dict[str, Any]:
        """Grain-size errors (empty unless grains were evaluated).

        ``mean_area_error`` / ``mean_area_bias``: mean over images of |Δ| and Δ of the mean
        area of the grains inside the field (edge-cut grains excluded) relative to the truth's;
        ``planimetric_area_error`` / ``planimetric_area_bias``: the same for the ASTM E112
        planimetric mean area 1/N_A; ``astm_g_error``: mean |ΔG| (planimetric). Images where
        no grain was predicted (N_A = 0: G and 1/N_A undefined) are counted in
        ``g_undefined`` and left out of the planimetric means (None when all were).
        """
        if not self.area_biases:
            return {}
        from scipy.stats import ks_2samp

        true_d = np.concatenate(self.diameters_true)
        pred_d = np.concatenate(self.diameters_pred)
        ks = float(ks_2samp(true_d, pred_d).statistic) if true_d.size and pred_d.size else 1.0
        return {
            "mean_area_error": _mean(self.area_errors, 4),
            "mean_area_bias": _mean(self.area_biases, 4),
            "planimetric_area_error": _mean([abs(b) for b in self.planimetric_biases], 4),
            "planimetric_area_bias": _mean(self.planimetric_biases, 4),
            "astm_g_error": _mean(self.astm_errors, 3),
            "g_undefined": self.g_undefined,
            "diameter_ks": round(ks, 4),
            "mean_diameter_true_px": round(float(true_d.mean()), 2) if true_d.size else None,
            "mean_diameter_pred_px": round(float(pred_d.mean()), 2) if pred_d.size else None,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for model cards and JSON."""
        s = self.score
        return {**self._object_dict(s), **self.grain_dict()}

    def _object_dict(self, s: MatchResult) -> dict[str, Any]:
        return {
            "holdout": self.holdout,
            "model": self.model,
            "images": self.images,
            "f1_iou50": round(s.f1, 4),
            "precision_iou50": round(s.precision, 4),
            "recall_iou50": round(s.recall, 4),
            "f1_mean_iou50_90": round(self.mean_f1, 4),
            "mean_matched_iou": round(s.mean_matched_iou, 4),
            "count_error": round(self.count_error, 4),
            "objects": s.n_true,
            "predict_ms": round(self.predict_ms, 1),
            "postprocess_ms": round(self.postprocess_ms, 1),
        }


def _mean(values: list[float], decimals: int) -> float | None:
    """Rounded mean, None for no values."""
    return round(float(np.mean(values)), decimals) if values else None


def live_holdout(n: int, seed: int = 1234) -> Iterator[Pair]:
    """Frames of the default time-lapse sample (as `make run` shows it), 512x512."""
    sample = NucleiSample(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for _ in range(5):
            sample.step()
        origin = (float(rng.uniform(0, 2048)), float(rng.uniform(0, 2048)))
        r = sample.render(origin, (512, 512), exposure_ms=10.0)
        yield r.image, r.labels


def varied_holdout(n: int, seed: int = 4321) -> Iterator[Pair]:
    """Widely varied random fields (sizes, densities, noise, blur), 256x256."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_field(rng, (256, 256))


def grain_live_holdout(n: int, seed: int = 2468) -> Iterator[Pair]:
    """Tiles of the default polished-section sample (as the grains config scans it), 512x512."""
    from livemask.acquisition.simulated.grains import GrainSample

    sample = GrainSample(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        origin = (float(rng.uniform(0, 2048)), float(rng.uniform(0, 2048)))
        r = sample.render(origin, (512, 512), exposure_ms=10.0)
        yield r.image, r.labels


def grain_varied_holdout(n: int, seed: int = 8642) -> Iterator[Pair]:
    """Widely varied random grain fields, 256x256."""
    from livemask.acquisition.simulated.grains import random_grain_field

    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_grain_field(rng, (256, 256))


def _grain_errors(result: Evaluation, truth: np.ndarray, labels: np.ndarray) -> None:
    from livemask.analysis.grains import grain_statistics, grain_table

    t_stats, p_stats = grain_statistics(truth, 1.0), grain_statistics(labels, 1.0)
    t_area, p_area = t_stats["mean_area_um2"], p_stats["mean_area_um2"]
    if t_area:
        result.area_biases.append(((p_area or 0.0) - t_area) / t_area)
    t_g, p_g = t_stats["astm_g_planimetric"], p_stats["astm_g_planimetric"]
    if t_g is not None and p_g is None:  # no predicted grain: G = -inf, not a number to average
        result.g_undefined += 1
    elif t_g is not None and p_g is not None:
        result.astm_errors.append(abs(p_g - t_g))
        t_pa, p_pa = t_stats["mean_area_planimetric_um2"], p_stats["mean_area_planimetric_um2"]
        result.planimetric_biases.append((p_pa - t_pa) / t_pa)
    for stats_labels, store in ((truth, result.diameters_true), (labels, result.diameters_pred)):
        table = grain_table(stats_labels, 1.0)
        store.append(table.equivalent_diameter_um[table.inside])


def fill_boundary_lines(
    truth: np.ndarray, max_width_px: float = BOUNDARY_LINE_MAX_PX
) -> np.ndarray:
    """A grain mask with its thin 0-valued boundary lines given to the nearest grain.

    Annotations often draw grain boundaries as 0-valued lines; the grain models predict a
    full tessellation (every pixel to its nearest grain, ``labels_from_boundaries``), so
    the truth is completed the same way before it is compared. Only 0 pixels in lines up to
    ``max_width_px`` wide are filled: 0 areas that hold a disc wider than that (pores, the
    substrate around particles) keep their pixels, so no grain grows into them; but a 0
    area left that small (at most π·w² pixels: where lines meet, or a diagonal line, holds
    such a disc) is filled too. A pore's corners, which no such disc covers, go to the grain
    around it.
    """
    zeros = truth == 0
    if not zeros.any() or zeros.all():
        return truth
    radius = max_width_px / 2
    to_grain, index = ndimage.distance_transform_edt(zeros, return_indices=True)
    core = to_grain > radius  # centres of discs of 0s wider than a line
    wide = ndimage.distance_transform_edt(~core) <= radius if core.any() else core
    if wide.any():  # a junction or a diagonal stretch of line is no pore
        blobs, n = ndimage.label(wide)
        small = np.bincount(blobs.ravel(), minlength=n + 1) <= np.pi * max_width_px ** 2
        small[0] = False
        wide &= ~small[blobs]
    thin = zeros & ~wide
    return np.where(thin, truth[tuple(index)], truth)


def _warn_boundary_network(labels: np.ndarray, path: Path) -> None:
    """Warn when one of the largest objects of a mask is a thin network spanning the image:
    grain boundaries drawn with a non-zero value, which makes them all one object."""
    ids, sizes = np.unique(labels[labels != 0], return_counts=True)
    for i in ids[np.argsort(sizes)[-3:]]:
        obj = labels == i
        rows, cols = np.flatnonzero(obj.any(axis=1)), np.flatnonzero(obj.any(axis=0))
        spans = (rows[-1] - rows[0] + 1 >= 0.9 * obj.shape[0]
                 and cols[-1] - cols[0] + 1 >= 0.9 * obj.shape[1])
        if spans and ndimage.distance_transform_edt(obj).max() <= BOUNDARY_LINE_MAX_PX / 2:
            log.warning(
                "mask %s: object %d is a thin network across the image (%d px): are grain "
                "boundaries drawn with a non-zero value? They are scored as one object; draw "
                "boundaries as 0 (or give a full tessellation)", path, i, int(obj.sum()))


def _as_instances(mask: np.ndarray, path: Path) -> np.ndarray:
    """The instance labels of a mask file: integer labels >= 0, or a binary mask split into
    connected components; ValueError naming the file for anything else."""
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        raise ValueError(f"mask {path} is RGB; give an integer instance label image")
    if mask.ndim != 2:
        raise ValueError(f"mask {path} has shape {mask.shape}; give one 2-D label image")
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise ValueError(f"mask {path} has fractional values (e.g. probabilities); give "
                             "integer instance labels (0 = background)")
    elif mask.dtype.kind not in "uib":
        raise ValueError(f"mask {path} has dtype {mask.dtype}; give integer instance labels")
    if mask.size and mask.min() < 0:
        raise ValueError(f"mask {path} has negative labels; give labels >= 0 (0 = background)")
    values = np.unique(mask)
    objects = values[values != 0]
    if objects.size == 0:
        log.warning("mask %s holds no objects (every pixel is 0): whatever is found in its "
                    "image counts as false positives", path)
        return mask.astype(np.int32)
    if objects.size == 1:  # a binary mask (0 and one value): its connected components
        log.warning("mask %s is binary; using its connected components as instances", path)
        labelled, _ = ndimage.label(mask > 0)
        return labelled.astype(np.int32)
    if values[0] != 0:
        log.warning("mask %s has no background (0) pixels: every pixel is in one of its %d "
                    "objects", path, objects.size)
    if values[-1] > np.iinfo(np.int32).max:  # ids that int32 cannot hold: renumber them
        _, inverse = np.unique(mask, return_inverse=True)
        return (inverse.reshape(mask.shape) + (values[0] != 0)).astype(np.int32)
    return mask.astype(np.int32)


def _split_name(path: Path) -> tuple[str, str] | None:
    """(stem, lower-case extension) of an image file name, or None for other files."""
    if _hidden(path):
        return None
    lower = path.name.lower()
    ext = next((e for e in IMAGE_SUFFIXES if lower.endswith(e)), None)
    if ext is None or len(path.name) == len(ext):
        return None
    return path.name[: -len(ext)], ext


def _hidden(path: Path) -> bool:
    """A hidden file (name starting with "."): macOS's ``._name.tif`` AppleDouble files,
    ``.DS_Store``, temporary files. Never an image or a mask."""
    return path.name.startswith(".")


def _single_plane(data: np.ndarray) -> np.ndarray:
    """``data`` without leading axes of length 1: a (1, H, W) or (1, 1, H, W) file is one
    plane (y, x)."""
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    return data


def _warn_zarr(folder: Path) -> None:
    """Warn about OME-Zarr stores in ``folder``: evaluate reads image files only, so they
    are skipped (a folder would otherwise be left out without a word)."""
    stores = sorted(p.name for p in folder.iterdir() if not _hidden(p) and is_zarr(p))
    if stores:
        log.warning("%d OME-Zarr store(s) in %s skipped (%s): each is %s", len(stores),
                    folder, ", ".join(stores[:5]) + (", ..." if len(stores) > 5 else ""),
                    zarr_not_read())


def folder_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Pair every image in ``images`` with its mask in ``masks`` (same stem, common suffixes;
    names and extensions compared case-insensitively).

    When both are one folder (Cellpose's ``x.tif`` + ``x_mask.tif``), files named like masks
    are not images, and a mask needs one of the suffixes: a file is never its own mask.

    Two images that pair with one mask (``a.tif`` and ``a.ome.tif`` or ``a.png``) are an
    error naming both: scoring both would count that annotation twice, and which file the
    mask was drawn on (the other may be an export at another bit depth or scale) is not
    for a guess to decide; the scientist moves the other file out of the folder.
    """
    if not images.is_dir() or not masks.is_dir():
        raise FileNotFoundError(f"--images {images} and --masks {masks} must both be folders")
    same = images.resolve() == masks.resolve()
    suffixes = tuple(s for s in MASK_SUFFIXES if s) if same else MASK_SUFFIXES
    mask_files = {p.name.lower(): p for p in masks.iterdir() if p.is_file() and not _hidden(p)}
    for folder in (images,) if same else (images, masks):
        _warn_zarr(folder)
    found = []
    image_of: dict[Path, Path] = {}  # mask -> the image it pairs with
    named_like_masks = 0
    for img in sorted(p for p in images.iterdir() if p.is_file()):
        split = _split_name(img)
        if split is None:
            continue
        stem, _ = split
        if same and any(s and stem.lower().endswith(s) for s in MASK_SUFFIXES):
            named_like_masks += 1  # a mask in the images folder (or an image named so)
            continue
        candidates = (
            mask_files.get(f"{stem}{suf}{ext}".lower())
            for suf in suffixes
            for ext in MASK_EXTENSIONS
        )
        match = next(
            (m for m in candidates if m is not None and m.resolve() != img.resolve()), None
        )
        if match is None:
            lossy = [f"{stem}{suf}{ext}" for suf in suffixes for ext in (".jpg", ".jpeg")
                     if f"{stem}{suf}{ext}".lower() in mask_files]
            why = (f" ({lossy[0]} is a JPEG, which blurs labels: save masks as TIFF or PNG)"
                   if lossy else "")
            log.warning("no mask for %s in %s%s; skipped", img.name, masks, why)
            continue
        if (other := image_of.get(match)) is not None:
            raise ValueError(
                f"images {other.name} and {img.name} in {images} both pair with the mask "
                f"{match}, which would be scored twice; move the one it was not drawn on "
                "out of the folder")
        image_of[match] = img
        found.append((img, match))
    if same and named_like_masks:
        log.info("%d file(s) in %s named like masks (%s) were taken as masks, not images",
                 named_like_masks, images, ", ".join(s for s in MASK_SUFFIXES if s))
    if not found:
        raise FileNotFoundError(f"no image/mask pairs found in {images} and {masks}" + (
            f" ({named_like_masks} file(s) named like masks are not taken as images when "
            "--images and --masks are one folder: rename them, or give masks their own "
            "folder)" if same and named_like_masks else ""))
    return found


def load_folder(images: Path, masks: Path) -> list[Pair]:
    """Read every image/mask pair (2-D, grayscale) of two folders. Images get the checks
    of ``segment`` (:func:`~livemask.offline.check_image`: colour is refused, not averaged);
    leading axes of length 1 are dropped from images and masks ((1, H, W) is one plane).
    Masks give their stored values: a MinIsWhite one is not inverted, as images are."""
    pairs = []
    for img_path, mask_path in folder_pairs(images, masks):
        file = read_image_file(img_path)
        check_image(img_path, file)
        image = _single_plane(file.data)
        if image.ndim != 2:
            raise ValueError(f"{img_path} has shape {image.shape}; evaluate takes one 2-D "
                             "image (y, x) per mask: save each plane as a file of its own")
        # a mask's stored values are its labels, MinIsWhite (an ImageJ binary mask) or not
        stored = read_image(mask_path, invert_min_is_white=False)
        mask = _as_instances(_single_plane(stored), mask_path)
        _warn_boundary_network(mask, mask_path)
        if image.shape != mask.shape:
            raise ValueError(
                f"image {img_path} {image.shape} and its mask {mask_path} {mask.shape} differ "
                "in size (y, x): give the mask drawn on this image, at its full size")
        pairs.append((image, mask))
    return pairs


def evaluate(
    segmenter: Segmenter, pairs: Iterable[Pair], holdout: str, *, model: str | None = None
) -> Evaluation:
    """Segment every image, match against its truth at each IoU threshold, time both halves.

    The first image's size is checked (:meth:`Segmenter.check_frame`: a model whose output
    is not what its card says, e.g. logits, is refused) and that image is segmented once
    untimed, so one-off start-up costs are not counted. For grain models the truth's thin
    0-valued boundary lines are first given to the nearest grain (:func:`fill_boundary_lines`).
    """
    pairs = list(pairs)
    grains = segmenter.card.task == "grains"
    if pairs:
        first = pairs[0][0]
        segmenter.check_frame((int(first.shape[-2]), int(first.shape[-1])))
        segmenter.segment(first)
    per_iou: dict[float, list[MatchResult]] = {t: [] for t in IOU_THRESHOLDS}
    result = Evaluation(holdout, model or segmenter.card.name)
    t_pred = t_post = 0.0
    for image, truth in pairs:
        t0 = time.perf_counter()
        probs = segmenter.predict(image)
        t1 = time.perf_counter()
        labels = without_non_finite(segmenter.labels(probs), image)  # as segment gives
        t2 = time.perf_counter()
        t_pred += t1 - t0
        t_post += t2 - t1
        if grains:
            truth = fill_boundary_lines(truth)
        for thr in IOU_THRESHOLDS:
            per_iou[thr].append(match_instances(truth, labels, iou_threshold=thr))
        n_true = int(len(np.unique(truth)) - (1 if (truth == 0).any() else 0))
        n_pred = int(len(np.unique(labels)) - (1 if (labels == 0).any() else 0))
        result.count_errors.append(abs(n_pred - n_true) / max(n_true, 1))
        if grains:
            _grain_errors(result, truth, labels)
        result.images += 1
    if result.images == 0:
        raise ValueError(f"no images to evaluate in {holdout!r}")
    n = result.images
    result.by_iou = {t: aggregate(rs) for t, rs in per_iou.items()}
    result.predict_ms = 1e3 * t_pred / n
    result.postprocess_ms = 1e3 * t_post / n
    return result


def write_card(path: Path, card: dict[str, Any]) -> None:
    """Write a model card as YAML, headed by a pointer to its markdown description
    (``NAME.md`` beside it, as the shipped models have), or to docs/models.md if none."""
    import yaml

    header = _card_header(path, str(card["name"]))
    text = yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=100)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # written next to the card and renamed: an interruption leaves the old card
        tmp.write_text(header + text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _card_header(path: Path, name: str) -> str:
    """The card's first line: the ``NAME.md`` beside it if there is one (a trained card
    has none), else the fields' description in livemask's docs."""
    if (path.parent / f"{name}.md").is_file():
        return f"# Model card: see {name}.md for the full description.\n"
    return f"# Model card of {name}: its fields are described in livemask's docs/models.md.\n"


def write_card_metrics(
    card_path: Path, live_images: int = 20, varied_images: int = 60
) -> dict[str, Any]:
    """Score a card on its task's two simulator hold-outs and store the figures in its metrics."""
    import yaml

    from livemask.offline import load_segmenter

    seg = load_segmenter(str(card_path))
    seg.backend.warmup((512, 512))
    grains = seg.card.task == "grains"
    live_set = grain_live_holdout(live_images) if grains else live_holdout(live_images)
    varied_set = grain_varied_holdout(varied_images) if grains else varied_holdout(varied_images)
    live = evaluate(seg, live_set, "simulator-live").as_dict()
    varied = evaluate(seg, varied_set, "simulator-varied").as_dict()
    seg.backend.close()
    metrics: dict[str, Any] = {
        "f1_iou50": live["f1_iou50"],
        "simulator_live": live,
        "simulator_varied": varied,
    }
    card = yaml.safe_load(Path(card_path).read_text(encoding="utf-8"))
    card["metrics"] = metrics
    write_card(Path(card_path), card)
    log.info("%s: %s", card_path, metrics)
    return metrics

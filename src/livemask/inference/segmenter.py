"""From a camera frame to probabilities (model) and to instance labels (post-processing)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from livemask.analysis.instances import labels_from_probabilities
from livemask.analysis.normalize import percentile_normalize
from livemask.errors import ModelError
from livemask.inference.backend import Backend
from livemask.inference.model_checks import (
    BATCH_TOLERANCE,
    batch_dependence_error,
    batch_error,
    check_batch_input,
    check_batch_output,
    check_output_range,
)
from livemask.inference.models import ModelCard, PostProcessing
from livemask.inference.tiling import TilePlan, needs_tiling, plan_tiles, predict_tiled

if TYPE_CHECKING:
    import torch

    from livemask.inference.torch_analysis import LabelParams, TorchAnalysis


log = logging.getLogger("livemask")


def postprocessing_for(card: ModelCard, overrides: Mapping[str, Any]) -> PostProcessing:
    """``card``'s post-processing with ``overrides`` (the config's ``analysis.*`` values that
    are set). A boundary-label card (the grains models) has no seed map: a
    ``seed_threshold`` given for it has no effect, and is warned about; its
    ``foreground_threshold`` is the boundary-probability cut (pixels below it are grain)."""
    if card.postprocessing.method == "boundary-label" and "seed_threshold" in overrides:
        log.warning(
            "analysis.seed_threshold (%g) has no effect with model %s: a boundary-label "
            "(grains) card has no seed map. Its analysis.foreground_threshold (card %g) is "
            "the boundary-probability cut: pixels below it are grain, so raising it merges "
            "neighbouring grains and lowering it splits them (docs/configuration.md)",
            overrides["seed_threshold"], card.name, card.postprocessing.foreground_threshold)
    return card.postprocessing.model_copy(update=dict(overrides))


@dataclass
class DeviceProbabilities:
    """Model output kept on the GPU, with the frame it came from (the device path)."""

    probabilities: torch.Tensor  # (C, H, W) float32
    image: torch.Tensor  # (H, W) float32 camera counts


class Segmenter:
    """A loaded model plus its pre- and post-processing. Thread-compatible, not thread-safe."""

    def __init__(
        self,
        card: ModelCard,
        backend: Backend,
        post: PostProcessing | None = None,
        *,
        device_resident: bool | None = None,
    ) -> None:
        self.card = card
        self.backend = backend
        self.post = post or card.postprocessing
        self._plan: TilePlan | None = None
        self._plan_key: tuple[object, ...] | None = None
        self._device: TorchAnalysis | None = None
        run_tensor = getattr(backend, "run_tensor", None)
        if device_resident is None:  # default: on whenever the model runs on a CUDA GPU
            device_resident = run_tensor is not None and backend.device == "cuda"
        if device_resident:
            if run_tensor is None or card.runtime != "onnx":
                raise ValueError(f"backend {backend.name} cannot keep {card.name}'s output on "
                                 "the device (only the torch backend can)")
            from livemask.inference.torch_analysis import TorchAnalysis

            self._device = TorchAnalysis(backend.torch_device)  # type: ignore[attr-defined]

    @property
    def device_resident(self) -> bool:
        """Whether :meth:`infer` / :meth:`analyse` keep the frame on the GPU."""
        return self._device is not None

    def tile_plan(self, shape: tuple[int, int]) -> TilePlan | None:
        """How :meth:`predict` tiles a frame of ``shape`` (H, W); None if it runs it whole.

        Frames whose height or width, padded to the card's ``size_multiple``, exceed its
        ``tile_px`` are tiled (not for ``runtime: classical``, whose thresholds are global).
        ``plan.tile_shape`` and ``plan.batch_sizes`` are the backend input shapes, e.g. for
        a warm-up.
        """
        card = self.card
        if card.runtime == "classical" or not needs_tiling(
            shape, card.tile_px, card.size_multiple
        ):
            return None
        key = (shape, card.tile_px, card.tile_overlap_px, card.max_batch, card.size_multiple)
        if self._plan_key != key:  # one plan per frame shape, computed once
            self._plan = plan_tiles(
                shape,
                tile_px=card.tile_px,
                overlap_px=card.tile_overlap_px,
                max_batch=card.max_batch,
                size_multiple=card.size_multiple,
            )
            self._plan_key = key
        return self._plan

    def _check_input(self, shape: tuple[int, ...], frame: tuple[int, int] | None) -> None:
        """ModelError if a batch of ``shape`` does not fit the model's fixed input sizes."""
        check_batch_input(self.card, getattr(self.backend, "model_io", None), shape, frame)

    def _check_output(
        self, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
        frame: tuple[int, int] | None,
    ) -> None:
        """ModelError unless the model returned (N, C, H, W) as its card says."""
        check_batch_output(self.card, out_shape, in_shape, self.post.method, frame)

    def _run(self, batch: np.ndarray, frame: tuple[int, int] | None = None) -> np.ndarray:
        """``backend.run`` with the batch checked against the model's fixed input sizes
        and the result's shape against the card (a clear ModelError, not a numpy error
        later; two tuple comparisons per call)."""
        self._check_input(batch.shape, frame)
        out = self.backend.run(batch)
        self._check_output(np.shape(out), batch.shape, frame)
        return out

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        """The image as the model takes it: normalised as its card says (float32)."""
        norm = self.card.normalization
        return percentile_normalize(image, norm.low, norm.high,
                                    min_span_noise=norm.min_span_noise,
                                    clip=norm.clip_range or False,
                                    exclude_saturated=norm.exclude_saturated)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (C, H, W) for a 2-D image of any size, dtype and range.

        The image is normalised as a whole; frames larger than the card's tile are then run
        as overlapping tiles in batches and blended (:mod:`livemask.inference.tiling`).
        A model output of another shape than the card says raises ModelError.
        """
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        x = self._normalize(image)
        h, w = x.shape
        plan = self.tile_plan((h, w))
        if plan is not None:
            return predict_tiled(lambda b: self._run(b, (h, w)), x, plan=plan)
        m = self.card.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
        out = self._run(x[None, None], (h, w))
        return out[0, :, :h, :w]

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """Instance labels (int32, 0 = background) from the model's probability maps."""
        p = self.post
        if p.method == "boundary-label":
            from livemask.analysis.boundaries import labels_from_boundaries

            return labels_from_boundaries(
                probabilities[0], threshold=p.foreground_threshold, min_area_px=p.min_area_px,
                min_edge_area_px=p.min_edge_area_px,
            )
        return labels_from_probabilities(
            probabilities[0],
            probabilities[1],
            foreground_threshold=p.foreground_threshold,
            seed_threshold=p.seed_threshold,
            min_area_px=p.min_area_px,
            flood_levels=p.flood_levels,
        )

    # ------------------------------------------------------------ pipeline path
    def _label_params(self) -> LabelParams:
        from livemask.inference.torch_analysis import LabelParams

        p = self.post
        return LabelParams(
            foreground_threshold=p.foreground_threshold,
            seed_threshold=p.seed_threshold,
            min_area_px=p.min_area_px,
            flood_levels=p.flood_levels,
        )

    def warmup(self, shape: tuple[int, int]) -> None:
        """Warm the backend up for frames of ``shape``; on the device path also run the whole
        infer/analyse path twice, so its CUDA graphs are captured before the first frame.

        The backend is warmed up with what :meth:`predict` hands it for such a frame: the
        frame padded to the card's ``size_multiple``, or its tiles. A test image of that
        size (:func:`probe_image`, normalised as the card says) is first run once with its
        result checked, so a model that does not compute what its card says (another
        output shape, values outside [0, 1] such as logits, or another fixed input size)
        raises ModelError here, before the first frame."""
        size = self.check_frame(shape)
        self.backend.warmup(size)
        if self._device is not None:
            self._device.prepare(shape, self._label_params())
            image = np.zeros(shape, dtype=np.uint16)
            image[::7, ::5] = 1000  # not flat, so the model sees a real range
            for _ in range(2):
                self.analyse(self.infer(image), image)

    def check_frame(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Check, with one model run, that the model takes frames of ``shape`` and returns
        what its card says (:meth:`check_output`), and with one more per batch size above 1
        that a tiled frame sends, that it runs such batches and gives a tile in them the
        output it gives it alone (:meth:`_check_batches`); ModelError if not. Returns the
        size the backend gets (the frame padded to ``size_multiple``, or a tile). Offline
        commands run only this; :meth:`warmup` runs it first."""
        plan = self.tile_plan(shape)
        if plan is not None:
            size = plan.tile_shape
        else:
            m = self.card.size_multiple
            size = (-(-shape[0] // m) * m, -(-shape[1] // m) * m)
        frame = (int(shape[0]), int(shape[1]))
        for n in sorted(set(plan.batch_sizes) if plan is not None else {1}):
            self._check_input((n, 1, *size), frame)  # every batch shape this frame sends
        run_size = (int(size[0]), int(size[1]))
        out = self.check_output(run_size, frame)
        if plan is not None:
            self._check_batches(plan, run_size, frame, out)
        return run_size

    def _check_batches(
        self, plan: TilePlan, size: tuple[int, int], frame: tuple[int, int],
        tile_out: np.ndarray,
    ) -> None:
        """Run different test tiles (:func:`probe_tiles`) as a batch of each size above 1
        that ``plan`` sends; ModelError saying to set max_batch: 1 if a batch fails (a model
        that fixes its batch at 1 inside, e.g. a traced ``x.view(1, ...)``, runs one tile but
        no batch) or if the first tile's output in it differs from its output alone by more
        than :data:`BATCH_TOLERANCE` (a model that normalises over its batch, e.g. BatchNorm
        exported in training mode: identical tiles would hide it). ``tile_out``: the output
        :meth:`check_output` got for the test image of ``size``. Small tiles where the model
        takes them, so this costs little beside :meth:`check_output`."""
        sizes = sorted(set(plan.batch_sizes) - {1})
        if not sizes:
            return
        first, alone = self._batch_probe(size, frame, tile_out)
        tiles = probe_tiles(first, max(sizes))
        for n in sizes:
            batch = tiles[:n]
            try:
                out = self._run(batch, frame)
            except ModelError as exc:
                raise batch_error(self.card, batch.shape, frame, plan.count, exc) from None
            difference = float(np.max(np.abs(out[0] - alone[0])))
            if not difference <= BATCH_TOLERANCE:  # NaN in the batch only: dependent too
                raise batch_dependence_error(self.card, batch.shape, frame, plan.count,
                                             difference)

    def _batch_probe(
        self, size: tuple[int, int], frame: tuple[int, int], tile_out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The test tile (H, W, normalised) for the batch checks and the model's output for
        it alone: a small tile (64 px, rounded up to ``size_multiple``) if the model declares
        no fixed height or width and runs it alone, else the test image of the tile ``size``
        (its output ``tile_out``, from :meth:`check_output`)."""
        io = getattr(self.backend, "model_io", None)
        dims = io.inputs[0].shape if io is not None and io.inputs else None
        fixed = dims is not None and len(dims) == 4 and any(
            isinstance(d, int) for d in dims[2:])  # a fixed height or width: only the tile fits
        m = self.card.size_multiple
        side = -(-64 // m) * m
        small = (min(size[0], side), min(size[1], side))
        if not fixed and small != size:
            tile = self._normalize(probe_image(small))
            try:
                return tile, self._run(tile[None, None], frame)
            except ModelError:  # the network needs larger inputs: use the tile
                pass
        return self._normalize(probe_image(size)), tile_out

    def check_output(
        self, size: tuple[int, int], frame: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Run :func:`probe_image` of ``size`` (H, W, a size the model takes) through the
        card's normalisation and the model once; ModelError unless the output has the shape
        the card says and holds probabilities in [0, 1]. One model call; returns its output
        (1, C, H, W)."""
        batch = self._normalize(probe_image(size))[None, None]
        out = self._run(batch, frame)
        check_output_range(self.card, out, batch.shape, frame)
        return out

    def infer(self, image: np.ndarray) -> np.ndarray | DeviceProbabilities:
        """The pipeline's inference stage: :meth:`predict`, or on the device path the
        upload, normalisation and model run on the GPU (whole frame, no tiling), finished
        (synchronised) when it returns. Feed the result to :meth:`analyse`. Frames of
        pixels float32 cannot hold exactly (32-bit integers, float64) and frames with
        non-finite pixels take the host path, which normalises them in float64."""
        ta = self._device
        if ta is None or not _exact_in_float32(image.dtype) or (
                image.dtype.kind == "f" and not np.isfinite(image).all()):
            return self.predict(image)  # (the host path leaves non-finite pixels out)
        torch = ta._torch
        norm = self.card.normalization
        img, batch = ta.preprocess(image, norm.low, norm.high, self.card.size_multiple,
                                   min_span_noise=norm.min_span_noise,
                                   clip=norm.clip_range,
                                   exclude_saturated=norm.exclude_saturated)
        h, w = img.shape
        in_shape = tuple(int(n) for n in batch.shape)
        self._check_input(in_shape, (h, w))
        full = self.backend.run_tensor(batch)  # type: ignore[attr-defined]
        self._check_output(tuple(int(n) for n in full.shape), in_shape, (h, w))
        out = full[0, :, :h, :w]
        if ta.device.type == "cuda":
            torch.cuda.current_stream(ta.device).synchronize()
        return DeviceProbabilities(out, img)

    def analyse(
        self, probabilities: np.ndarray | DeviceProbabilities, image: np.ndarray,
        *, pixel_size_um: float = 1.0,
    ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """The pipeline's analysis stage: (labels, objects, summary) from :meth:`infer`'s
        output; on the device path labelling and measuring run on the GPU (given the
        saturation level of ``image``'s pixel type, as ``measure_objects`` takes it)."""
        from livemask.analysis.measure import measure_objects, saturation_level

        p = self.post
        if isinstance(probabilities, DeviceProbabilities):
            probs = probabilities.probabilities
            if p.method == "boundary-label":  # no device version: finish on the CPU
                return self.analyse(probs.cpu().numpy(), image, pixel_size_um=pixel_size_um)
            ta = self._device
            assert ta is not None
            return ta.analyse(probs[0], probs[1], probabilities.image, self._label_params(),
                              pixel_size_um=pixel_size_um,
                              saturation=saturation_level(image.dtype))
        labels = without_non_finite(self.labels(probabilities), image)
        objects, summary = measure_objects(labels, image, pixel_size_um=pixel_size_um)
        return labels, objects, summary

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Instance labels for one 2-D image."""
        return without_non_finite(self.labels(self.predict(image)), image)


def _exact_in_float32(dtype: np.dtype[Any]) -> bool:
    """Whether float32 holds every pixel of ``dtype`` exactly (integers of up to 16 bits,
    float16 and float32): the device path's normalisation works in float32."""
    return (dtype.kind == "f" and dtype.itemsize <= 4) or (
        dtype.kind in "uib" and dtype.itemsize <= 2)


def without_non_finite(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``labels`` with 0 at ``image``'s NaN/infinite pixels, and without the objects of
    which more than half lies there (the model saw them filled from their neighbours:
    what it found there is not in the image). Integer images: ``labels`` as they are."""
    if image.dtype.kind != "f":
        return labels
    bad = ~np.isfinite(image)
    if not bad.any():
        return labels
    n = int(labels.max()) + 1
    drop = 2 * np.bincount(labels[bad].ravel(), minlength=n) > np.bincount(
        labels.ravel(), minlength=n)
    drop[0] = False
    out = labels.copy()
    out[bad] = 0
    if drop.any():
        out[drop[out]] = 0
    return out


def probe_image(shape: tuple[int, int]) -> np.ndarray:
    """A deterministic, non-flat uint16 test image of ``shape``: bright spots on a dim
    ramp, with noise, so that after normalisation a model sees the whole range (cheap: a
    small noise patch tiled, no per-pixel random draws)."""
    h, w = shape
    rows = np.sin(np.arange(h, dtype=np.float32) * np.float32(0.35)) > 0.7
    cols = np.sin(np.arange(w, dtype=np.float32) * np.float32(0.35)) > 0.7
    noise = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32) * 20.0
    image = np.tile(noise, (-(-h // 64), -(-w // 64)))[:h, :w]
    image += np.linspace(100.0, 400.0, w, dtype=np.float32)[None, :]
    np.add(image, 1500.0, out=image, where=rows[:, None] & cols[None, :])
    return np.clip(image, 0, 65535).astype(np.uint16)


#: (gain, offset) of the test tiles after the first (:func:`probe_tiles`), in turn.
_TILE_LEVELS = ((-1.0, 1.0), (0.5, 0.5), (1.5, 0.25))


def probe_tiles(tile: np.ndarray, n: int) -> np.ndarray:
    """``n`` different test tiles (n, 1, H, W) float32: ``tile`` (a normalised
    :func:`probe_image`, mostly dim) first, then copies of it flipped and rolled, inverted
    or brightened (:data:`_TILE_LEVELS`), as the tiles of one frame differ in content and
    brightness. Identical tiles would hide a model that normalises over its batch (each
    tile's batch statistics would be its own); these shift the first tile's by ~0.4."""
    h, w = tile.shape
    tiles = [tile]
    for i in range(1, n):
        gain, offset = _TILE_LEVELS[(i - 1) % len(_TILE_LEVELS)]
        moved = np.roll(tile[:, ::-1] if i % 2 else tile[::-1], (i * h // 5, i * w // 7),
                        axis=(0, 1))
        tiles.append(gain * moved + offset)
    return np.stack(tiles)[:, None].astype(np.float32, copy=False)

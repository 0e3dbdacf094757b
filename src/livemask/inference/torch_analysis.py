"""Normalisation, instance labelling and measurement as torch tensor code (GPU path).

When the model runs on a CUDA GPU, copying its probability maps to the host and labelling
and measuring them on the CPU costs more than the model itself at 2048×2048 (about 100 ms
on two cores, see docs/performance.md). This module does the same work on the device,
with data-parallel operations only:

- percentile normalisation: the same strided sample, percentiles (float64, interpolated as
  ``np.percentile``), saturated plateau and outlier rule as
  :func:`livemask.analysis.normalize.percentile_normalize`, so the model's input is the
  CPU path's;
- connected components (4-connectivity): max-label propagation (the maximum of each
  pixel's 4-neighbourhood from shifted views, restricted to the mask) with pointer jumping;
- marker-controlled watershed: seeds grow into the foreground level by level of the
  elevation ``1 - seed probability`` (the card's ``flood_levels``, low first; inside a
  level by propagation, ties to the larger seed id), which is the CPU path's quantised
  flood done in parallel. Its labels agree with the CPU path's
  (:func:`livemask.analysis.instances.labels_from_probabilities`) on almost every object,
  which ``tests/test_torch_analysis.py`` checks with the object F1;
- measurements: per-object sums with ``index_add_`` / ``scatter_reduce_`` in float64, local
  backgrounds from summed-area tables of the unlabelled pixels, saturated pixels per object
  (given the camera's saturation level) with one more count, then the CPU's
  :func:`livemask.analysis.measure.objects_from_sums` builds the same dicts.

:meth:`TorchAnalysis.analyse` (the pipeline's path) runs all of it as four stages of fixed
steps and fixed shapes, replayed as one CUDA graph on CUDA, and stage by stage (each
continued until it converges) where a fixed step count was not enough;
:meth:`TorchAnalysis.labels_from_probabilities` is the exact version, its reference.

Everything also runs on the CPU build of torch (that is how CI tests it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from livemask.analysis.measure import (
    BACKGROUND_GUARD_PX,
    BACKGROUND_MARGIN_PX,
    ObjectSums,
    objects_from_sums,
)
from livemask.analysis.normalize import (
    _MIN_OBJECT_PX,
    _MIN_SAMPLE_PX,
    OBJECT_MIN_NOISE,
    OUTLIER_RATIO,
    SATURATED_MIN_PX,
    grey_level,
    iqr_sigma,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["LabelParams", "TorchAnalysis"]

#: Propagation steps between two convergence checks (each check synchronises the device).
_CHECK_EVERY = 8
#: Fixed steps of the captured stages (more run only where they fall short). Component
#: labelling with pointer jumping: measured 8 steps for the seeds of 2048² simulated frames.
#: Flooding: one step per level sufficed on those frames except in the last level (all of
#: the foreground), which took 13-21.
_SEED_STEPS = 10
_LEVEL_STEPS = 1
_LAST_LEVEL_STEPS = 24
#: Spare bins that background pixels scatter into (see ``TorchAnalysis._slots``).
_SPARE_BINS = 4096
#: Frame shapes whose CUDA graphs and pinned buffers are kept (each graph holds its own
#: frame-sized device memory; a run that changes its ROI often would otherwise grow without
#: bound); those of the least recently used shape are dropped first.
MAX_SHAPES = 4

log = logging.getLogger("livemask")


@dataclass(frozen=True)
class LabelParams:
    """The post-processing parameters of :meth:`TorchAnalysis.analyse` (the model card's)."""

    foreground_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_area_px: int = 20
    min_seed_area_px: int = 4
    flood_levels: int | None = None

    def key(self, default_levels: int) -> tuple[float, float, int, int, int]:
        """(foreground and seed thresholds, min seed area, levels, min area): the part of
        a captured stage's key that the parameters decide."""
        return (float(self.foreground_threshold), float(self.seed_threshold),
                int(self.min_seed_area_px), int(self.flood_levels or default_levels),
                int(self.min_area_px))


class _CapturedCall:
    """A tensor function captured once into a CUDA graph and replayed on copies of new inputs.

    Outputs are static tensors, overwritten by the next call: use them before calling again.
    """

    def __init__(self, fn: Any, inputs: list[Tensor], device: Any) -> None:
        import torch

        self._inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch's docs ask
            fn(*self._inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._outputs = fn(*self._inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        for static, x in zip(self._inputs, inputs, strict=True):
            static.copy_(x)
        self._graph.replay()
        return self._outputs


class TorchAnalysis:
    """Device-side pre- and post-processing for one torch device."""

    def __init__(
        self, device: str | torch.device = "cuda", *, levels: int = 6, graphs: bool = True,
        max_shapes: int = MAX_SHAPES,
    ) -> None:
        import torch

        if max_shapes < 1:
            raise ValueError("max_shapes must be at least 1")
        self._torch = torch
        self.device = torch.device(device)
        self.levels = levels
        self.graphs = graphs
        self.max_shapes = max_shapes
        # keyed by (stage, H, W, ...) and ((H, W), dtype); the inference thread (input
        # stage, uploads) and the analysing thread both add to them, under _lock
        self._graphs: dict[tuple[Any, ...], _CapturedCall] = {}
        self._no_graph: set[tuple[Any, ...]] = set()
        self._pinned: dict[tuple[Any, ...], tuple[Tensor, Any]] = {}
        self._levels: dict[float, Tensor] = {}  # saturation levels on the device
        self._shapes: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._lock = threading.Lock()
        # analysis gets its own CUDA stream, so that a frame's labelling and the next
        # frame's model (on the inference thread's stream) do not wait for each other
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def cached_shapes(self) -> list[tuple[int, int]]:
        """The frame shapes with captured graphs or pinned buffers, least recent first."""
        return list(self._shapes)

    def _use_shape(self, shape: tuple[int, int]) -> None:
        """Mark ``shape`` as just used; over ``max_shapes`` shapes, drop the graphs and
        pinned buffers of the least recently used one (their memory is then freed)."""
        with self._lock:
            if shape in self._shapes:
                self._shapes.move_to_end(shape)
                return
            self._shapes[shape] = None
            while len(self._shapes) > self.max_shapes:
                old, _ = self._shapes.popitem(last=False)
                for key in [k for k in self._graphs if k[1:3] == old]:
                    del self._graphs[key]
                self._no_graph = {k for k in self._no_graph if k[1:3] != old}
                for key in [k for k in self._pinned if k[0] == old]:
                    _host, done = self._pinned.pop(key)
                    if done is not None:
                        done.synchronize()  # its last copy has finished before it is freed
                log.debug("labels: dropped the CUDA graphs and buffers of %s frames", old)

    # ------------------------------------------------------------ input
    def upload(self, image: np.ndarray) -> torch.Tensor:
        """A 2-D camera image as a float32 tensor on the device (uint16 travels as 2 bytes)."""
        return self._as_float(self._raw_to_device(image))

    def preprocess(
        self, image: np.ndarray, low: float, high: float, size_multiple: int = 1,
        *, min_span_noise: float | None = None, clip: tuple[float, float] | None = None,
        exclude_saturated: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input for a camera image: (image as float32 (H, W), normalised batch
        (1, 1, H', W') reflect-padded to ``size_multiple``), both on the device.

        After the upload one captured stage on CUDA (the float conversion, percentiles,
        scaling and padding in one graph replay); the image is a new tensor, the batch a
        static one that the next call overwrites.
        """
        raw = self._raw_to_device(image)
        # the camera's grey level from its own pixel type (some integers upload as float32)
        grey = grey_level(np.asarray(image).dtype)
        key = ("input", *raw.shape, str(raw.dtype), float(low), float(high), size_multiple,
               min_span_noise, grey, clip, exclude_saturated)
        img, batch = self._run(key, self._input_stage, [raw], key)
        return (img.clone() if key in self._graphs else img), batch

    def _input_stage(
        self, raw: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w, _, low, high, multiple, min_span_noise, grey, clip, saturated = key[1:]
        img = self._as_float(raw)
        batch = self.normalize(img, low, high, min_span_noise=min_span_noise,
                               grey_level=grey, clip=clip,
                               exclude_saturated=saturated).view(1, 1, h, w)
        ph, pw = (-h) % multiple, (-w) % multiple
        batch = self._reflect_pad(self._reflect_pad(batch, ph, dim=2), pw, dim=3)
        return img, batch

    def _reflect_pad(self, batch: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
        """``batch`` (N, C, H, W) padded by ``pad`` after its end along ``dim`` (2 or 3) as
        ``np.pad(mode="reflect")`` pads the host path's frames: torch reflects at most the
        side less one pixel at a time, so a frame smaller than the pad (a thin camera ROI)
        is padded in steps, each from the last one's end; a side of one pixel repeats."""
        functional = self._torch.nn.functional
        while pad > 0:
            side = batch.shape[dim]
            step = pad if side == 1 else min(pad, side - 1)
            widths = (0, step, 0, 0) if dim == 3 else (0, 0, 0, step)
            batch = functional.pad(batch, widths, mode="replicate" if side == 1 else "reflect")
            pad -= step
        return batch

    def _raw_to_device(self, image: np.ndarray) -> Tensor:
        """The camera image on the device in its own dtype (uint16 as its int16 bits)."""
        arr = np.ascontiguousarray(image)
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
        if arr.dtype == np.uint16:  # torch has few uint16 kernels: move the bits as int16
            return self._to_device(arr.view(np.int16))
        if arr.dtype in (np.uint8, np.int32, np.float32):
            return self._to_device(arr)
        if arr.dtype == np.int16:  # int16 on the device means uint16 bits (above)
            return self._to_device(arr.astype(np.int32))
        return self._to_device(arr.astype(np.float32))

    def _as_float(self, raw: torch.Tensor) -> torch.Tensor:
        torch = self._torch
        if raw.dtype == torch.int16:  # uint16 bits
            return (raw.to(torch.int32) & 0xFFFF).to(torch.float32)
        return raw.to(torch.float32)

    def _to_device(self, arr: np.ndarray) -> Tensor:
        """Host → device through a reused pinned buffer on CUDA (a fast, asynchronous copy)."""
        torch = self._torch
        if self.device.type != "cuda":
            return torch.from_numpy(arr).to(self.device)
        key = (arr.shape, arr.dtype.str)
        self._use_shape(arr.shape)
        entry = self._pinned.get(key)
        if entry is None:
            host = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype,
                               pin_memory=True)
        else:
            host, done = entry
            if done is not None:
                done.synchronize()  # the previous copy out of this buffer has finished
        host.numpy()[...] = arr
        out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        with self._lock:  # kept only while its shape is (the other thread may drop it)
            if tuple(arr.shape) in self._shapes:
                self._pinned[key] = (host, event)
        return out

    def normalize(
        self, image: torch.Tensor, low: float, high: float, subsample: int = 4,
        *, min_span_noise: float | None = None, grey_level: float = 1.0,
        clip: tuple[float, float] | None = None, exclude_saturated: bool = False,
    ) -> torch.Tensor:
        """Percentile normalisation as ``percentile_normalize`` (same strided sample, the
        same linear interpolation as ``np.percentile`` in float64, the same noise floor,
        clip, saturated plateau and outlier rule; capturable: no host round trip).
        ``grey_level``: the camera's smallest step (1 for integer pixels, 0 for float ones)."""
        torch = self._torch
        stride = subsample
        while stride > 1 and image.numel() // stride**2 < _MIN_SAMPLE_PX:
            stride -= 1
        # float64, as np.percentile computes the percentiles of integer pixels
        ordered = image[::stride, ::stride].reshape(-1).double().sort().values
        n = ordered.numel()
        count = torch.full((), n, dtype=torch.long, device=ordered.device)
        if exclude_saturated:  # as unsaturated: the sorted values below the plateau
            n_top = (ordered == ordered[-1]).sum()
            plateau = (n_top >= SATURATED_MIN_PX) & (n_top < n)
            count = torch.where(plateau, n - n_top, count)

        def pct(q: float) -> Tensor:
            return _percentile_of(ordered, count, q)

        lo, hi = pct(low), pct(high)
        sigma: Tensor = iqr_sigma(pct(25.0), pct(75.0))  # as noise_sigma
        if exclude_saturated:  # as _outlier_free_range
            hi = _outlier_free_top(ordered, count, lo, pct(50.0), hi, sigma, grey_level, high)
        span = hi - lo
        if min_span_noise is not None:
            span = torch.maximum(span, min_span_noise * sigma)
        # as percentile_normalize: a few objects on a black background reach the top
        top = image.max().double() - lo
        if min_span_noise is not None:  # only a top of that many grey levels
            top = torch.where(top >= min_span_noise * grey_level, top, torch.zeros_like(top))
        span = torch.where(span > 0, span, top)
        scale = torch.where(span > 0, 1.0 / span.clamp_min(1e-30), torch.zeros_like(span))
        # float32 pixels less lo, times 1 / span, each rounded to float32 (as on the CPU)
        out = (image - lo.float()) * scale.float()
        return out if clip is None else out.clamp(clip[0], clip[1])

    # ------------------------------------------------------------ labelling
    def _spread(self, lab: torch.Tensor) -> torch.Tensor:
        """Max over each pixel and its 4 neighbours (lab: (1, 1, H, W) int32).

        Five elementwise maxima of shifted views of one zero-padded copy: on a GPU far
        cheaper than ``max_pool2d``, whose kernels also compute and write argmax indices.
        """
        torch = self._torch
        p = torch.nn.functional.pad(lab, (1, 1, 1, 1))
        rows = torch.maximum(p[..., 1:-1, :-2], p[..., 1:-1, 2:])
        cols = torch.maximum(p[..., :-2, 1:-1], p[..., 2:, 1:-1])
        return torch.maximum(torch.maximum(rows, cols), lab)

    def _jump(self, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One step of component labelling inside ``mask``: neighbour maximum, then pointer
        jumping (each pixel also takes the label held by the pixel its label names).

        Labels are flat pixel indices + 1 of pixels in the same component, so the jump
        never crosses components, and labels spread along a chain in doubling strides:
        nuclei-sized seeds converge in about 8 steps instead of their length in pixels.
        """
        torch = self._torch
        zero = torch.zeros((), dtype=lab.dtype, device=lab.device)
        near = torch.where(mask, self._spread(lab), zero)
        flat = near.reshape(-1)
        held = flat.index_select(0, (flat - 1).clamp_min(0)).view_as(near)
        return torch.where(mask, torch.maximum(near, held), zero)

    def _components_converged(self, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whether component labels are final: no pixel of ``mask`` sees a larger label."""
        return ~(self._torch.where(mask, self._spread(lab), lab) != lab).any()

    def _index_dtype(self, n: int) -> torch.dtype:
        return self._torch.int32 if n < 2**31 - 1 else self._torch.int64

    def _pixel_ids(self, h: int, w: int, device: Any) -> torch.Tensor:
        """Flat pixel index + 1 of every pixel, as a (1, 1, H, W) tensor."""
        torch = self._torch
        ids = torch.arange(1, h * w + 1, device=device, dtype=self._index_dtype(2 * h * w))
        return ids.view(1, 1, h, w)

    def components(self, mask: torch.Tensor) -> torch.Tensor:
        """4-connected components of a 2-D bool mask: each pixel gets its component's
        largest flat index + 1 (int32; 0 outside the mask)."""
        torch = self._torch
        h, w = mask.shape
        ids = self._pixel_ids(h, w, mask.device)
        start = torch.where(mask.view(1, 1, h, w), ids, torch.zeros_like(ids))
        return self._converge(start, mask)

    def _converge(self, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Continue component labelling inside ``mask`` until nothing changes."""
        h, w = mask.shape
        m = mask.view(1, 1, h, w)
        lab = lab.view(1, 1, h, w)
        while True:
            for _ in range(_CHECK_EVERY):
                lab = self._jump(lab, m)
            if bool(self._components_converged(lab, m)):
                return lab.view(h, w)

    def _flood_step(self, lab: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Labels spread one pixel into unlabelled ``allowed`` pixels (ties: larger id)."""
        near = self._spread(lab)
        return self._torch.where(allowed & (lab == 0) & (near > 0), near, lab)

    def _flood_converged(self, lab: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return ~(allowed & (lab == 0) & (self._spread(lab) > 0)).any()

    def _flood(self, lab: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Propagate labels into the unlabelled ``allowed`` pixels until nothing changes."""
        while not bool(self._flood_converged(lab, allowed)):
            for _ in range(_CHECK_EVERY):
                lab = self._flood_step(lab, allowed)
        return lab

    def _drop_small_seeds(self, lab: torch.Tensor, min_seed: int) -> torch.Tensor:
        """Seed labels with components smaller than ``min_seed`` px removed."""
        torch = self._torch
        if min_seed <= 1:
            return lab
        h, w = lab.shape[-2:]
        counts = self._count(lab.reshape(-1), h * w + 1)
        small = (counts.index_select(0, lab.reshape(-1).to(torch.int64)) < min_seed)
        return torch.where(small.view_as(lab) & (lab > 0), torch.zeros_like(lab), lab)

    def _slots(self, lab_flat: torch.Tensor, bins: int) -> torch.Tensor:
        """Scatter targets for per-label sums over ``bins`` labels (int64): a label's own
        bin, and for background pixels one of ``_SPARE_BINS`` spare bins after them, so that
        GPU atomics on the background do not all queue on one address."""
        torch = self._torch
        n = lab_flat.numel()
        spare = torch.arange(n, device=lab_flat.device, dtype=torch.int64) % _SPARE_BINS
        return torch.where(lab_flat > 0, lab_flat.to(torch.int64), spare + bins)

    def _count(self, lab_flat: torch.Tensor, bins: int) -> torch.Tensor:
        """Pixels per label 0..bins-1 (int32; bin 0 is left at 0)."""
        torch = self._torch
        slots = self._slots(lab_flat, bins)
        counts = torch.zeros(bins + _SPARE_BINS, dtype=torch.int32, device=lab_flat.device)
        counts.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
        return counts[:bins]

    def labels_from_probabilities(
        self,
        foreground: torch.Tensor,
        seeds: torch.Tensor,
        *,
        foreground_threshold: float = 0.5,
        seed_threshold: float = 0.5,
        min_area_px: int = 20,
        min_seed_area_px: int = 4,
        flood_levels: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Instance labels (int32 tensor, 1..N, 0 = background) and N, with the CPU path's
        parameters and semantics (the numbering order differs), by exact loops that run
        until each level has converged. The reference for :meth:`analyse`'s fixed steps,
        and its fall-back."""
        torch = self._torch
        h, w = foreground.shape
        levels = flood_levels or self.levels
        fg = foreground > foreground_threshold
        seed = fg & (seeds > seed_threshold)
        lab = self._drop_small_seeds(self.components(seed).view(1, 1, h, w), min_seed_area_px)
        fg4 = fg.view(1, 1, h, w)
        elev = 1.0 - seeds.view(1, 1, h, w).to(torch.float32)
        for k in range(1, levels + 1):
            lab = self._flood(lab, fg4 & (elev <= k / levels) if k < levels else fg4)
        lab = lab.view(h, w)
        rest = fg & (lab == 0)  # foreground components without a seed: one object each
        if bool(rest.any()):
            lab = torch.where(rest, self.components(rest) + h * w, lab)
        return self._compact(lab, min_area_px)

    def _compact(self, lab: torch.Tensor, min_area: int) -> tuple[torch.Tensor, int]:
        """Renumber labels 1..N (dropping objects smaller than ``min_area``)."""
        torch = self._torch
        ids, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
        keep = (ids > 0) & (counts >= min_area)
        new_id = torch.cumsum(keep.to(torch.int32), 0) * keep
        n = int(keep.sum())
        return new_id.to(torch.int32)[inverse], n

    # ------------------------------------------------------------ fixed-step pipeline
    def analyse(
        self,
        foreground: torch.Tensor,
        seeds: torch.Tensor,
        image: torch.Tensor,
        params: LabelParams,
        *,
        pixel_size_um: float = 1.0,
        decimals: int | None = 4,
        saturation: float | None = None,
    ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Labels (int32, on the host), objects and summary for one frame, as
        :meth:`labels_from_probabilities` then ``measure_objects``, in stages of fixed steps and
        fixed shapes:

        1. seed components (pointer jumping);
        2. the level-by-level flood from the seeds;
        3. components of the foreground that no seed reached;
        4. compaction and per-object sums into a fixed number of bins (at most one object
           per ``min_area_px`` pixels).

        On CUDA all four replay as one CUDA graph: one Python call instead of hundreds of
        kernel launches, which matters because each launch gives up the GIL and must win it
        back from the camera, event loop and inference threads. Only flags, the per-object
        sums and the labels come back. Where a fixed step count fell short (a seed longer
        than the steps reach, a nucleus wider than the flood's reach), the stages run again
        one by one, each continued until it has converged, so results never depend on the
        step counts.

        ``saturation``: the camera's saturation level (``image`` is float32 whatever the
        camera's pixel type: pass :func:`livemask.analysis.measure.saturation_level` of the
        frame's dtype for ``measure_objects``' ``saturated_px``); None: unknown, and
        ``saturated_px`` and the summary's ``saturated_objects`` are None.

        The inputs must be complete (:meth:`Segmenter.infer` synchronises before it returns):
        on CUDA this runs on its own stream.
        """
        with self._on_stream():
            return self._analyse(foreground, seeds, image, params, pixel_size_um=pixel_size_um,
                                 decimals=decimals, saturation=saturation)

    def _on_stream(self) -> Any:
        """Context: run on the analysis stream (CUDA), else nothing to do."""
        if self._stream is None:
            return contextlib.nullcontext()
        return self._torch.cuda.stream(self._stream)

    def prepare(self, shape: tuple[int, int], params: LabelParams) -> None:
        """Capture the CUDA graph of :meth:`analyse`'s usual path for frames of ``shape`` now,
        so that no frame pays for it (a no-op off CUDA). The stage-by-stage graphs are
        captured when a frame first needs them."""
        if self.device.type != "cuda" or not self.graphs:
            return
        torch = self._torch
        key = (*shape, *params.key(self.levels))
        zeros = torch.zeros(shape, dtype=torch.float32, device=self.device)
        with self._on_stream():
            self._run(("all", *key), self._all_stages,
                      [zeros, zeros, zeros, self._level(None)], key)
            self._stream.synchronize()  # type: ignore[union-attr]

    def _analyse(
        self,
        foreground: torch.Tensor,
        seeds: torch.Tensor,
        image: torch.Tensor,
        params: LabelParams,
        *,
        pixel_size_um: float,
        decimals: int | None,
        saturation: float | None,
    ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        h, w = foreground.shape
        key = (h, w, *params.key(self.levels))
        level = self._level(saturation)
        labels, head, rows = self._run(
            ("all", *key), self._all_stages, [foreground, seeds, image, level], key)
        values = head.tolist()
        if not all(values[:3]):  # a fixed step count fell short: go stage by stage
            labels, head, sums, boxes = self._stage_by_stage(foreground, seeds, image, key)
            rows = self._object_rows(labels, image, sums, boxes, level)
            values = head.tolist()
        n, n_fg, total, fg_sum = values[3:]
        n, n_fg = int(n), int(n_fg)
        # one copy of the objects' rows and one of the labels: each torch call gives up the
        # GIL and must win it back from the service's other threads
        table = rows[1:n + 1].cpu().numpy()
        objects, summary = _objects(
            table[:, :7], table[:, 7:11].astype(np.int64), table[:, 11],
            shape=(h, w), n_fg=n_fg, total=total, fg_sum=fg_sum, pixel_size_um=pixel_size_um,
            decimals=decimals,
            saturated=None if saturation is None else table[:, 12].astype(np.int64))
        return labels.cpu().numpy(), objects, summary

    def _level(self, saturation: float | None) -> torch.Tensor:
        """The saturation level as a 0-d float32 tensor on the device (an input of the
        analysis graph; +inf where unknown: no pixel reaches it), one per level."""
        level = math.inf if saturation is None else float(saturation)
        tensor = self._levels.get(level)
        if tensor is None:
            tensor = self._torch.full((), level, dtype=self._torch.float32, device=self.device)
            with self._lock:
                self._levels[level] = tensor
        return tensor

    def _object_rows(
        self, labels: torch.Tensor, image: torch.Tensor, sums: torch.Tensor,
        boxes: torch.Tensor, level: torch.Tensor,
    ) -> torch.Tensor:
        """Every bin's row, float64 (bins, 13): the 7 sums, the box (4), the local
        background and the pixels at or above ``level``; computed for all bins, used and
        not, so that the shapes are fixed and the work joins the analysis graph."""
        torch = self._torch
        local_bg = self._local_backgrounds(labels, image, boxes, BACKGROUND_MARGIN_PX)
        flat = labels.reshape(-1)
        hit = (image.reshape(-1) >= level) & (flat > 0)
        at_level = torch.where(hit, flat, torch.zeros_like(flat))
        saturated = self._count(at_level, sums.shape[0])
        return torch.cat([sums, boxes.to(torch.float64), local_bg[:, None],
                          saturated[:, None].to(torch.float64)], 1)

    def _local_backgrounds(
        self, labels: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor, margin_px: int,
    ) -> torch.Tensor:
        """:func:`livemask.analysis.measure.local_backgrounds` of ``boxes`` (n, 4) on the
        device: sums and counts of the finite pixels away from every object (a max-pool of
        the labelled pixels as the guard band) from two summed-area tables (float64: exact
        for camera counts), four corners per grown box."""
        torch = self._torch
        h, w = labels.shape
        k = 2 * BACKGROUND_GUARD_PX + 1
        near = torch.nn.functional.max_pool2d(
            (labels != 0).to(torch.float32)[None, None], k, stride=1,
            padding=BACKGROUND_GUARD_PX)[0, 0] > 0
        unlabelled = ~near & torch.isfinite(image)
        tables = torch.zeros((2, h + 1, w + 1), dtype=torch.float64, device=labels.device)
        tables[0, 1:, 1:] = torch.where(unlabelled, image.to(torch.float64), 0.0)
        tables[1, 1:, 1:] = unlabelled.to(torch.float64)
        tables = tables.cumsum(1).cumsum(2)
        # (clamped on both sides: an unused bin's box is (big, big, 0, 0))
        r0 = (boxes[:, 0] - margin_px).clamp(0, h)
        c0 = (boxes[:, 1] - margin_px).clamp(0, w)
        r1 = (boxes[:, 2] + margin_px).clamp(0, h)
        c1 = (boxes[:, 3] + margin_px).clamp(0, w)
        total = tables[:, r1, c1] - tables[:, r0, c1] - tables[:, r1, c0] + tables[:, r0, c0]
        return torch.where(total[1] > 0, total[0] / total[1].clamp(min=1), float("nan"))

    def _all_stages(
        self, foreground: torch.Tensor, seeds: torch.Tensor, image: torch.Tensor,
        level: torch.Tensor, key: tuple[Any, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stages back to back (one CUDA graph): labels, head (the three convergence
        flags first) and the objects' rows (:meth:`_object_rows`)."""
        fg, _seed, lab, seed_ok = self._seed_stage(foreground, seeds, key)
        lab, grow_ok = self._grow_stage(lab, fg, seeds, key)
        rest, rest_lab, rest_ok = self._rest_stage(lab, fg, key)
        labels, head, sums, boxes = self._measure_stage(lab, rest, rest_lab, image, key)
        rows = self._object_rows(labels, image, sums, boxes, level)
        flags = self._torch.stack([seed_ok, grow_ok, rest_ok]).to(head.dtype)
        return labels, self._torch.cat([flags, head]), rows

    def _stage_by_stage(
        self, foreground: torch.Tensor, seeds: torch.Tensor, image: torch.Tensor,
        key: tuple[Any, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stages one at a time, each followed by more steps until it has converged
        (each a CUDA graph on CUDA): for long seeds, wide nuclei, large unseeded areas."""
        log.debug("labels: a fixed step count was not enough; continuing stage by stage")
        fg, seed, lab, ok = self._run(("seeds", *key), self._seed_stage, [foreground, seeds],
                                      key)
        while not bool(ok):
            lab, ok = self._run(("more", *key), self._more_components, [lab, seed], key)
        lab, ok = self._run(("grow", *key), self._grow_stage, [lab, fg, seeds], key)
        while not bool(ok):
            lab, ok = self._run(("flood", *key), self._more_flooding, [lab, fg], key)
        rest, rest_lab, ok = self._run(("rest", *key), self._rest_stage, [lab, fg], key)
        while not bool(ok):
            rest_lab, ok = self._run(("more", *key), self._more_components, [rest_lab, rest],
                                     key)
        labels, head, sums, boxes = self._run(
            ("measure", *key), self._measure_stage, [lab, rest, rest_lab, image], key)
        ones = self._torch.ones(3, dtype=head.dtype, device=head.device)
        return labels, self._torch.cat([ones, head]), sums, boxes

    def _seed_stage(
        self, foreground: torch.Tensor, seeds: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Foreground and seed masks, seed component labels after the fixed steps, and
        whether they converged."""
        h, w, fg_thr, seed_thr = key[:4]
        fg = (foreground > fg_thr).view(1, 1, h, w)
        seed = fg & (seeds.view(1, 1, h, w) > seed_thr)
        return fg, seed, *self._fixed_components(seed)

    def _fixed_components(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Component labels of a (1, 1, H, W) mask after ``_SEED_STEPS`` steps, and whether
        they have converged."""
        torch = self._torch
        h, w = mask.shape[-2:]
        ids = self._pixel_ids(h, w, mask.device)
        lab = torch.where(mask, ids, torch.zeros_like(ids))
        for _ in range(_SEED_STEPS):
            lab = self._jump(lab, mask)
        return lab, self._components_converged(lab, mask)

    def _more_components(
        self, lab: torch.Tensor, mask: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_CHECK_EVERY`` more component steps and whether they have converged."""
        for _ in range(_CHECK_EVERY):
            lab = self._jump(lab, mask)
        return lab, self._components_converged(lab, mask)

    def _grow_stage(
        self, lab: torch.Tensor, fg: torch.Tensor, seeds: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop small seeds, flood the levels of ``1 - seeds`` with fixed steps each: the
        labels and whether the foreground reachable from seeds is flooded."""
        torch = self._torch
        h, w, _, _, min_seed, levels, _ = key
        lab = self._drop_small_seeds(lab, min_seed)
        elev = 1.0 - seeds.view(1, 1, h, w).to(torch.float32)
        for k in range(1, levels + 1):
            allowed = fg & (elev <= k / levels) if k < levels else fg
            for _ in range(_LAST_LEVEL_STEPS if k == levels else _LEVEL_STEPS):
                lab = self._flood_step(lab, allowed)
        return lab, self._flood_converged(lab, fg)

    def _more_flooding(
        self, lab: torch.Tensor, fg: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_CHECK_EVERY`` more flooding steps and whether the flood is complete."""
        for _ in range(_CHECK_EVERY):
            lab = self._flood_step(lab, fg)
        return lab, self._flood_converged(lab, fg)

    def _rest_stage(
        self, lab: torch.Tensor, fg: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Foreground without a seed: its mask, component labels after the fixed steps,
        and whether they converged."""
        rest = fg & (lab == 0)
        return rest, *self._fixed_components(rest)

    def _measure_stage(
        self, lab: torch.Tensor, rest: torch.Tensor, rest_lab: torch.Tensor,
        image: torch.Tensor, key: tuple[Any, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compaction and per-object sums with fixed shapes: labels (H, W) int32 1..n,
        ``[n, foreground px, image sum, foreground sum]`` (float64), sums (bins, 7)
        float64 and boxes (bins, 4) int64, where row i holds object i (row 0 unused)."""
        torch = self._torch
        h, w, *_, min_area = key
        n_px = h * w
        dev = lab.device
        raw = torch.where(rest, rest_lab + n_px, lab).reshape(-1)
        # compaction: renumber the labels that keep at least min_area pixels, in id order
        raw_bins = 2 * n_px + 1
        keep = self._count(raw, raw_bins) >= max(min_area, 1)
        keep[:1].fill_(False)  # a fill kernel (indexed assignment would copy from the host)
        new_id = torch.cumsum(keep.to(torch.int32), 0) * keep
        labels = new_id.index_select(0, raw.to(torch.int64)).to(torch.int32)
        # per-object sums (exact in float64: integer coordinates and camera counts)
        bins = n_px // max(min_area, 1) + 1
        slots = self._slots(labels, bins)
        pix = torch.arange(n_px, device=dev, dtype=torch.int64)
        r = torch.div(pix, w, rounding_mode="floor")
        c = pix - r * w
        values = image.reshape(-1).to(torch.float64)
        sums, boxes = self._object_sums(slots, bins + _SPARE_BINS, r, c, values)
        in_fg = labels > 0
        head = torch.stack([
            keep.sum().to(torch.float64), in_fg.sum().to(torch.float64), values.sum(),
            (values * in_fg).sum(),
        ])
        return labels.view(h, w), head, sums, boxes

    def _run(
        self, key: tuple[Any, ...], fn: Any, inputs: list[torch.Tensor], params: tuple[Any, ...]
    ) -> Any:
        """``fn(*inputs, params)``, replayed from a CUDA graph when on CUDA (captured once per
        stage, shape and parameters; a failed capture runs eagerly from then on). Outputs
        of a replay are overwritten by the next replay of the same stage."""
        if self.device.type != "cuda" or not self.graphs:
            return fn(*inputs, params)
        self._use_shape((key[1], key[2]))
        if key in self._no_graph:
            return fn(*inputs, params)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _CapturedCall(lambda *x: fn(*x, params), inputs, self.device)
            except RuntimeError as exc:
                log.warning("labels: CUDA graph capture failed (%s); running eagerly", exc)
                with self._lock:
                    if (key[1], key[2]) in self._shapes:
                        self._no_graph.add(key)
                return fn(*inputs, params)
            with self._lock:
                if (key[1], key[2]) in self._shapes:  # not dropped by the other thread since
                    self._graphs[key] = graph
        return graph(*inputs)

    def _object_sums(
        self, slots: torch.Tensor, bins: int, r: torch.Tensor, c: torch.Tensor,
        values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bin sums (bins, 7: area, Σr, Σc, Σr², Σc², Σrc, Σvalue; float64, exact for
        integer coordinates and camera counts) and boxes (bins, 4: r0, c0, r1, c1; int64)
        of pixels at rows ``r``, columns ``c`` (int64) scattered into ``slots``."""
        torch = self._torch
        dev = slots.device
        rf, cf = r.to(torch.float64), c.to(torch.float64)
        src = torch.stack([torch.ones_like(rf), rf, cf, rf * rf, cf * cf, rf * cf,
                           values.to(torch.float64)], 1)
        sums = torch.zeros((bins, 7), dtype=torch.float64, device=dev)
        sums.index_add_(0, slots, src)
        big = int(np.iinfo(np.int64).max)
        boxes = torch.stack([
            torch.full((bins,), init, dtype=torch.int64, device=dev)
            .scatter_reduce_(0, slots, x, reduce=how, include_self=True)
            for x, how, init in ((r, "amin", big), (c, "amin", big), (r, "amax", -1),
                                 (c, "amax", -1))
        ], 1)
        boxes[:, 2:] += 1
        return sums, boxes


def _percentile_of(ordered: Tensor, count: Tensor, q: float, start: Any = 0) -> Tensor:
    """The ``q`` percentile of the sorted values ``ordered[start:count]`` (``start`` and
    ``count`` may be tensors) as ``np.percentile`` computes it, without a host round trip:
    the positions are computed on the device. An empty range gives a meaningless value."""
    size = count - start
    pos = (size - 1).double() * (q / 100.0)  # float64, as np.percentile's index
    below = pos.floor().clamp_min(0)
    frac = (pos - below).to(ordered.dtype)
    first = (below.long() + start).clamp(0, ordered.numel() - 1)
    last = (first + 1).clamp_max(count - 1).clamp(0, ordered.numel() - 1)
    # index_select: a 0-d index tensor in ordered[...] would be read back to the host
    a = ordered.index_select(0, first.view(1))[0]
    b = ordered.index_select(0, last.view(1))[0]
    return _lerp(a, b, frac)


def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """``a`` + (``b`` - ``a``) ``t`` rounded as numpy's percentile rounds it (from ``b``
    where ``t`` >= 0.5), so that the device's percentiles equal the CPU's exactly."""
    diff = b - a
    return (a + diff * t).where(t < 0.5, b - diff * (1 - t))


def _outlier_free_top(
    ordered: Tensor, count: Tensor, lo: Tensor, median: Tensor, hi: Tensor, sigma: Tensor,
    step: float, high: float,
) -> Tensor:
    """``hi``, or where it is above ``outlier_level`` the ``high`` percentile of the values
    at or below that level: ``_outlier_free_range`` on the sorted values ``ordered[:count]``
    (tensors on the device, no host round trip)."""
    floor = median + OBJECT_MIN_NOISE * sigma.clamp_min(step)
    # object pixels: ordered[start:count], those above the floor (right: as flat > floor)
    start = _count_at_or_below(ordered, floor).clamp_max(count)
    reference = _percentile_of(ordered, count, 50.0, start)  # np.median of those pixels
    level = lo + OUTLIER_RATIO * (reference - lo)
    acts = ((floor > median) & (count - start >= _MIN_OBJECT_PX) & (reference > lo)
            & (hi > level))
    below = _count_at_or_below(ordered, level).where(acts, count)
    return _percentile_of(ordered, below, high)


def _count_at_or_below(ordered: Tensor, value: Tensor) -> Tensor:
    """How many of the sorted values ``ordered`` are at or below ``value`` (0-d tensors)."""
    import torch

    found: Tensor = torch.searchsorted(ordered, value.view(1).to(ordered.dtype), right=True)
    return found[0]


def _objects(
    sums: np.ndarray,
    bbox: np.ndarray,
    local_background: np.ndarray,
    *,
    shape: tuple[int, int],
    n_fg: int,
    total: float,
    fg_sum: float,
    pixel_size_um: float,
    decimals: int | None,
    saturated: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``measure_objects`` output from per-object sums (rows: objects 1..n; columns: area,
    Σr, Σc, Σr², Σc², Σrc, Σintensity), boxes (r0, c0, r1, c1), local backgrounds and
    saturated pixels (None: level unknown)."""
    n_px = shape[0] * shape[1]
    background_mean = (total - fg_sum) / (n_px - n_fg) if n_px > n_fg else None
    object_sums = ObjectSums(
        labels=np.arange(1, len(sums) + 1), area=sums[:, 0], s_r=sums[:, 1], s_c=sums[:, 2],
        s_rr=sums[:, 3], s_cc=sums[:, 4], s_rc=sums[:, 5], intensity=sums[:, 6], bbox=bbox,
        local_background=local_background, saturated=saturated,
    )
    return objects_from_sums(object_sums, shape=shape, n_fg=n_fg, background_mean=background_mean,
                             pixel_size_um=pixel_size_um, decimals=decimals)

"""Normalisation, instance labelling and measurement as torch tensor code (GPU path).

When the model runs on a CUDA GPU, copying its probability maps to the host and labelling
and measuring them on the CPU costs more than the model itself at 2048×2048 (about 100 ms
on two cores, see docs/performance.md). This module does the same work on the device,
with data-parallel operations only:

- percentile normalisation: ``torch.quantile`` on the same strided sample as
  :func:`livemask.analysis.normalize.percentile_normalize`;
- connected components (4-connectivity): iterative max-label propagation (the maximum of
  each pixel's 4-neighbourhood from shifted views, restricted to the mask);
- marker-controlled watershed: seeds grow into the foreground level by level of the
  elevation ``1 - seed probability`` (the card's ``flood_levels``, low first; inside a
  level by propagation, ties to the larger seed id), which is the CPU path's quantised
  flood done in parallel. A fixed number of steps runs first (on CUDA replayed from a
  captured CUDA graph); exact loops finish whatever has not converged. Its labels agree
  with the CPU path's (:func:`livemask.analysis.instances.labels_from_probabilities`) on
  almost every object, which ``tests/test_torch_analysis.py`` checks with the object F1;
- measurements: per-object sums with ``index_add_`` / ``scatter_reduce_`` in float64, then
  the CPU's :func:`livemask.analysis.measure.objects_from_sums` builds the same dicts.

Everything also runs on the CPU build of torch (that is how CI tests it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from livemask.analysis.measure import ObjectSums, objects_from_sums
from livemask.analysis.normalize import _MIN_SAMPLE_PX

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["TorchAnalysis"]

#: Propagation steps between two convergence checks (each check synchronises the device).
_CHECK_EVERY = 8
#: Fixed propagation steps of the captured labelling: seed components up to this many pixels
#: across, and in all flooding levels together (the reach from a seed's edge, split evenly).
_SEED_STEPS = 24
_GROW_REACH = 36

log = logging.getLogger("livemask")


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
        self, device: str | torch.device = "cuda", *, levels: int = 6, graphs: bool = True
    ) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.levels = levels
        self.graphs = graphs
        self._graphs: dict[tuple[Any, ...], _CapturedCall] = {}
        self._no_graph: set[tuple[Any, ...]] = set()
        self._pinned: dict[tuple[Any, ...], tuple[Tensor, Any]] = {}

    # ------------------------------------------------------------ input
    def upload(self, image: np.ndarray) -> torch.Tensor:
        """A 2-D camera image as a float32 tensor on the device (uint16 travels as 2 bytes)."""
        torch = self._torch
        arr = np.ascontiguousarray(image)
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
        if arr.dtype == np.uint16:  # torch has few uint16 kernels: move the bits as int16
            raw = self._to_device(arr.view(np.int16))
            return (raw.to(torch.int32) & 0xFFFF).to(torch.float32)
        if arr.dtype in (np.uint8, np.int16, np.int32, np.float32):
            return torch.from_numpy(arr).to(self.device).to(torch.float32)
        return torch.from_numpy(arr.astype(np.float32)).to(self.device)

    def _to_device(self, arr: np.ndarray) -> Tensor:
        """Host → device through a reused pinned buffer on CUDA (a fast, asynchronous copy)."""
        torch = self._torch
        if self.device.type != "cuda":
            return torch.from_numpy(arr).to(self.device)
        key = (arr.shape, arr.dtype.str)
        if key not in self._pinned:
            host = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype,
                               pin_memory=True)
            self._pinned[key] = (host, None)
        host, done = self._pinned[key]
        if done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished
        host.numpy()[...] = arr
        out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pinned[key] = (host, event)
        return out

    def normalize(
        self, image: torch.Tensor, low: float, high: float, subsample: int = 4
    ) -> torch.Tensor:
        """Percentile normalisation as ``percentile_normalize`` (same strided sample)."""
        torch = self._torch
        stride = subsample
        while stride > 1 and image.numel() // stride**2 < _MIN_SAMPLE_PX:
            stride -= 1
        sample = image[::stride, ::stride].reshape(-1)
        q = torch.tensor([low / 100.0, high / 100.0], device=image.device, dtype=torch.float32)
        lo, hi = torch.quantile(sample, q)
        span = hi - lo
        scale = torch.where(span > 0, 1.0 / span.clamp_min(1e-30), torch.zeros_like(span))
        return (image - lo) * scale

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

    def _index_dtype(self, n: int) -> torch.dtype:
        return self._torch.int32 if n < 2**31 - 1 else self._torch.int64

    def components(self, mask: torch.Tensor) -> torch.Tensor:
        """4-connected components of a 2-D bool mask: each pixel gets its component's
        largest flat index + 1 (int32; 0 outside the mask)."""
        torch = self._torch
        h, w = mask.shape
        idx = torch.arange(1, h * w + 1, device=mask.device, dtype=self._index_dtype(h * w))
        start = torch.where(mask, idx.view(h, w), torch.zeros((), dtype=idx.dtype,
                                                               device=mask.device))
        return self._converge(start, mask)

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
        parameters and semantics (the numbering order differs).

        Two stages of a fixed number of propagation steps (seed components, then flooding),
        on CUDA each replayed from a captured CUDA graph; after each, one synchronisation
        tells whether it converged, and if not (a seed longer than ``_SEED_STEPS`` px, a
        nucleus wider than the flooding reach) the exact loops continue from where it
        stopped, so the result does not depend on the step counts.
        """
        torch = self._torch
        h, w = foreground.shape
        levels = flood_levels or self.levels
        key = (h, w, float(foreground_threshold), float(seed_threshold), int(min_seed_area_px),
               int(levels))
        fg, seed, seed_lab, seed_ok = self._run(("seeds", *key), self._seed_stage,
                                                [foreground, seeds], key)
        if not bool(seed_ok):  # a seed longer than the fixed steps: go on until converged
            seed_lab = self._converge(seed_lab, seed)
        lab, grow_ok = self._run(("grow", *key), self._grow_stage, [seed_lab, fg, seeds], key)
        if not bool(grow_ok):  # an object wider than the flooding reach: finish flooding
            lab = self._flood(lab.view(1, 1, h, w), fg.view(1, 1, h, w)).view(h, w)
        rest = fg & (lab == 0)  # foreground components without a seed: one object each
        if bool(rest.any()):
            extra = self.components(rest)
            lab = torch.where(rest, extra + h * w, lab)
        return self._compact(lab, min_area_px)

    def _converge(self, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Continue max-label propagation inside ``mask`` until nothing changes."""
        torch = self._torch
        h, w = mask.shape
        m = mask.view(1, 1, h, w)
        lab = lab.view(1, 1, h, w)
        zero = torch.zeros((), dtype=lab.dtype, device=lab.device)
        while True:
            before = lab
            for _ in range(_CHECK_EVERY):
                lab = torch.where(m, self._spread(lab), zero)
            if torch.equal(lab, before):
                return lab.view(h, w)

    def _flood(self, lab: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Propagate labels into the unlabelled ``allowed`` pixels until nothing changes."""
        torch = self._torch
        while True:
            for _ in range(_CHECK_EVERY):
                near = self._spread(lab)
                lab = torch.where(allowed & (lab == 0) & (near > 0), near, lab)
            near = self._spread(lab)
            if not bool((allowed & (lab == 0) & (near > 0)).any()):
                return lab

    def _seed_stage(
        self, foreground: torch.Tensor, seeds: torch.Tensor, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed-step seed components (capturable): the foreground and seed masks, the seed
        labels (int32, 0 = none) and whether they converged."""
        torch = self._torch
        h, w, fg_thr, seed_thr, _, _ = key
        fg = (foreground > fg_thr).view(1, 1, h, w)
        seed = fg & (seeds.view(1, 1, h, w) > seed_thr)
        idx = torch.arange(1, h * w + 1, device=foreground.device,
                           dtype=self._index_dtype(h * w)).view(1, 1, h, w)
        zero = torch.zeros((), dtype=idx.dtype, device=foreground.device)
        lab = torch.where(seed, idx, zero)
        for _ in range(_SEED_STEPS):
            lab = torch.where(seed, self._spread(lab), zero)
        ok = ~(seed & (self._spread(lab) != lab)).any()
        return fg.view(h, w), seed.view(h, w), lab.view(h, w), ok

    def _grow_stage(
        self, seed_lab: torch.Tensor, fg: torch.Tensor, seeds: torch.Tensor,
        key: tuple[Any, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop small seeds, then flood the levels of ``1 - seeds`` with a fixed number
        of steps each (capturable): the labels and whether the foreground is fully flooded."""
        torch = self._torch
        h, w, _, _, min_seed, levels = key
        lab = seed_lab.view(1, 1, h, w)
        fg4 = fg.view(1, 1, h, w)
        zero = torch.zeros((), dtype=lab.dtype, device=lab.device)
        if min_seed > 1:
            flat = lab.reshape(-1).to(torch.int64)
            counts = torch.zeros(h * w + 1, dtype=torch.float32, device=lab.device)
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
            small = (counts[flat] < min_seed) & (flat > 0)
            lab = torch.where(small.view(1, 1, h, w), zero, lab)
        elev = 1.0 - seeds.view(1, 1, h, w).to(torch.float32)
        steps = max(2, _GROW_REACH // levels)
        for k in range(1, levels + 1):
            allowed = fg4 & (elev <= k / levels) if k < levels else fg4
            for _ in range(steps):
                near = self._spread(lab)
                lab = torch.where(allowed & (lab == 0) & (near > 0), near, lab)
        ok = ~(fg4 & (lab == 0) & (self._spread(lab) > 0)).any()
        return lab.view(h, w), ok

    def _run(
        self, key: tuple[Any, ...], fn: Any, inputs: list[torch.Tensor], params: tuple[Any, ...]
    ) -> Any:
        """``fn(*inputs, params)``, replayed from a CUDA graph when on CUDA (captured once per
        stage, shape and parameters; a failed capture runs eagerly from then on). Outputs
        of a replay are overwritten by the next replay of the same stage."""
        if self.device.type != "cuda" or not self.graphs or key in self._no_graph:
            return fn(*inputs, params)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _CapturedCall(lambda *x: fn(*x, params), inputs, self.device)
            except RuntimeError as exc:
                log.warning("labels: CUDA graph capture failed (%s); running eagerly", exc)
                self._no_graph.add(key)
                return fn(*inputs, params)
            self._graphs[key] = graph
        return graph(*inputs)

    def _compact(self, lab: torch.Tensor, min_area: int) -> tuple[torch.Tensor, int]:
        """Renumber labels 1..N (dropping objects smaller than ``min_area``)."""
        torch = self._torch
        ids, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
        keep = (ids > 0) & (counts >= min_area)
        new_id = torch.cumsum(keep.to(torch.int32), 0) * keep
        n = int(keep.sum())
        return new_id.to(torch.int32)[inverse], n

    # ------------------------------------------------------------ measuring
    def measure(
        self,
        labels: torch.Tensor,
        n: int,
        image: torch.Tensor,
        *,
        pixel_size_um: float = 1.0,
        decimals: int | None = 4,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``measure_objects`` output for labels 1..n on ``image`` (both on the device)."""
        torch = self._torch
        h, w = labels.shape
        flat = labels.reshape(-1).to(torch.int64)
        values = image.reshape(-1).to(torch.float64)
        n_px = h * w
        fg = flat > 0
        n_fg = int(fg.sum())
        total = float(values.sum())
        fg_sum_t = values[fg].sum() if n_fg else torch.zeros((), dtype=torch.float64)
        bg_mean = (total - float(fg_sum_t)) / (n_px - n_fg) if n_px > n_fg else None
        if n == 0 or n_fg == 0:
            return objects_from_sums(
                _empty_sums(), n_px=n_px, n_fg=n_fg, background_mean=bg_mean,
                pixel_size_um=pixel_size_um, decimals=decimals,
            )
        lab = flat[fg]
        pos = torch.nonzero(fg).reshape(-1)
        r = torch.div(pos, w, rounding_mode="floor")
        c = pos - r * w
        rf, cf = r.to(torch.float64), c.to(torch.float64)
        bins = n + 1

        def total_of(x: Tensor) -> Tensor:
            out = torch.zeros(bins, dtype=torch.float64, device=x.device)
            return out.index_add_(0, lab, x)[1:]

        def reduce(x: Tensor, how: str, init: int) -> Tensor:
            out = torch.full((bins,), init, dtype=torch.int64, device=x.device)
            return out.scatter_reduce_(0, lab, x, reduce=how, include_self=True)[1:]

        ones = torch.ones_like(rf)
        stacked = torch.stack([
            total_of(ones), total_of(rf), total_of(cf), total_of(rf * rf), total_of(cf * cf),
            total_of(rf * cf), total_of(values[fg]),
        ])
        big = np.iinfo(np.int64).max
        boxes = torch.stack([
            reduce(r, "amin", big), reduce(c, "amin", big),
            reduce(r, "amax", -1) + 1, reduce(c, "amax", -1) + 1,
        ], dim=1)
        host = stacked.cpu().numpy()
        bbox = boxes.cpu().numpy()
        present = host[0] > 0
        sums = ObjectSums(
            labels=np.flatnonzero(present) + 1, area=host[0][present], s_r=host[1][present],
            s_c=host[2][present], s_rr=host[3][present], s_cc=host[4][present],
            s_rc=host[5][present], intensity=host[6][present], bbox=bbox[present],
        )
        return objects_from_sums(
            sums, n_px=n_px, n_fg=n_fg, background_mean=bg_mean,
            pixel_size_um=pixel_size_um, decimals=decimals,
        )


def _empty_sums() -> ObjectSums:
    z = np.zeros(0)
    return ObjectSums(labels=z, area=z, s_r=z, s_c=z, s_rr=z, s_cc=z, s_rc=z, intensity=z,
                      bbox=np.zeros((0, 4)))

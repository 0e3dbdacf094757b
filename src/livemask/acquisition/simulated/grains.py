"""A virtual polished polycrystal (e.g. Al2O3) imaged in reflected light or an SEM.

The sample is a periodic (toroidal) world of grains: a Laguerre (power-weighted Voronoi)
tessellation of relaxed random seeds whose weights follow a log-normal size spread, so
grain areas vary like a real grain-growth microstructure. Everything static is computed
once in the constructor, for the whole world:

- ground-truth labels: a full tessellation, every pixel belongs to one grain
  (label = seed index + 1, persistent across fields, never 0);
- the noise-free reflectance: per-grain grey level (orientation contrast), fine texture,
  boundary grooves (a Gaussian profile around each boundary, with a per-boundary
  visibility; a fraction of boundaries is *faint*, as low-angle boundaries are), small
  dark pores, and scratches (straight or curved dark/bright lines that cross grains and
  are **not** boundaries: they never appear in the labels), blurred by the PSF.

:meth:`GrainSample.render` crops a field from the world (wrapping at its edges), adds
extra defocus blur, applies an uneven illumination fixed to the field of view
(vignetting and a tilt), then shot noise, read noise, gain and camera offset. It takes a
few milliseconds for a 512 x 512 field. Grains do not move: :meth:`GrainSample.step`
only counts.

Pure numpy/scipy: no Micro-Manager here (see ``devices.py`` for that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import label as _connected_label

from .nuclei import RenderResult

__all__ = ["GrainParams", "GrainSample", "random_grain_field", "random_grain_params"]

_CHUNK_PX = 1 << 18  # pixels per nearest-seed query chunk (bounds memory)
_U64 = np.uint64


@dataclass(frozen=True)
class GrainParams:
    """Parameters of the virtual polycrystal (lengths in pixels unless named).

    ``mean_grain_diameter_px`` is the equivalent-circle diameter of the *mean grain
    area*: the world holds ``round(H * W / (pi / 4 * d**2))`` grain seeds. Reflectance
    values are relative (1.0 = a perfect mirror); ``groove_depth`` is the fractional
    darkening at the bottom of a fully visible boundary groove (negative: bright
    boundaries, as the edge effect in SEM secondary-electron images).
    """

    world_shape_px: tuple[int, int] = (2048, 2048)
    mean_grain_diameter_px: float = 40.0
    size_sigma: float = 0.35  # log-normal spread of the grain radii
    relax_iterations: int = 8  # seed repulsion: 0 = Poisson (random) seeds
    grain_reflectance: float = 0.6
    orientation_contrast: float = 0.08  # sd of per-grain grey level (relative)
    groove_width_px: float = 1.2  # sd of the Gaussian groove profile
    groove_depth: float = 0.55
    faint_boundary_fraction: float = 0.15  # boundaries with visibility <= faint_visibility
    faint_visibility: float = 0.2  # faint boundaries: visibility uniform in [0.02, this]
    texture_amplitude: float = 0.03  # relative sd of fine polishing texture
    texture_scale_px: float = 2.0
    pores_per_mpx: float = 40.0
    pore_radius_px: float = 1.5
    pore_depth: float = 0.6
    scratches_per_mpx: float = 6.0
    scratch_width_px: float = 0.8
    scratch_amplitude: float = 0.35  # max relative darkening / brightening
    scratch_dark_fraction: float = 0.7
    scratch_length_px: float = 600.0  # mean length (exponential)
    scratch_curved_fraction: float = 0.4
    illumination_falloff: float = 0.3  # vignetting: relative loss in the field corners
    illumination_tilt: float = 0.1  # linear gradient across the field (relative)
    psf_sigma_px: float = 0.9
    defocus_sigma_px_per_um: float = 1.2
    photons_per_ms: float = 200.0  # photons per pixel per ms for reflectance 1
    read_noise_e: float = 3.0
    offset_adu: float = 100.0
    gain_adu_per_e: float = 0.5


def _hash_uniform(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per unordered pair (a, b) (splitmix64 finaliser)."""
    lo = np.minimum(a, b).astype(_U64)
    hi = np.maximum(a, b).astype(_U64)
    x = lo * _U64(0x9E3779B97F4A7C15) ^ hi * _U64(0xC2B2AE3D27D4EB4F) ^ _U64(salt)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return (x >> _U64(11)).astype(np.float64) * 2.0**-53


def _wrap_delta(d: np.ndarray, period: float) -> np.ndarray:
    return d - period * np.round(d / period)


class GrainSample:
    """A static virtual polycrystal. Not thread-safe: guard with a lock (the world does)."""

    def __init__(self, params: GrainParams | None = None, seed: int = 0) -> None:
        self.params = params or GrainParams()
        self.step_count = 0
        ss = np.random.SeedSequence(seed)
        # independent streams: changing e.g. scratch settings never changes the grains
        geo, look, scratch, noise = (np.random.default_rng(s) for s in ss.spawn(4))
        self.rng = noise
        self._salt = int(ss.generate_state(1, dtype=np.uint64)[0])
        h, w = self.params.world_shape_px
        if h < 8 or w < 8:
            raise ValueError(f"world_shape_px must be at least 8 x 8, got {(h, w)}")
        self.seeds_yx, self.radii = self._make_seeds(geo)
        self.labels, groove = self._tessellate()
        self.n_grains = int(np.unique(self.labels).size)
        self.scratches = self._scratch_field(scratch)  # relative change, 0 off scratches
        self.world = self._paint(look, groove)
        self._illum_cache: dict[tuple[int, int], np.ndarray] = {}
        self._illum_angle = float(look.uniform(0, 2 * np.pi))

    # ---------------------------------------------------------------- geometry
    def _make_seeds(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        h, w = p.world_shape_px
        n = max(2, round(h * w / (np.pi / 4 * p.mean_grain_diameter_px**2)))
        r = rng.lognormal(0.0, p.size_sigma, n)
        r *= np.sqrt(h * w / (np.pi * np.sum(r**2)))  # discs tile the world area
        pts = np.column_stack([rng.uniform(0, h, n), rng.uniform(0, w, n)])
        for _ in range(p.relax_iterations):
            tree = cKDTree(pts, boxsize=[h, w])
            pairs = tree.query_pairs(2.0 * float(r.max()), output_type="ndarray")
            if pairs.size == 0:
                break
            i, j = pairs[:, 0], pairs[:, 1]
            dy = _wrap_delta(pts[j, 0] - pts[i, 0], h)
            dx = _wrap_delta(pts[j, 1] - pts[i, 1], w)
            dist = np.hypot(dy, dx) + 1e-6
            push = np.clip(0.85 * (r[i] + r[j]) - dist, 0, None) * 0.25
            uy, ux = dy / dist * push, dx / dist * push
            np.subtract.at(pts[:, 0], i, uy)
            np.subtract.at(pts[:, 1], i, ux)
            np.add.at(pts[:, 0], j, uy)
            np.add.at(pts[:, 1], j, ux)
            pts %= (h, w)
        return pts, r

    def _tessellate(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels (power diagram of the seeds) and the groove darkening factor, per pixel.

        The power distance ``|p - s|^2 - r^2`` becomes a Euclidean one by lifting each
        seed to ``z = sqrt(r_max^2 - r^2)``, so a periodic k-d tree finds the three
        nearest cells. The distance of a pixel to the boundary between its cell ``a``
        and a neighbour ``b`` is ``(pow_b - pow_a) / (2 |s_a - s_b|)``.
        """
        p = self.params
        h, w = p.world_shape_px
        pts, r = self.seeds_yx, self.radii
        z = np.sqrt(np.maximum(r.max() ** 2 - r**2, 0.0))
        zbox = 4.0 * float(z.max()) + 1.0
        tree = cKDTree(np.column_stack([pts, z]), boxsize=[h, w, zbox])
        k = min(3, len(r))
        labels = np.empty(h * w, dtype=np.int32)
        groove = np.empty(h * w, dtype=np.float32)
        rows = max(1, _CHUNK_PX // w)
        xs = np.arange(w, dtype=np.float64) + 0.5
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            ys = np.arange(y0, y1, dtype=np.float64) + 0.5
            q = np.column_stack([np.repeat(ys, w), np.tile(xs, y1 - y0), np.zeros((y1 - y0) * w)])
            d, idx = tree.query(q, k=k)
            a = idx[:, 0]
            labels[y0 * w : y1 * w] = a + 1
            factor = np.ones(len(q), dtype=np.float64)
            for j in range(1, k):
                b = idx[:, j]
                sep = np.hypot(
                    _wrap_delta(pts[b, 0] - pts[a, 0], h), _wrap_delta(pts[b, 1] - pts[a, 1], w)
                )
                dist = (d[:, j] ** 2 - d[:, 0] ** 2) / (2.0 * np.maximum(sep, 1e-3))
                factor *= 1.0 - p.groove_depth * self._visibility(a, b) * np.exp(
                    -0.5 * (dist / max(p.groove_width_px, 1e-3)) ** 2
                )
            groove[y0 * w : y1 * w] = factor
        return labels.reshape(h, w), groove.reshape(h, w)

    def _visibility(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Groove visibility in [0, 1] of the boundary between grains ``a`` and ``b``."""
        p = self.params
        u1 = _hash_uniform(a, b, self._salt)
        u2 = _hash_uniform(a, b, self._salt ^ 0x5BD1E995)
        faint = 0.02 + (p.faint_visibility - 0.02) * u2
        strong = 0.7 + 0.3 * u2
        return np.where(u1 < p.faint_boundary_fraction, faint, strong)

    # ---------------------------------------------------------------- appearance
    def _scratch_field(self, rng: np.random.Generator) -> np.ndarray:
        """Relative intensity change of the scratches (float32, world shape)."""
        p = self.params
        h, w = p.world_shape_px
        lines = np.zeros((h, w), dtype=np.float32)
        n = int(rng.poisson(p.scratches_per_mpx * h * w / 1e6))
        for _ in range(n):
            length = float(rng.exponential(p.scratch_length_px)) + 20.0
            t = np.arange(0.0, length, 0.5)
            theta = rng.uniform(0, np.pi)
            if rng.random() < p.scratch_curved_fraction:  # arc of a large circle
                curvature = rng.choice([-1.0, 1.0]) / rng.uniform(1.0, 4.0) / length
                ang = theta + curvature * t
            else:
                ang = np.full_like(t, theta)
            step_y, step_x = np.sin(ang) * 0.5, np.cos(ang) * 0.5
            y = rng.uniform(0, h) + np.cumsum(step_y)
            x = rng.uniform(0, w) + np.cumsum(step_x)
            sign = -1.0 if rng.random() < p.scratch_dark_fraction else 1.0
            amp = sign * p.scratch_amplitude * rng.uniform(0.3, 1.0)
            lines[np.round(y).astype(int) % h, np.round(x).astype(int) % w] = amp
        if n == 0:
            return lines
        sigma = max(p.scratch_width_px, 0.3)
        out = ndimage.gaussian_filter(lines, sigma, mode="wrap")
        out *= np.float32(np.sqrt(2 * np.pi) * sigma)  # a 1-px line keeps its amplitude
        return np.clip(out, -0.95, 2.0)

    def _paint(self, rng: np.random.Generator, groove: np.ndarray) -> np.ndarray:
        """Noise-free reflectance of the whole world, blurred by the PSF (float32)."""
        p = self.params
        h, w = p.world_shape_px
        n = len(self.radii)
        grey = p.grain_reflectance * (1.0 + p.orientation_contrast * rng.standard_normal(n))
        grey = np.clip(grey, 0.02, None).astype(np.float32)
        img = grey[self.labels - 1]
        img *= groove
        if p.texture_amplitude > 0:
            tex = rng.standard_normal((h, w), dtype=np.float32)
            tex = ndimage.gaussian_filter(tex, p.texture_scale_px, mode="wrap")
            tex *= np.float32(p.texture_amplitude / (tex.std() + 1e-9))
            img *= 1.0 + tex
        n_pores = int(rng.poisson(p.pores_per_mpx * h * w / 1e6))
        if n_pores:
            yy, xx = np.mgrid[-4:5, -4:5]
            for cy, cx, rad in zip(
                rng.uniform(0, h, n_pores),
                rng.uniform(0, w, n_pores),
                rng.uniform(0.5, 1.5, n_pores) * p.pore_radius_px,
                strict=True,
            ):
                iy, ix = int(cy), int(cx)
                disc = np.exp(-0.5 * ((yy + iy - cy) ** 2 + (xx + ix - cx) ** 2) / rad**2)
                rows, cols = (yy[:, 0] + iy) % h, (xx[0] + ix) % w
                img[np.ix_(rows, cols)] *= (1.0 - p.pore_depth * disc).astype(np.float32)
        img *= 1.0 + self.scratches
        if p.psf_sigma_px > 0:
            img = ndimage.gaussian_filter(img, p.psf_sigma_px, mode="wrap", truncate=3.0)
        return np.clip(img, 0.0, None).astype(np.float32)

    def illumination(self, shape: tuple[int, int]) -> np.ndarray:
        """Uneven illumination of the field of view (max 1): vignetting and a tilt."""
        cached = self._illum_cache.get(shape)
        if cached is not None:
            return cached
        p = self.params
        y = (np.arange(shape[0], dtype=np.float32) + 0.5) / shape[0] * 2 - 1
        x = (np.arange(shape[1], dtype=np.float32) + 0.5) / shape[1] * 2 - 1
        r2 = (y[:, None] ** 2 + x[None, :] ** 2) / 2.0  # 1 in the corners
        c, s = np.cos(self._illum_angle), np.sin(self._illum_angle)
        tilt = 1.0 + 0.5 * p.illumination_tilt * (c * x[None, :] + s * y[:, None])
        field_ = (1.0 - p.illumination_falloff * r2) * tilt
        field_ = (field_ / field_.max()).astype(np.float32)
        self._illum_cache[shape] = field_
        return field_

    # ---------------------------------------------------------------- time and imaging
    def step(self) -> None:
        """Advance the time counter (grains do not move)."""
        self.step_count += 1

    def _crop_index(
        self, origin_yx_px: tuple[float, float], shape: tuple[int, int], margin: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.params.world_shape_px
        oy, ox = round(origin_yx_px[0]) - margin, round(origin_yx_px[1]) - margin
        return (
            np.arange(oy, oy + shape[0] + 2 * margin) % h,
            np.arange(ox, ox + shape[1] + 2 * margin) % w,
        )

    def render_truth(
        self, origin_yx_px: tuple[float, float], shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free reflectance (float32) and instance labels (int32) of a field.

        The origin is rounded to whole pixels; the world wraps at its edges, so a field
        larger than the world minus a grain repeats grains under one id.
        """
        rows, cols = self._crop_index(origin_yx_px, shape)
        ix = np.ix_(rows, cols)
        return self.world[ix], self.labels[ix]

    def render(
        self,
        origin_yx_px: tuple[float, float],
        shape: tuple[int, int],
        *,
        exposure_ms: float = 10.0,
        defocus_um: float = 0.0,
    ) -> RenderResult:
        """Image the field of view whose top-left corner is at ``origin_yx_px``.

        Labels are the world's grain ids (seed index + 1), so overlapping tiles share
        ids; every pixel belongs to a grain (no 0).
        """
        p, rng = self.params, self.rng
        extra = p.defocus_sigma_px_per_um * abs(defocus_um)
        margin = int(np.ceil(3 * extra)) + 1 if extra > 0.05 else 0
        rows, cols = self._crop_index(origin_yx_px, shape, margin)
        signal = self.world[np.ix_(rows, cols)]
        if margin:
            signal = ndimage.gaussian_filter(signal, extra, truncate=3.0)
            signal = signal[margin:-margin, margin:-margin]
        labels = self.labels[np.ix_(*self._crop_index(origin_yx_px, shape))]
        scale = np.float32(p.photons_per_ms * exposure_ms)
        photons = signal * self.illumination((int(shape[0]), int(shape[1])))
        photons *= scale
        noise = rng.standard_normal(photons.shape, dtype=np.float32)
        electrons = photons + np.sqrt(photons) * noise  # Poisson shot noise (Gaussian approx.)
        noise = rng.standard_normal(photons.shape, dtype=np.float32)
        electrons += np.float32(p.read_noise_e) * noise
        adu = electrons * np.float32(p.gain_adu_per_e) + np.float32(p.offset_adu)
        image = np.clip(adu, 0, 65535).astype(np.uint16)
        return RenderResult(image, labels, self.step_count, origin_yx_px, {"scale": float(scale)})


def random_grain_params(rng: np.random.Generator, shape: tuple[int, int]) -> GrainParams:
    """Widely varied sample parameters, for training data and robustness tests."""
    bright_boundaries = rng.random() < 0.15
    depth = float(rng.uniform(0.15, 0.8)) * (-1.0 if bright_boundaries else 1.0)
    return replace(
        GrainParams(),
        world_shape_px=shape,
        mean_grain_diameter_px=float(np.exp(rng.uniform(np.log(12.0), np.log(80.0)))),
        size_sigma=float(rng.uniform(0.1, 0.55)),
        relax_iterations=int(rng.integers(0, 12)),
        grain_reflectance=float(rng.uniform(0.3, 0.8)),
        orientation_contrast=float(rng.uniform(0.0, 0.25)),
        groove_width_px=float(rng.uniform(0.6, 2.5)),
        groove_depth=depth,
        faint_boundary_fraction=float(rng.uniform(0.0, 0.35)),
        faint_visibility=float(rng.uniform(0.08, 0.35)),
        texture_amplitude=float(rng.uniform(0.0, 0.1)),
        texture_scale_px=float(rng.uniform(0.8, 4.0)),
        pores_per_mpx=float(rng.uniform(0, 150)),
        pore_radius_px=float(rng.uniform(0.8, 3.0)),
        scratches_per_mpx=float(rng.choice([0.0, rng.uniform(0, 40)])),
        scratch_width_px=float(rng.uniform(0.5, 2.0)),
        scratch_amplitude=float(rng.uniform(0.05, 0.5)),
        scratch_dark_fraction=float(rng.uniform(0.3, 1.0)),
        scratch_length_px=float(rng.uniform(100, 1500)),
        illumination_falloff=float(rng.uniform(0.0, 0.6)),
        illumination_tilt=float(rng.uniform(0.0, 0.4)),
        psf_sigma_px=float(rng.uniform(0.5, 2.0)),
        photons_per_ms=float(10 ** rng.uniform(1.2, 3.0)),
        read_noise_e=float(rng.uniform(1.0, 8.0)),
        offset_adu=float(rng.uniform(0, 500)),
        gain_adu_per_e=float(rng.uniform(0.1, 2.0)),
    )


def random_grain_field(
    rng: np.random.Generator, shape: tuple[int, int] = (256, 256)
) -> tuple[np.ndarray, np.ndarray]:
    """One randomly parameterised field (uint16 image, int32 labels), for training.

    The world is exactly the field (periodic), so grains at one edge continue at the
    opposite edge; labels are relabelled into 8-connected pieces, so each grain cut by
    the field edge gets its own id (1..n, a full tessellation).
    """
    params = random_grain_params(rng, shape)
    sample = GrainSample(params, seed=int(rng.integers(2**31)))
    result = sample.render(
        (0.0, 0.0),
        shape,
        exposure_ms=float(rng.uniform(5, 50)),
        defocus_um=float(abs(rng.normal(0, 0.4))),
    )
    labels = _connected_label(result.labels, background=0, connectivity=2).astype(np.int32)
    return result.image, labels

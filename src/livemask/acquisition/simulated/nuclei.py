"""A virtual fluorescent-nuclei sample that renders camera frames with ground truth.

The sample is a periodic (toroidal) world larger than the field of view. Nuclei are
ellipses with their own brightness and texture; every :meth:`NucleiSample.step` they
drift, grow, push their neighbours apart and sometimes enter mitosis (condense,
brighten, then split into two daughters). :meth:`NucleiSample.render` images the
field of view at a stage position, exposure and focus: PSF and defocus blur, uneven
illumination, slow intensity drift, bleaching (down to a plateau where new fluorophores
replace bleached ones), Poisson shot noise, read noise and camera offset. It returns the
camera image together with the ground-truth instance labels (label = persistent nucleus
id + 1, 0 = background).

Pure numpy/scipy: no Micro-Manager here (see ``devices.py`` for that).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

_TEXTURE_SIZE = 128


@dataclass(frozen=True)
class NucleiParams:
    """Parameters of the virtual nuclei sample (lengths in pixels unless named)."""

    world_shape_px: tuple[int, int] = (2048, 2048)
    density_per_mpx: float = 480.0  # nuclei per megapixel (≈125 per 512x512 field)
    radius_px: float = 9.0
    radius_sd_px: float = 1.8
    max_aspect: float = 1.6
    brightness_sigma: float = 0.45  # log-normal spread: dim and bright nuclei in one field
    texture_amplitude: float = 0.25
    motion_px_per_step: float = 0.8
    growth_per_step: float = 0.0015
    max_size_factor: float = 1.3  # nuclei stop growing at this multiple of radius_px
    division_rate_per_step: float = 0.004
    mitosis_steps: int = 4
    max_population_factor: float = 1.6
    # chance per interphase nucleus and step to leave the sample (cell death, or out of the
    # focal plane): 0 lets the population grow to its cap, after which divisions stop (about
    # 2,000 steps at the default division rate); above 0 births and losses balance, at a
    # population of max_population × (1 − turnover / division rate)
    turnover_per_step: float = 0.0
    background: float = 0.06  # relative to a unit-brightness nucleus
    illumination_min: float = 0.55  # darkest corner of the excitation field (1.0 = brightest)
    drift_amplitude: float = 0.15  # slow intensity variation over time (fraction)
    bleach_per_step: float = 0.0015
    # signal left once bleaching and new fluorophores (protein turnover) balance: the decay
    # stops here (after ≈ 700 steps), so a long time-lapse keeps imaging live nuclei
    bleach_floor: float = 0.35
    psf_sigma_px: float = 1.3
    defocus_sigma_px_per_um: float = 1.2
    photons_per_ms: float = 25.0  # photons per pixel per ms for a unit-brightness nucleus
    read_noise_e: float = 2.5
    offset_adu: float = 100.0
    gain_adu_per_e: float = 1.0
    # appearance variety used for training (all off for the default time-lapse sample)
    shape_irregularity: float = 0.0  # amplitude of 2nd/3rd radial harmonics (lobes, kinks)
    rim_fraction: float = 0.0  # nuclei brighter at the rim than in the centre
    cluster_fraction: float = 0.0  # nuclei placed in tight clumps
    bright_fraction: float = 0.0  # small, very bright condensed nuclei (e.g. mitoses)


#: The mitoses a sample keeps in its log (and lineage) at least; at most twice as many
#: (≈ 19 MB then).
LINEAGE_KEPT = 20_000


@dataclass
class _Nuclei:
    """Structure-of-arrays state of all nuclei."""

    ids: np.ndarray
    y: np.ndarray
    x: np.ndarray
    ry: np.ndarray
    rx: np.ndarray
    theta: np.ndarray
    brightness: np.ndarray
    texture_offset: np.ndarray  # (n, 2) ints into the texture tile
    mitosis: np.ndarray  # steps left in mitosis, 0 = interphase
    shape_coef: np.ndarray  # (n, 4) radial harmonics: cos 2φ, sin 2φ, cos 3φ, sin 3φ
    rim: np.ndarray  # bool: rim-bright profile

    def __len__(self) -> int:
        return int(self.ids.size)

    def take(self, index: np.ndarray) -> _Nuclei:
        return _Nuclei(**{k: v[index] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list[_Nuclei]) -> _Nuclei:
        keys = parts[0].__dict__.keys()
        return _Nuclei(**{k: np.concatenate([p.__dict__[k] for p in parts]) for k in keys})


@dataclass(frozen=True)
class MitosisRecord:
    """Ground truth of one mitosis: which nucleus, when it started and where (world px)."""

    nucleus_id: int  # persistent id (truth label = id + 1)
    start_step: int  # first step rendered condensed and bright
    y: float  # world row of the centre at the start (not wrapped)
    x: float  # world column
    steps: int  # steps the nucleus stays mitotic before it divides


@dataclass
class RenderResult:
    """One rendered field of view."""

    image: np.ndarray  # uint16 camera counts
    labels: np.ndarray  # int32 ground truth, 0 = background
    step: int
    origin_yx_px: tuple[float, float]
    extras: dict[str, float] = field(default_factory=dict)


class NucleiSample:
    """A time-evolving virtual nuclei sample. Not thread-safe: guard with a lock."""

    def __init__(self, params: NucleiParams | None = None, seed: int = 0) -> None:
        self.params = params or NucleiParams()
        self.rng = np.random.default_rng(seed)
        self.step_count = 0
        self._next_id = 0
        p = self.params
        h, w = p.world_shape_px
        n = max(1, round(p.density_per_mpx * h * w / 1e6))
        self.max_population = round(n * p.max_population_factor)
        self.nuclei = self._spawn(n)
        self._texture = self._make_texture()
        self._illum_phase = self.rng.uniform(0, 2 * np.pi, size=4)
        self._drift_phase = float(self.rng.uniform(0, 2 * np.pi))
        self._relax(iterations=8)
        #: every mitosis started so far (ground truth for feedback experiments; the newest
        #: :data:`LINEAGE_KEPT` where more: with turnover a sample divides for ever)
        self.mitosis_log: list[MitosisRecord] = []
        #: lineage: persistent id of each daughter -> id of the nucleus it divided from
        #: (the newest :data:`LINEAGE_KEPT` pairs of daughters where more)
        self.parent_of: dict[int, int] = {}
        #: the daughters the last :meth:`step` made (ids), for whoever follows the lineage
        #: step by step
        self.new_daughters: list[int] = []

    # ------------------------------------------------------------------ state
    def _spawn(self, n: int) -> _Nuclei:
        p, rng = self.params, self.rng
        h, w = p.world_shape_px
        r = np.clip(rng.normal(p.radius_px, p.radius_sd_px, n), p.radius_px * 0.5, None)
        aspect = rng.uniform(1.0, p.max_aspect, n)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        y, x = rng.uniform(0, h, n), rng.uniform(0, w, n)
        clumped = rng.random(n) < p.cluster_fraction
        if clumped.any():  # clumps of ~6 nuclei around shared centres
            k = int(clumped.sum())
            centres = rng.uniform(0, 1, (max(1, k // 6), 2)) * [h, w]
            pick = rng.integers(0, len(centres), k)
            spread = 1.2 * p.radius_px
            y[clumped] = centres[pick, 0] + rng.normal(0, spread, k)
            x[clumped] = centres[pick, 1] + rng.normal(0, spread, k)
        brightness = rng.lognormal(0.0, p.brightness_sigma, n)
        bright = rng.random(n) < p.bright_fraction
        brightness[bright] *= rng.uniform(3.0, 8.0, int(bright.sum()))
        r[bright] *= 0.7
        return _Nuclei(
            ids=ids,
            y=y,
            x=x,
            ry=r * np.sqrt(aspect),
            rx=r / np.sqrt(aspect),
            theta=rng.uniform(0, np.pi, n),
            brightness=brightness,
            texture_offset=rng.integers(0, _TEXTURE_SIZE, (n, 2)),
            mitosis=np.zeros(n, dtype=np.int64),
            shape_coef=rng.normal(0.0, 1.0, (n, 4)) * p.shape_irregularity,
            rim=rng.random(n) < p.rim_fraction,
        )

    def _make_texture(self) -> np.ndarray:
        noise = self.rng.standard_normal((_TEXTURE_SIZE, _TEXTURE_SIZE)).astype(np.float32)
        tex = ndimage.gaussian_filter(noise, 1.5, mode="wrap")
        tex /= tex.std() + 1e-6
        return tex

    def _relax(self, iterations: int = 1) -> None:
        """Push overlapping nuclei apart (periodic world)."""
        nu = self.nuclei
        h, w = self.params.world_shape_px
        for _ in range(iterations):
            pts = np.column_stack([nu.y % h, nu.x % w])
            radius = np.maximum(nu.ry, nu.rx)
            tree = cKDTree(pts, boxsize=[h, w])
            pairs = tree.query_pairs(2.0 * float(radius.max()), output_type="ndarray")
            if pairs.size == 0:
                return
            i, j = pairs[:, 0], pairs[:, 1]
            dy = pts[j, 0] - pts[i, 0]
            dx = pts[j, 1] - pts[i, 1]
            dy -= h * np.round(dy / h)
            dx -= w * np.round(dx / w)
            dist = np.hypot(dy, dx) + 1e-6
            wanted = 0.9 * (np.sqrt(nu.ry[i] * nu.rx[i]) + np.sqrt(nu.ry[j] * nu.rx[j]))
            push = np.clip(wanted - dist, 0, None) / 2.0
            if not push.any():
                return
            uy, ux = dy / dist * push, dx / dist * push
            np.subtract.at(nu.y, i, uy)
            np.subtract.at(nu.x, i, ux)
            np.add.at(nu.y, j, uy)
            np.add.at(nu.x, j, ux)

    def step(self) -> None:
        """Advance the sample by one time step (one frame of the time-lapse)."""
        p, rng, nu = self.params, self.rng, self.nuclei
        n = len(nu)
        self.step_count += 1
        self.new_daughters = []
        moving = nu.mitosis == 0
        nu.y += rng.normal(0, p.motion_px_per_step, n) * moving
        nu.x += rng.normal(0, p.motion_px_per_step, n) * moving
        nu.theta += rng.normal(0, 0.05, n)
        size = np.sqrt(nu.ry * nu.rx)
        grow = 1.0 + p.growth_per_step * (moving & (size < p.max_size_factor * p.radius_px))
        nu.ry *= grow
        nu.rx *= grow
        # nuclei ending mitosis split into two daughters
        ending = nu.mitosis == 1
        nu.mitosis = np.maximum(nu.mitosis - 1, 0)
        if ending.any():
            self.nuclei = nu = self._divide(ending)
        if p.turnover_per_step > 0:  # (no random draw without: the same sample as before)
            leaving = (nu.mitosis == 0) & (rng.random(len(nu)) < p.turnover_per_step)
            if leaving.any():
                self.nuclei = nu = nu.take(np.flatnonzero(~leaving))
        # interphase nuclei may start mitosis: condense and brighten
        crowd = max(0.0, 1.0 - len(nu) / self.max_population)
        big = np.sqrt(nu.ry * nu.rx) > p.radius_px * 0.9
        start = (nu.mitosis == 0) & big & (rng.random(len(nu)) < p.division_rate_per_step * crowd)
        if start.any():
            nu.mitosis[start] = p.mitosis_steps
            nu.ry[start] *= 0.75
            nu.rx[start] *= 0.75
            nu.brightness[start] *= 1.8
            for k in np.flatnonzero(start):
                self.mitosis_log.append(
                    MitosisRecord(
                        int(nu.ids[k]), self.step_count, float(nu.y[k]), float(nu.x[k]),
                        p.mitosis_steps,
                    )
                )
        self._relax(iterations=1)
        self._trim_lineage()

    def _trim_lineage(self) -> None:
        """Keep the newest :data:`LINEAGE_KEPT` mitoses (and their daughters' parents) once
        twice that many are held: a long run with turnover grew by 2.6 MB every 2,000 steps
        (≈ 45 MB an hour at 10 frames/s)."""
        if len(self.mitosis_log) > 2 * LINEAGE_KEPT:
            del self.mitosis_log[:-LINEAGE_KEPT]
        if len(self.parent_of) > 4 * LINEAGE_KEPT:
            self.parent_of = dict(list(self.parent_of.items())[-2 * LINEAGE_KEPT:])

    def _divide(self, ending: np.ndarray) -> _Nuclei:
        nu = self.nuclei
        parents = nu.take(np.flatnonzero(ending))
        keep = nu.take(np.flatnonzero(~ending))
        k = len(parents)
        daughters = []
        for sign in (-1.0, 1.0):
            d = parents.take(np.arange(k))
            d.ids = np.arange(self._next_id, self._next_id + k, dtype=np.int64)
            self._next_id += k
            # separate along the long axis; each daughter has half the area, normal brightness
            long_r = np.maximum(d.ry, d.rx)
            d.y = d.y + sign * 0.8 * long_r * np.cos(d.theta)
            d.x = d.x + sign * 0.8 * long_r * np.sin(d.theta)
            d.ry = d.ry * (1 / 0.75) / np.sqrt(2)
            d.rx = d.rx * (1 / 0.75) / np.sqrt(2)
            d.brightness = d.brightness / 1.8 * self.rng.uniform(0.85, 1.15, k)
            d.texture_offset = self.rng.integers(0, _TEXTURE_SIZE, (k, 2))
            d.mitosis = np.zeros(k, dtype=np.int64)
            self.parent_of.update(zip(d.ids.tolist(), parents.ids.tolist(), strict=True))
            self.new_daughters.extend(d.ids.tolist())
            daughters.append(d)
        return _Nuclei.concat([keep, *daughters])

    def mitotic_nuclei(self) -> list[dict[str, float]]:
        """Nuclei in mitosis now: ``id``, world ``y``/``x`` (px) and ``steps_left``."""
        nu = self.nuclei
        return [
            {
                "id": int(nu.ids[k]),
                "y": float(nu.y[k]),
                "x": float(nu.x[k]),
                "steps_left": int(nu.mitosis[k]),
            }
            for k in np.flatnonzero(nu.mitosis > 0)
        ]

    # -------------------------------------------------------------- rendering
    def render_truth(
        self, origin_yx_px: tuple[float, float], shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free object intensities (float32) and instance labels (int32) of a field."""
        nu = self.nuclei
        h, w = self.params.world_shape_px
        fh, fw = shape
        oy, ox = origin_yx_px
        # positions relative to the field origin, wrapped to the periodic world
        dy = (nu.y - oy) % h
        dx = (nu.x - ox) % w
        dy = np.where(dy > h - 3 * nu.ry.max() - 2, dy - h, dy)
        dx = np.where(dx > w - 3 * nu.rx.max() - 2, dx - w, dx)
        reach = np.maximum(nu.ry, nu.rx) + 1
        visible = (dy + reach > 0) & (dy - reach < fh) & (dx + reach > 0) & (dx - reach < fw)
        signal = np.zeros(shape, dtype=np.float32)
        labels = np.zeros(shape, dtype=np.int32)
        tex = self._texture
        amp = self.params.texture_amplitude
        for k in np.flatnonzero(visible):
            cy, cx, r = dy[k], dx[k], reach[k]
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, fh)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, fw)
            if y0 >= y1 or x0 >= x1:
                continue
            yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
            xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
            c, s = np.cos(nu.theta[k]), np.sin(nu.theta[k])
            u = (c * yy + s * xx) / nu.ry[k]
            v = (-s * yy + c * xx) / nu.rx[k]
            rr = u * u + v * v
            coef = nu.shape_coef[k]
            if coef.any():  # lobed outline: radius varies with the angle
                phi = np.arctan2(v, u)
                f = 1.0 + coef[0] * np.cos(2 * phi) + coef[1] * np.sin(2 * phi)
                f += coef[2] * np.cos(3 * phi) + coef[3] * np.sin(3 * phi)
                rr = rr / np.clip(f, 0.5, 1.5) ** 2
            inside = rr <= 1.0
            if not inside.any():
                continue
            ty = (np.arange(y0, y1) - int(cy) + nu.texture_offset[k, 0]) % _TEXTURE_SIZE
            tx = (np.arange(x0, x1) - int(cx) + nu.texture_offset[k, 1]) % _TEXTURE_SIZE
            texture = tex[np.ix_(ty, tx)]
            radial = (0.55 + 0.45 * rr) if nu.rim[k] else (1.0 - 0.35 * rr)
            profile = nu.brightness[k] * radial * (1.0 + amp * texture)
            sub_s = signal[y0:y1, x0:x1]
            sub_l = labels[y0:y1, x0:x1]
            sub_s[inside] = np.clip(profile[inside], 0.05, None)
            sub_l[inside] = int(nu.ids[k]) + 1
        return signal, labels

    def illumination(self, origin_yx_px: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
        """Smooth, periodic excitation field in [illumination_min, 1] over the field."""
        h, w = self.params.world_shape_px
        ph = self._illum_phase
        ys = (np.arange(shape[0]) + origin_yx_px[0]) * (2 * np.pi / h)
        xs = (np.arange(shape[1]) + origin_yx_px[1]) * (2 * np.pi / w)
        fy = 0.5 + 0.3 * np.cos(ys + ph[0]) + 0.2 * np.cos(2 * ys + ph[1])
        fx = 0.5 + 0.3 * np.cos(xs + ph[2]) + 0.2 * np.cos(2 * xs + ph[3])
        field_ = np.outer(fy, fx).astype(np.float32)  # in [0, 1]
        lo = self.params.illumination_min
        return np.float32(lo) + np.float32(1 - lo) * field_

    def render(
        self,
        origin_yx_px: tuple[float, float],
        shape: tuple[int, int],
        *,
        exposure_ms: float = 10.0,
        defocus_um: float = 0.0,
        bleach_steps: int | None = None,
        haze: np.ndarray | None = None,
    ) -> RenderResult:
        """Image the field of view whose top-left corner is at ``origin_yx_px``.

        ``haze`` (float32, the field's shape) is added light from out-of-focus objects that
        are not in the ground truth.
        """
        p, rng = self.params, self.rng
        signal, labels = self.render_truth(origin_yx_px, shape)
        sigma = float(np.hypot(p.psf_sigma_px, p.defocus_sigma_px_per_um * abs(defocus_um)))
        blurred = ndimage.gaussian_filter(signal, sigma, mode="nearest", truncate=3.0)
        if haze is not None:
            blurred += haze
        steps = self.step_count if bleach_steps is None else bleach_steps
        drift = 1.0 + p.drift_amplitude * np.sin(
            2 * np.pi * self.step_count / 57.0 + self._drift_phase
        )
        bleached = max(float(np.exp(-p.bleach_per_step * steps)), p.bleach_floor)
        scale = p.photons_per_ms * exposure_ms * bleached * drift
        photons = (blurred + np.float32(p.background)) * self.illumination(origin_yx_px, shape)
        photons *= np.float32(scale)
        noise = rng.standard_normal(shape, dtype=np.float32)
        electrons = photons + np.sqrt(photons) * noise  # Poisson shot noise (Gaussian approx.)
        electrons += np.float32(p.read_noise_e) * rng.standard_normal(shape, dtype=np.float32)
        adu = electrons * np.float32(p.gain_adu_per_e) + np.float32(p.offset_adu)
        image = np.clip(adu, 0, 65535).astype(np.uint16)
        return RenderResult(image, labels, self.step_count, origin_yx_px, {"scale": float(scale)})


def random_params(rng: np.random.Generator, shape: tuple[int, int]) -> NucleiParams:
    """Widely varied sample parameters, for training data and robustness tests."""
    radius = float(np.exp(rng.uniform(np.log(4.0), np.log(18.0))))
    return replace(
        NucleiParams(),
        world_shape_px=shape,
        density_per_mpx=float(rng.uniform(0.15, 1.1) * 480.0 * (9.0 / radius) ** 2),
        radius_px=radius,
        radius_sd_px=radius * float(rng.uniform(0.05, 0.25)),
        max_aspect=float(rng.uniform(1.0, 2.0)),
        brightness_sigma=float(rng.uniform(0.1, 0.7)),
        texture_amplitude=float(rng.uniform(0.0, 0.5)),
        background=float(rng.uniform(0.0, 0.3)),
        illumination_min=float(rng.uniform(0.3, 1.0)),
        psf_sigma_px=float(rng.uniform(0.6, 2.5)),
        photons_per_ms=float(10 ** rng.uniform(0.3, 2.0)),
        read_noise_e=float(rng.uniform(1.0, 8.0)),
        offset_adu=float(rng.uniform(0, 500)),
        gain_adu_per_e=float(rng.uniform(0.5, 4.0)),
        shape_irregularity=float(rng.choice([0.0, rng.uniform(0.0, 0.15)])),
        rim_fraction=float(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.6)])),
        cluster_fraction=float(rng.choice([0.0, rng.uniform(0.2, 0.8)])),
        bright_fraction=float(rng.choice([0.0, rng.uniform(0.0, 0.08)])),
    )


def random_field(
    rng: np.random.Generator, shape: tuple[int, int] = (256, 256)
) -> tuple[np.ndarray, np.ndarray]:
    """One randomly parameterised field (image, labels), for training and evaluation."""
    params = random_params(rng, shape)
    sample = NucleiSample(params, seed=int(rng.integers(2**31)))
    for _ in range(int(rng.integers(0, 30))):
        sample.step()
    haze = None
    if rng.random() < 0.3:  # diffuse light from far out-of-focus planes: no labels
        other = NucleiSample(params, seed=int(rng.integers(2**31)))
        light, _ = other.render_truth((0.0, 0.0), shape)
        haze = ndimage.gaussian_filter(light, float(rng.uniform(8.0, 16.0))) * rng.uniform(0.1, 0.5)
    result = sample.render(
        (0.0, 0.0),
        shape,
        exposure_ms=float(rng.uniform(5, 50)),
        defocus_um=float(abs(rng.normal(0, 0.6))),
        bleach_steps=int(rng.integers(0, 300)),
        haze=haze,
    )
    image = result.image
    if rng.random() < 0.3:  # 8-bit export, often with saturated highlights and a gamma
        lo = float(np.percentile(image, 0.5))
        hi = float(np.percentile(image, rng.uniform(98.0, 100.0)))
        x = np.clip((image - lo) / max(hi - lo, 1.0), 0, 1) ** rng.uniform(0.7, 1.4)
        image = np.round(x * rng.uniform(60, 255)).astype(np.uint8)
    return image, result.labels

"""How well each object's background-corrected signal matches the simulator's truth.

On simulated nuclei fields (uneven excitation, background and camera offset) every
ground-truth nucleus' integrated intensity is corrected two ways: with its own
``local_background`` (``corrected_intensity``) and with the frame's ``background_mean``.
Both are compared with its true signal: the noise-free light of the nucleus alone (its own
signal blurred by the PSF on its own, times the excitation field, exposure and gain) summed
over its mask. The errors against all the noise-free light in the mask (neighbours' blurred
light spilling in included, the truth used before session 19) are reported too. Truth
labels are used, so only the measurement is judged, not the segmentation.

    .venv/bin/python benchmarks/local_background.py [--fields 8] [--illumination-min 0.55]
        [--background 0.06]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from scipy import ndimage

from livemask.acquisition.simulated.nuclei import NucleiParams, NucleiSample
from livemask.analysis.measure import measure_objects

TRUNCATE = 3.0  # the simulator's PSF: gaussian_filter(..., truncate=3.0)
KEYS = ("local_background", "frame_background",
        "local_background_all_light", "frame_background_all_light")


def own_light(signal: np.ndarray, labels: np.ndarray, sigma: float,
              gain: np.ndarray | float = 1.0) -> dict[int, float]:
    """Each label's own signal, blurred alone (nothing outside it), times ``gain`` (an array
    of the field's shape or a number), summed over its mask: label -> light."""
    gain = np.broadcast_to(np.asarray(gain, dtype=np.float64), labels.shape)
    pad = int(TRUNCATE * sigma + 0.5) + 1
    out: dict[int, float] = {}
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        sl = tuple(slice(max(b.start - pad, 0), b.stop + pad) for b in box)
        mask = labels[sl] == k
        alone = ndimage.gaussian_filter(np.where(mask, signal[sl], 0.0).astype(np.float64),
                                        sigma, mode="constant", truncate=TRUNCATE)
        out[k] = float((alone * gain[sl])[mask].sum())
    return out


def all_light(signal: np.ndarray, labels: np.ndarray, sigma: float,
              gain: np.ndarray | float = 1.0) -> dict[int, float]:
    """The whole field blurred as the camera sees it, times ``gain``, summed over each mask
    (a neighbour's light spilling into a mask counts): label -> light."""
    blurred = ndimage.gaussian_filter(signal, sigma, mode="nearest", truncate=TRUNCATE)
    ids = np.arange(1, int(labels.max()) + 1)
    sums = ndimage.sum_labels(blurred * gain, labels, ids)
    return {int(k): float(v) for k, v in zip(ids, sums, strict=True)}


def field_errors(seed: int, params: NucleiParams, shape: tuple[int, int]) -> dict[str, list[float]]:
    """Relative errors of both corrections for every nucleus of one field not cut by its
    edge (a cut nucleus' blurred light comes partly from outside the field), against each
    nucleus' own light (``local_background``, ``frame_background``) and against all the
    light in its mask (``..._all_light``)."""
    sample = NucleiSample(params, seed=seed)
    origin = (float(seed * 97 % 1024), float(seed * 211 % 1024))
    result = sample.render(origin, shape)
    signal, labels = sample.render_truth(origin, shape)
    gain = (sample.illumination(origin, shape).astype(np.float64) * result.extras["scale"]
            * params.gain_adu_per_e)
    own = own_light(signal, labels, params.psf_sigma_px, gain)
    every = all_light(signal, labels, params.psf_sigma_px, gain)
    objects, summary = measure_objects(labels, result.image, decimals=None)
    errors: dict[str, list[float]] = {key: [] for key in KEYS}
    for o in objects:
        truths = {"": own.get(o["label"], 0.0), "_all_light": every[o["label"]]}
        if o["touches_edge"] or min(truths.values()) <= 0 or o["corrected_intensity"] is None:
            continue
        frame = o["integrated_intensity"] - summary["background_mean"] * o["area_px"]
        for suffix, true in truths.items():
            errors[f"local_background{suffix}"].append(abs(o["corrected_intensity"] - true) / true)
            errors[f"frame_background{suffix}"].append(abs(frame - true) / true)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--illumination-min", type=float, default=0.55,
                        help="darkest excitation in the field (1.0 = even)")
    parser.add_argument("--background", type=float, default=0.06,
                        help="background light relative to a unit-brightness nucleus")
    args = parser.parse_args()
    params = replace(NucleiParams(), illumination_min=args.illumination_min,
                     background=args.background)
    pooled: dict[str, list[float]] = {key: [] for key in KEYS}
    for seed in range(args.fields):
        for key, values in field_errors(seed, params, (args.size, args.size)).items():
            pooled[key].extend(values)
    report = {
        "fields": args.fields, "size": args.size, "illumination_min": args.illumination_min,
        "background": args.background,
        "nuclei": len(pooled["local_background"]),
        **{f"{key}_relative_error": {
            "median": round(float(np.median(v)), 4),
            "p90": round(float(np.percentile(v, 90)), 4),
        } for key, v in pooled.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

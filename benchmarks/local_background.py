"""How well each object's background-corrected signal matches the simulator's truth.

On simulated nuclei fields (uneven excitation, background and camera offset) every
ground-truth nucleus' integrated intensity is corrected two ways: with its own
``local_background`` (``corrected_intensity``) and with the frame's ``background_mean``.
Both are compared with its true signal: the noise-free light of the nucleus alone (blurred
by the PSF, times the excitation field, exposure and gain) summed over its mask. Truth
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


def field_errors(seed: int, params: NucleiParams, shape: tuple[int, int]) -> dict[str, list[float]]:
    """Relative errors of both corrections for every nucleus of one field not cut by its
    edge (a cut nucleus' blurred light comes partly from outside the field)."""
    sample = NucleiSample(params, seed=seed)
    origin = (float(seed * 97 % 1024), float(seed * 211 % 1024))
    result = sample.render(origin, shape)
    signal, labels = sample.render_truth(origin, shape)
    blurred = ndimage.gaussian_filter(signal, params.psf_sigma_px, mode="nearest", truncate=3.0)
    clean = blurred * sample.illumination(origin, shape) * result.extras["scale"]
    ids = np.arange(1, labels.max() + 1)
    truth = ndimage.sum_labels(clean * params.gain_adu_per_e, labels, ids)
    objects, summary = measure_objects(labels, result.image, decimals=None)
    errors: dict[str, list[float]] = {"local_background": [], "frame_background": []}
    for o in objects:
        true = float(truth[o["label"] - 1])
        if o["touches_edge"] or true <= 0 or o["corrected_intensity"] is None:
            continue
        frame = o["integrated_intensity"] - summary["background_mean"] * o["area_px"]
        errors["local_background"].append(abs(o["corrected_intensity"] - true) / true)
        errors["frame_background"].append(abs(frame - true) / true)
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
    pooled: dict[str, list[float]] = {"local_background": [], "frame_background": []}
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

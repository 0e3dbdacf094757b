"""A grains tile scan on the simulated microscope, its live statistics against the truth's.

Runs the service on a grains config (default ``configs/simulated-grains.yaml``: 16 tiles of
512², seed 0) in synchronized mode with the simulator's ground truth on, pools the truth
labels of the same tiles the same way (``CumulativeGrainStats``, by stage position), and
prints both cumulative statistics and the live value's error as JSON:

    .venv/bin/python benchmarks/grain_scan.py [--config configs/simulated-grains.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
from pathlib import Path
from typing import Any

from livemask.analysis.grains import CumulativeGrainStats
from livemask.config import load_config
from livemask.service.app import Service
from livemask.service.frames import Frame

ROOT = Path(__file__).resolve().parent.parent

#: The cumulative statistics compared (relative error, except for the G numbers).
COMPARED = ("mean_area_um2", "median_area_um2", "mean_area_planimetric_um2",
            "mean_equivalent_diameter_um", "mean_intercept_um")
G_NUMBERS = ("astm_g_planimetric", "astm_g_intercept")


class _Tiles:
    """A frame sink that pools each analysed frame's truth labels."""

    def __init__(self, pixel_size_um: float) -> None:
        self.pixel_size_um = pixel_size_um
        self.truth = CumulativeGrainStats()
        self.live: dict[str, Any] | None = None

    def on_frame(self, frame: Frame) -> None:
        if frame.grains is None or frame.truth is None:
            return
        x, y = frame.position.get("x_um"), frame.position.get("y_um")
        centre = (x, y) if x is not None and y is not None else None
        self.truth.add(frame.truth, self.pixel_size_um, centre_um=centre)
        self.live = frame.grains["cumulative"]


async def scan(config: Path) -> dict[str, Any]:
    """Run the config's scan to its end; live and truth statistics and the errors."""
    cfg = load_config(config)
    cfg.simulation.truth = True
    cfg.acquisition.autostart = False
    cfg.acquisition.mode = "synchronized"
    cfg.publish.pub_address = "tcp://127.0.0.1:*"
    cfg.publish.control_address = "tcp://127.0.0.1:*"
    cfg.dashboard.enabled = False
    cfg.record.enabled = False
    async with Service(cfg) as svc:
        tiles = _Tiles(svc.pixel_size_um)
        svc.pipeline.sinks.append(tiles)
        svc.start_acquisition(None)
        while svc.acquiring or svc.pipeline.in_flight:
            await asyncio.sleep(0.05)
    assert tiles.live is not None, "no grain tile was analysed"
    truth = tiles.truth.summary()
    errors: dict[str, float | None] = {}
    for key in COMPARED:
        live, true = tiles.live[key], truth[key]
        errors[key] = None if live is None or not true else round((live - true) / true, 4)
    for key in G_NUMBERS:
        live, true = tiles.live[key], truth[key]
        errors[key] = None if live is None or true is None else round(live - true, 3)
    return {
        "config": str(config),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "tiles": tiles.live["tiles"],
        "tiles_overlapping": tiles.live["tiles_overlapping"],
        "live": {k: tiles.live[k] for k in (*COMPARED, *G_NUMBERS, "count_inside")},
        "truth": {k: truth[k] for k in (*COMPARED, *G_NUMBERS, "count_inside")},
        "error": errors,  # relative for sizes, live − truth for the G numbers
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "simulated-grains.yaml")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(scan(args.config)), indent=2))


if __name__ == "__main__":
    main()

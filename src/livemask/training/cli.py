"""``livemask train``: reproduce a shipped model from the simulator."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from livemask.training.output import check_output_folder, shipped_settings, staged_output
from livemask.training.train import TrainSettings, export_onnx, train_unet

log = logging.getLogger("livemask")


def train_model(
    out: Path,
    settings: TrainSettings,
    *,
    eval_images: tuple[int, int] = (20, 60),
    force: bool = False,
) -> Path:
    """Train the U-Net of ``settings.task``; export ``TASK.onnx`` and its card in ``out``.

    Everything is written to a temporary folder in ``out`` and moved into place at the end,
    so an interrupted run leaves ``out`` as it was. ``out`` may be the shipped models folder
    only with ``force``. The card takes its version, normalisation and post-processing from
    the shipped card of the task.
    """
    from livemask.evaluation import write_card, write_card_metrics
    from livemask.inference.models import load_model_card

    out = check_output_folder(out, force=force)
    task = settings.task
    shipped = shipped_settings(task)
    t0 = time.perf_counter()
    run = train_unet(settings)
    minutes = (time.perf_counter() - t0) / 60
    n_params = sum(p.numel() for p in run.net.parameters())
    card = nuclei_card(settings, n_params, minutes)
    card["training"].update(iterations_done=run.iterations_done, stopped_by=run.stopped_by)
    if task == "grains":
        card.update(name="grains", task="grains", file="grains.onnx", outputs=["boundary"])
        card["training"]["data"] = (
            "livemask.acquisition.simulated.grains.random_grain_field, 256x256"
        )
    card.update(shipped)
    with staged_output(out) as stage:
        export_onnx(run.net, stage / f"{task}.onnx")
        staged_card = stage / f"{task}.yaml"
        write_card(staged_card, card)
        metrics = write_card_metrics(staged_card, *eval_images)
        assert load_model_card(staged_card)
    card_path = out / f"{task}.yaml"
    log.info("wrote %s: %s", card_path, metrics)
    return card_path


def nuclei_card(settings: TrainSettings, n_parameters: int, minutes: float) -> dict[str, Any]:
    """The model card (as a dict, metrics still empty) of a trained nuclei U-Net."""
    return {
        "name": "nuclei",
        "version": "0.1",
        "task": "nuclei",
        "file": "nuclei.onnx",
        "architecture": f"U-Net, {len(settings.channels)} levels "
        f"({'/'.join(map(str, settings.channels))} channels), BatchNorm, "
        f"{n_parameters} parameters",
        "input_name": "image",
        "output_name": "probabilities",
        "outputs": ["foreground", "seeds"],
        "size_multiple": 2 ** (len(settings.channels) - 1),
        "normalization": {"kind": "percentile", "low": 1.0, "high": 99.8},
        "postprocessing": {
            "method": "seeded-watershed",
            "foreground_threshold": 0.5,
            "seed_threshold": 0.5,
            "min_area_px": 20,
        },
        "training": {
            **json.loads(json.dumps(settings.__dict__)),
            "minutes": round(minutes, 1),
            "data": "livemask.acquisition.simulated.nuclei.random_field, 256x256",
        },
        "metrics": {},
    }

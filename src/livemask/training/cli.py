"""``livemask train``: reproduce a shipped model from the simulator."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from livemask.training.train import TrainSettings, export_onnx, train_unet

log = logging.getLogger("livemask")


def train_nuclei(out: Path, settings: TrainSettings) -> Path:
    """Train, export ``nuclei.onnx`` and write its card ``nuclei.yaml`` in ``out``."""
    from livemask.evaluation import evaluate, live_holdout, varied_holdout
    from livemask.inference.models import load_model_card
    from livemask.offline import load_segmenter

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net = train_unet(settings)
    minutes = (time.perf_counter() - t0) / 60
    export_onnx(net, out / "nuclei.onnx")
    card = {
        "name": "nuclei",
        "version": "0.1",
        "task": "nuclei",
        "file": "nuclei.onnx",
        "architecture": f"U-Net, {len(settings.channels)} levels "
        f"({'/'.join(map(str, settings.channels))} channels), BatchNorm, "
        f"{sum(p.numel() for p in net.parameters())} parameters",
        "input_name": "image",
        "output_name": "probabilities",
        "outputs": ["foreground", "seeds"],
        "size_multiple": 2 ** (len(settings.channels) - 1),
        "normalization": {"kind": "percentile", "low": 1.0, "high": 99.8},
        "postprocessing": {"method": "seeded-watershed", "foreground_threshold": 0.5,
                           "seed_threshold": 0.5, "min_area_px": 20},
        "training": {**json.loads(json.dumps(settings.__dict__)), "minutes": round(minutes, 1),
                     "data": "livemask.acquisition.simulated.nuclei.random_field, 256x256"},
        "metrics": {},
    }
    card_path = out / "nuclei.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    seg = load_segmenter(str(card_path))
    live = evaluate(seg, live_holdout(20), "live").as_dict()
    varied = evaluate(seg, varied_holdout(60), "varied").as_dict()
    card["metrics"] = {"f1_iou50": live["f1_iou50"], "simulator_live": live,
                       "simulator_varied": varied}
    card_path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    log.info("wrote %s: %s", card_path, card["metrics"])
    assert load_model_card(card_path)
    return card_path

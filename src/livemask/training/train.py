"""Train the nuclei U-Net on simulator fields and export it to ONNX (CPU, torch)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from livemask.acquisition.simulated.grains import random_grain_field
from livemask.acquisition.simulated.nuclei import random_field
from livemask.analysis.normalize import percentile_normalize
from livemask.training.targets import boundary_targets, targets_from_labels
from livemask.training.unet import ProbabilityModel, UNet

log = logging.getLogger("livemask")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run."""

    iterations: int = 7000
    max_minutes: float = 40.0
    batch_size: int = 12
    crop_px: int = 128
    field_px: int = 256
    pool_size: int = 384
    refresh_every: int = 100
    refresh_fraction: float = 0.25
    learning_rate: float = 3e-3
    channels: tuple[int, ...] = (8, 16, 32, 64)
    seed: int = 0
    threads: int = 2
    task: str = "nuclei"  # nuclei: (foreground, seeds); grains: (boundary,)

    @property
    def out_channels(self) -> int:
        """Model outputs for the task."""
        return 1 if self.task == "grains" else 2


def _make_example(
    rng: np.random.Generator, field_px: int, task: str
) -> tuple[np.ndarray, np.ndarray]:
    if task == "grains":
        image, labels = random_grain_field(rng, (field_px, field_px))
        return percentile_normalize(image).astype(np.float32), boundary_targets(labels)
    image, labels = random_field(rng, (field_px, field_px))
    return percentile_normalize(image).astype(np.float32), targets_from_labels(labels)


class FieldPool:
    """A pool of rendered fields, partly re-rendered as training goes on."""

    def __init__(self, rng: np.random.Generator, size: int, field_px: int, task: str) -> None:
        self.rng, self.field_px, self.task = rng, field_px, task
        pairs = [_make_example(rng, field_px, task) for _ in range(size)]
        self.images = np.stack([p[0] for p in pairs])
        self.targets = np.stack([p[1] for p in pairs])

    def refresh(self, fraction: float) -> None:
        n = max(1, int(len(self.images) * fraction))
        for i in self.rng.choice(len(self.images), n, replace=False):
            self.images[i], self.targets[i] = _make_example(self.rng, self.field_px, self.task)

    def batch(self, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng
        xs, ys = [], []
        for i in rng.integers(0, len(self.images), size):
            oy, ox = rng.integers(0, self.field_px - crop + 1, 2)
            x = self.images[i, oy : oy + crop, ox : ox + crop]
            y = self.targets[i, :, oy : oy + crop, ox : ox + crop]
            k = int(rng.integers(4))
            x, y = np.rot90(x, k), np.rot90(y, k, axes=(1, 2))
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, :, ::-1]
            # robustness to imperfect normalisation: random contrast and offset
            x = x * rng.uniform(0.5, 1.5) + rng.uniform(-0.15, 0.15)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)) + 1)
    return bce + dice.mean()


@dataclass(frozen=True)
class TrainRun:
    """A trained network and how its training ended."""

    net: UNet
    iterations_done: int
    stopped_by: str  # "iterations" (all of them ran) or "time budget"


def train_unet(settings: TrainSettings) -> TrainRun:
    """Train a U-Net on simulator fields; stops at the iteration or time budget.

    The time budget (``max_minutes``) includes rendering the field pool.
    """
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(settings.seed)
    t0 = time.perf_counter()
    pool = FieldPool(rng, settings.pool_size, settings.field_px, settings.task)
    log.info("rendered %d training fields in %.1f s", settings.pool_size, time.perf_counter() - t0)
    net = UNet(settings.channels, out_channels=settings.out_channels)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.learning_rate, total_steps=settings.iterations, pct_start=0.1
    )
    deadline = t0 + settings.max_minutes * 60
    net.train()
    running = 0.0
    done, stopped_by = 0, "iterations"
    for it in range(settings.iterations):
        if it and it % settings.refresh_every == 0:
            pool.refresh(settings.refresh_fraction)
        x, y = pool.batch(settings.batch_size, settings.crop_px)
        loss = _loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = it + 1
        value = float(loss.detach())
        running = 0.95 * running + 0.05 * value if it else value
        if it % 50 == 0:
            log.info("iter %d loss %.4f (%.0f s)", it, running, time.perf_counter() - t0)
        if time.perf_counter() > deadline and done < settings.iterations:
            stopped_by = "time budget"
            log.warning(
                "time budget (%g min) reached after %d of %d iterations; the learning-rate "
                "schedule was cut short (raise --minutes or lower --iterations)",
                settings.max_minutes, done, settings.iterations,
            )
            break
    net.eval()
    return TrainRun(net, done, stopped_by)


def export_onnx(net: UNet, path: Path) -> None:
    """Export ``net`` (with a sigmoid) to ONNX with dynamic batch, height and width."""
    model = ProbabilityModel(net).eval()
    dummy = torch.zeros(1, 1, 256, 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                      "probabilities": {0: "batch", 2: "height", 3: "width"}},
        opset_version=17,
        dynamo=False,
    )

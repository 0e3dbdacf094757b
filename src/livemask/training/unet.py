"""A small U-Net for 2-D instance segmentation (foreground + seed maps)."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``len(channels)`` levels; input (N,1,H,W) with H, W divisible by 2**(levels-1).

    ``forward`` returns logits (N, out_channels, H, W); ``probabilities`` applies a sigmoid and is
    what gets exported to ONNX.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), out_channels: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.down = nn.ModuleList()
        cin = 1
        for c in channels:
            self.down.append(_block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for c_skip, c_deep in zip(reversed(channels[:-1]), reversed(channels[1:]), strict=True):
            self.upconv.append(nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2))
            self.up.append(_block(2 * c_skip, c_skip))
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = upconv(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


class ProbabilityModel(nn.Module):
    """Wraps a U-Net so that the exported graph outputs probabilities in [0, 1]."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))

"""A tiny conditional noise predictor for tests that should not depend on the U-Net."""

from __future__ import annotations

from torch import Tensor, nn


class ToyNet(nn.Module):
    """eps(x, t, y) = conv(x) + e_y + e_t with a null label row at index num_classes."""

    def __init__(self, num_classes: int = 4, channels: int = 1, T: int = 1000) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.null_label = num_classes
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, channels)
        self.time = nn.Embedding(T, channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.conv(x) + self.label(y)[:, :, None, None] + self.time(t)[:, :, None, None]

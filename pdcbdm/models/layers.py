"""Building blocks of the DDPM/CBDM U-Net: time embedding, residual blocks, resampling.

The network predicts the noise eps_theta(x_t, t, y) of Eq. 2/8 (docs/method.md). Two embedding vectors flow through it:

* ``temb`` = e_t, the output of the time MLP (sinusoidal features -> Linear -> SiLU -> Linear). The
  timestep-dependent self-attention (Eq. 13-14) receives this one.
* ``cond`` = e_t + e_y, the time embedding plus the class embedding. The residual blocks receive this one, as in
  CBDM, where the label embedding is added to the time embedding before it reaches the blocks.

Which vector a block needs is declared by its type (improved-diffusion's pattern): a :class:`TimestepBlock`
gets ``temb``, a :class:`ConditionBlock` gets ``cond``, and :class:`EmbedSequential` dispatches on that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ConditionBlock",
    "Downsample",
    "EmbedSequential",
    "GroupNorm",
    "ResBlock",
    "TimeEmbedding",
    "TimestepBlock",
    "Upsample",
    "group_norm",
    "init_xavier_",
    "sinusoidal_embedding",
    "sinusoidal_frequencies",
]

# DDPM's GroupNorm uses 32 groups; narrower layers fall back to the largest divisor of 32 that fits.
_NORM_GROUPS = 32


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (the same weights and state) that, with ``low_precision`` set and autocast on, normalises
    in autocast's dtype: autocast otherwise runs every GroupNorm in fp32, and the SiLU after it too (the
    ``bf16_groupnorm`` speed option, pdcbdm.training.gpu_options)."""

    low_precision = False

    def forward(self, x: Tensor) -> Tensor:
        kind = x.device.type
        if not (self.low_precision and torch.is_autocast_enabled(kind)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with 32 groups, or gcd(32, channels) groups when ``channels`` is not a multiple of 32.

    Args:
        channels: number of feature channels to normalise.
    """
    if channels < 1:
        raise ValueError(f"group_norm: channels must be >= 1, got {channels}")
    return GroupNorm(math.gcd(_NORM_GROUPS, channels), channels, eps=1e-6)


def init_xavier_(module: nn.Linear | nn.Conv2d, gain: float = 1.0) -> None:
    """DDPM initialisation: Xavier-uniform weights scaled by ``gain``, zero bias.

    Args:
        module: the layer to initialise in place.
        gain: Xavier gain; DDPM uses 1e-5 for layers that close a residual branch, so a fresh block is
            close to the identity.
    """
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def sinusoidal_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """The dim/2 geometric frequencies f_i = max_period^(-i / (dim/2)) of ``sinusoidal_embedding``, float32 [dim/2]
    on the CPU (from 1 down to nearly 1/max_period)."""
    if dim % 2 != 0 or dim < 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even and >= 2, got {dim}")
    half = dim // 2
    # Built in float32 even under autocast: bf16 cannot represent t * f for t up to 1000 precisely.
    exponent = torch.arange(half, dtype=torch.float32) / half
    return torch.exp(-math.log(max_period) * exponent)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freqs: Tensor | None = None) -> Tensor:
    """Transformer-style sinusoidal features of the timestep t (DDPM's timestep embedding).

    Args:
        t: timesteps, shape [B], integer or float.
        dim: feature size (even); the output is [cos(t f_i), sin(t f_i)] for dim/2 geometric frequencies f_i
            from 1 down to 1/max_period.
        max_period: the lowest frequency's period.
        freqs: ``sinusoidal_frequencies(dim, max_period)`` already on t's device (a module's buffer); None builds
            them here.

    Returns:
        float32 tensor [B, dim] (the dtype of ``freqs``).
    """
    if freqs is None:
        freqs = sinusoidal_frequencies(dim, max_period).to(t.device)
    elif freqs.shape != (dim // 2,):
        raise ValueError(f"sinusoidal_embedding: freqs must have shape [{dim // 2}], got {list(freqs.shape)}")
    # type_as, not .to(torch.float32): torch.export records .to(dtype) with an assertion on t's device (cpu when
    # exported there), which would refuse a cuda t
    angles = t.type_as(freqs)[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [B, dim]


class TimeEmbedding(nn.Module):
    """e_t = Linear(SiLU(Linear(sinusoidal(t)))): the time MLP of DDPM, output dim ``emb_dim`` (ch * 4).

    The sinusoidal frequencies are a non-persistent buffer: they follow the module to its device, stay out of the
    state_dict (checkpoints are unchanged), and an exported graph reads them as a constant instead of building
    them with ``arange`` on the device of the export (a literal ``cpu`` that would break the graph on cuda).

    Args:
        base_dim: size of the sinusoidal features (the U-Net's base width ``ch``).
        emb_dim: size of the embedding e_t.
    """

    def __init__(self, base_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.register_buffer("freqs", sinusoidal_frequencies(base_dim), persistent=False)
        self.fc1 = nn.Linear(base_dim, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)
        init_xavier_(self.fc1)
        init_xavier_(self.fc2)

    def forward(self, t: Tensor) -> Tensor:
        """Map timesteps t [B] to e_t [B, emb_dim]."""
        h = sinusoidal_embedding(t, self.base_dim, freqs=self.freqs)  # [B, ch]
        return self.fc2(F.silu(self.fc1(h)))  # [B, 4ch]


class TimestepBlock(nn.Module):
    """Marker base: ``forward(x, temb)`` takes the timestep embedding e_t (without the class embedding)."""


class ConditionBlock(nn.Module):
    """Marker base: ``forward(x, cond)`` takes the conditioning embedding e_t + e_y."""


class EmbedSequential(nn.Sequential):
    """A sequential container that passes each block the embedding its type asks for.

    :class:`TimestepBlock` children get ``temb`` (e_t), :class:`ConditionBlock` children get ``cond``
    (e_t + e_y), and every other child gets only the feature map.
    """

    def forward(self, x: Tensor, temb: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        """Run the children in order.

        Args:
            x: feature map [B, C, H, W].
            temb: timestep embedding e_t [B, D].
            cond: conditioning embedding e_t + e_y [B, D].
        """
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, temb)
            elif isinstance(layer, ConditionBlock):
                x = layer(x, cond)
            else:
                x = layer(x)
        return x


class ResBlock(ConditionBlock):
    """DDPM residual block: GN-SiLU-Conv, + Linear(SiLU(cond)), GN-SiLU-Dropout-Conv, plus a (1x1) skip.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of the output feature map.
        emb_dim: size of the conditioning embedding e_t + e_y.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )
        for layer in (self.conv1, self.emb_proj, self.skip):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                init_xavier_(layer)
        init_xavier_(self.conv2, gain=1e-5)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # type: ignore[override]
        """x [B, Cin, H, W], cond [B, D] -> [B, Cout, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))  # [B, Cout, H, W]
        h = h + self.emb_proj(F.silu(cond))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (DDPM).

    Args:
        channels: channels in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        init_xavier_(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 convolution (DDPM).

    Args:
        channels: channels in and out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        init_xavier_(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

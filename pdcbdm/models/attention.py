"""Spatial self-attention and timestep-dependent self-attention, TSA (Eq. 13-14 of PD-CBDM, docs/method.md).

Both blocks share the same submodules (``norm``, ``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``), so a plain
block's state dict loads into a TSA block; TSA only adds ``time_q``, ``time_k``, ``time_v`` (the W^t of Eq. 13).
These start at zero, so a fresh TSA block computes exactly what the plain block computes.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from pdcbdm.models.layers import TimestepBlock, group_norm, init_xavier_

__all__ = ["SelfAttention", "TimestepSelfAttention"]

QKVOffsets = tuple[Tensor, Tensor, Tensor]


class SelfAttention(nn.Module):
    """Multi-head spatial self-attention with a residual connection (the DDPM/CBDM attention block).

    out = x + Attention(Q, K, V) W_o with Q = h W_q, K = h W_k, V = h W_v and h = GroupNorm(x) flattened to
    [B, HW, C]; scaled dot-product attention per head (scale 1/sqrt(C / num_heads)). With one head this is
    DDPM's block. ``proj_out`` starts near zero (Xavier gain 1e-5, as DDPM) so a fresh block is near identity.

    Args:
        channels: feature channels C; must be divisible by ``num_heads``.
        num_heads: number of attention heads.
    """

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"SelfAttention: num_heads={num_heads} must be >= 1 and divide channels={channels}"
            )
        self.channels = channels
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.proj_q = nn.Linear(channels, channels)
        self.proj_k = nn.Linear(channels, channels)
        self.proj_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)
        for layer in (self.proj_q, self.proj_k, self.proj_v):
            init_xavier_(layer)
        init_xavier_(self.proj_out, gain=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> x + attention output, same shape."""
        return self._attend(x, None)

    def _split_heads(self, z: Tensor) -> Tensor:
        b, n, c = z.shape
        return z.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, HW, C/heads]

    def _attend(self, x: Tensor, offsets: QKVOffsets | None) -> Tensor:
        """Attention of Eq. 14; ``offsets`` are per-sample [B, C] terms added to Q, K, V (Eq. 13) or None."""
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.proj_q(h), self.proj_k(h), self.proj_v(h)  # [B, HW, C] each
        if offsets is not None:
            # e_t W^t is one vector per sample, broadcast over the HW positions.
            q = q + offsets[0][:, None, :]
            k = k + offsets[1][:, None, :]
            v = v + offsets[2][:, None, :]
        a = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        a = a.transpose(1, 2).reshape(b, height * width, c)  # [B, HW, C]
        out = self.proj_out(a).transpose(1, 2).reshape(b, c, height, width)  # [B, C, H, W]
        return x + out


class TimestepSelfAttention(SelfAttention, TimestepBlock):
    """Timestep-dependent self-attention, TSA (Eq. 13-14).

    Q = h W_q + e_t W_q^t,  K = h W_k + e_t W_k^t,  V = h W_v + e_t W_v^t  (e_t terms broadcast over positions),
    out = x + Attention(Q, K, V) W_o, with h = GroupNorm(x) flattened to [B, HW, C].

    e_t is the output of the U-Net's time MLP *without* the class embedding: docs/method.md calls it "the timestep
    embedding (the same vector the residual blocks receive)", and the residual blocks receive e_t + e_y, but the
    block is meant to be *timestep*-dependent, so it gets the time part only. Eq. 13 applies W^t to e_t directly
    (no nonlinearity, no bias). The W^t (``time_q``, ``time_k``, ``time_v``) are zero-initialised, so a fresh
    TSA block equals :class:`SelfAttention` with the same shared weights, bit for bit.

    Args:
        channels: feature channels C; must be divisible by ``num_heads``.
        temb_dim: size of the timestep embedding e_t.
        num_heads: number of attention heads.
    """

    def __init__(self, channels: int, temb_dim: int, num_heads: int = 1) -> None:
        super().__init__(channels, num_heads)
        if temb_dim < 1:
            raise ValueError(f"TimestepSelfAttention: temb_dim must be >= 1, got {temb_dim}")
        self.temb_dim = temb_dim
        self.time_q = nn.Linear(temb_dim, channels, bias=False)
        self.time_k = nn.Linear(temb_dim, channels, bias=False)
        self.time_v = nn.Linear(temb_dim, channels, bias=False)
        for layer in (self.time_q, self.time_k, self.time_v):
            nn.init.zeros_(layer.weight)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # type: ignore[override]
        """x [B, C, H, W], e_t [B, temb_dim] -> x + attention output, same shape as x."""
        if temb.dim() != 2 or temb.shape[0] != x.shape[0] or temb.shape[1] != self.temb_dim:
            raise ValueError(
                f"TimestepSelfAttention: temb must have shape [{x.shape[0]}, {self.temb_dim}], "
                f"got {list(temb.shape)}"
            )
        offsets = (self.time_q(temb), self.time_k(temb), self.time_v(temb))  # [B, C] each
        return self._attend(x, offsets)

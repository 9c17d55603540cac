"""The class-conditional DDPM/CBDM U-Net with optional timestep-dependent self-attention (Eq. 13-14).

The network predicts the noise eps_theta(x_t, t, y) (Eq. 2/8 of docs/method.md). Conditioning: the class embedding
e_y (``nn.Embedding`` with ``num_classes + 1`` rows) is added to the time embedding e_t (sinusoidal -> MLP, dim
4 * ch) and the sum goes to every residual block, as in CBDM. Row ``num_classes`` is the null label of
classifier-free guidance; it is fixed at zero (``padding_idx``: never trained), so "no condition" means "no
label embedding added", exactly what CBDM's code does for unconditional steps.

Attention placement (by feature-map resolution; the levels of a net are image_size / 2**i, i < len(ch_mult)):
  * attention positions exist at the resolutions in ``attn_resolutions`` (the spec) union ``tsa_resolutions``,
    after each residual block at that resolution, in both the down and the up path, as DDPM places them;
  * a position whose resolution is in ``tsa_resolutions`` uses TSA, the others plain self-attention;
  * the middle block (ResBlock, attention, ResBlock at the lowest resolution) always has attention, and it is
    TSA when the lowest resolution is in ``tsa_resolutions``.
The paper uses TSA at 16 only for 32x32 images, i.e. ``build_unet("cifar", K, tsa_resolutions="16")``.

The networks for a user's own data (``OWN_NETWORKS``: own32, own64, own128) keep that placement at every size:
attention (and the runs' TSA) at the 16x16 feature map, the middle block at 8x8, one more level per doubling of
the image side. Each is sized for its own image side only (``check_network_size``): at another side its levels would
move and the 16x16 attention would be missing or elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pdcbdm.models.attention import SelfAttention, TimestepSelfAttention
from pdcbdm.models.layers import (
    Downsample,
    EmbedSequential,
    ResBlock,
    TimeEmbedding,
    Upsample,
    group_norm,
    init_xavier_,
)

__all__ = ["OWN_NETWORKS", "NETWORKS", "UNet", "UNetSpec", "build_unet", "check_network_size", "parse_resolutions"]


def parse_resolutions(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Parse a set of feature-map resolutions: "16,8,4" -> (16, 8, 4), "" -> (), spaces tolerated.

    Args:
        spec: comma-separated integers (the form search spaces use), or a sequence of ints.

    Returns:
        the resolutions in the given order.
    """
    if isinstance(spec, str):
        items: list[object] = [] if not spec.strip() else [s.strip() for s in spec.split(",")]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ValueError(f"resolutions must be a string like '16,8' or a sequence of ints, got {spec!r}")
    out = []
    for item in items:
        if isinstance(item, str) and item.lstrip("+").isdigit():
            value = int(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            value = item
        else:
            raise ValueError(f"resolution {item!r} in {spec!r} is not an integer (expected e.g. '16,8,4')")
        if value < 1:
            raise ValueError(f"resolution {value} in {spec!r} must be a positive integer")
        out.append(value)
    return tuple(out)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of the U-Net; validated on construction.

    Args:
        image_size: height = width of the images.
        in_channels: image channels (also the output channels: the net predicts eps).
        ch: base width; level i has ch * ch_mult[i] channels; the embeddings have 4 * ch dims.
        ch_mult: width multiplier per level; level i works at image_size / 2**i.
        num_res_blocks: residual blocks per level in the down path (the up path has one more).
        attn_resolutions: resolutions with plain self-attention (the middle block always has attention).
        dropout: dropout probability in the residual blocks.
        num_heads: attention heads (1 is DDPM's block).
    """

    image_size: int
    in_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "num_heads"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"UNetSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        mult = self.ch_mult
        if isinstance(mult, str) or not isinstance(mult, Sequence) or not mult:
            raise ValueError(f"UNetSpec.ch_mult must be a non-empty sequence of positive ints, got {mult!r}")
        if not all(_is_positive_int(m) for m in mult):
            raise ValueError(f"UNetSpec.ch_mult must hold positive ints, got {mult!r}")
        object.__setattr__(self, "ch_mult", tuple(mult))
        object.__setattr__(self, "attn_resolutions", parse_resolutions(self.attn_resolutions))
        if self.ch % 2 != 0:
            raise ValueError(f"UNetSpec.ch must be even (sinusoidal features), got {self.ch}")
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not (dropout_ok and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"UNetSpec.dropout must be in [0, 1), got {self.dropout!r}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor != 0:
            raise ValueError(
                f"UNetSpec.image_size={self.image_size} must be divisible by {factor} "
                f"(2 ** (len(ch_mult) - 1) with ch_mult={self.ch_mult})"
            )
        check_resolutions(self.attn_resolutions, self.resolutions, "attn_resolutions")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, e.g. (32, 16, 8, 4) for the CIFAR net."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def emb_dim(self) -> int:
        """Size of the time, class and conditioning embeddings: 4 * ch (DDPM)."""
        return 4 * self.ch


def check_resolutions(values: Sequence[int], valid: Sequence[int], field: str) -> None:
    """Raise ValueError naming ``field`` if a value in ``values`` is not one of the net's levels ``valid``."""
    for value in values:
        if value not in valid:
            raise ValueError(
                f"{field}: {value} is not a feature-map resolution of this net; valid values: {list(valid)}"
            )


NETWORKS: dict[str, UNetSpec] = {
    # DDPM/CBDM CIFAR-10/100 net: levels 32, 16, 8, 4; attention at 16 and in the middle (at 4).
    "cifar": UNetSpec(
        image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, num_heads=1,
    ),
    # CPU-sized net for 16x16 one-channel images (e.g. upsampled digits): levels 16, 8, 4. One residual block
    # per level (two on the way up): a CPU step's time follows its arithmetic, and a second block per level adds
    # arithmetic for little gain on 16x16 data (its cost: docs/results.md, "Networks").
    "small": UNetSpec(
        image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(8,), dropout=0.1, num_heads=1,
    ),
    # A user's own images (any channels: in_channels follows the data). own32 is sized for a CPU (one residual
    # block per level, width 32); own64 and own128 are GPU nets (two blocks per level, width 64, the CIFAR net's
    # layout with one and two more levels), attention at 16 and in the middle at 8 throughout.
    "own32": UNetSpec(
        image_size=32, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(16,), dropout=0.1, num_heads=1,
    ),
    "own64": UNetSpec(
        image_size=64, in_channels=3, ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, num_heads=1,
    ),
    "own128": UNetSpec(
        image_size=128, in_channels=3, ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        attn_resolutions=(16,), dropout=0.1, num_heads=1,
    ),
}
OWN_NETWORKS = ("own32", "own64", "own128")


def check_network_size(network: str, image_size: int) -> None:
    """ValueError naming ``model.network`` when an own-data network (``OWN_NETWORKS``) meets images of another side
    than its own; the other networks take any side their levels divide."""
    if network not in OWN_NETWORKS or NETWORKS[network].image_size == image_size:
        return
    fits = [p for p in OWN_NETWORKS if NETWORKS[p].image_size == image_size]
    hint = (f"use model.network={fits[0]} (the run preset --preset {fits[0]})" if fits else
            f"prepare the data at {', '.join(str(NETWORKS[p].image_size) for p in OWN_NETWORKS)} px (--size)")
    side = NETWORKS[network].image_size
    raise ValueError(f"model.network: {network!r} is sized for {side}x{side} images, the data are "
                     f"{image_size}x{image_size}; {hint}")


def build_unet(
    network: str,
    num_classes: int,
    *,
    tsa_resolutions: str | Sequence[int] = "",
    image_size: int | None = None,
    in_channels: int | None = None,
    **overrides: object,
) -> UNet:
    """Build a U-Net from a named network of :data:`NETWORKS`, with optional field overrides.

    Args:
        network: a key of NETWORKS ("cifar", "small", "own32", "own64", "own128").
        num_classes: number of classes K; label K is the null label.
        tsa_resolutions: resolutions whose attention is TSA (Eq. 13-14), e.g. "16" (the paper) or "" (none).
        image_size: overrides the network's image size when given.
        in_channels: overrides the network's image channels when given.
        **overrides: other UNetSpec fields (ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads).
    """
    if network not in NETWORKS:
        raise ValueError(f"unknown U-Net network {network!r}; valid networks: {sorted(NETWORKS)}")
    fields = [f.name for f in dataclasses.fields(UNetSpec)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown U-Net override(s) {unknown}; valid overrides: {fields}")
    if image_size is not None:
        overrides["image_size"] = image_size
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    spec = dataclasses.replace(NETWORKS[network], **overrides)  # type: ignore[arg-type]
    return UNet(spec, num_classes, tsa_resolutions=tsa_resolutions)


class UNet(nn.Module):
    """Class-conditional noise-prediction U-Net eps_theta(x_t, t, y) of DDPM/CBDM with optional TSA.

    See the module docstring for the conditioning and the attention placement rule.

    Args:
        spec: the architecture.
        num_classes: number of classes K (labels 0..K-1; K is the null label).
        tsa_resolutions: resolutions (levels of the net) whose attention is TSA.
    """

    def __init__(self, spec: UNetSpec, num_classes: int, tsa_resolutions: str | Sequence[int] = ()) -> None:
        super().__init__()
        if not _is_positive_int(num_classes):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        tsa = parse_resolutions(tsa_resolutions)
        check_resolutions(tsa, spec.resolutions, "tsa_resolutions")
        self.spec = spec
        self.num_classes = num_classes
        self.null_label = num_classes
        self.tsa_resolutions: tuple[int, ...] = tuple(sorted(set(tsa), reverse=True))
        dim = spec.emb_dim
        self.time_embed = TimeEmbedding(spec.ch, dim)
        # The null row is padding_idx: zero and never updated, i.e. "no label embedding added" (CBDM).
        self.class_embed = nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
        self.head = nn.Conv2d(spec.in_channels, spec.ch, 3, padding=1)
        init_xavier_(self.head)
        skip_channels = self._build_down()
        self._build_middle()
        self._build_up(skip_channels)
        width = spec.ch * spec.ch_mult[0]
        self.out_norm = group_norm(width)
        self.out_conv = nn.Conv2d(width, spec.in_channels, 3, padding=1)
        init_xavier_(self.out_conv, gain=1e-5)

    def _attention(self, resolution: int, channels: int, middle: bool = False) -> nn.Module | None:
        """The attention block at a position of the given resolution, or None (placement rule above)."""
        use_tsa = resolution in self.tsa_resolutions
        if not (middle or use_tsa or resolution in self.spec.attn_resolutions):
            return None
        if channels % self.spec.num_heads != 0:
            raise ValueError(
                f"num_heads={self.spec.num_heads} does not divide {channels} channels at resolution {resolution}"
            )
        if use_tsa:
            return TimestepSelfAttention(channels, self.spec.emb_dim, self.spec.num_heads)
        return SelfAttention(channels, self.spec.num_heads)

    def _block(self, c_in: int, c_out: int, resolution: int) -> list[nn.Module]:
        layers: list[nn.Module] = [ResBlock(c_in, c_out, self.spec.emb_dim, self.spec.dropout)]
        attn = self._attention(resolution, c_out)
        return layers if attn is None else [*layers, attn]

    def _build_down(self) -> list[int]:
        """Down path; returns the channels of every skip connection, in push order."""
        spec = self.spec
        self.down = nn.ModuleList()
        skips, now = [spec.ch], spec.ch
        for level, (mult, res) in enumerate(zip(spec.ch_mult, spec.resolutions)):
            for _ in range(spec.num_res_blocks):
                self.down.append(EmbedSequential(*self._block(now, spec.ch * mult, res)))
                now = spec.ch * mult
                skips.append(now)
            if level != len(spec.ch_mult) - 1:
                self.down.append(EmbedSequential(Downsample(now)))
                skips.append(now)
        return skips

    def _build_middle(self) -> None:
        spec = self.spec
        now, lowest = spec.ch * spec.ch_mult[-1], spec.resolutions[-1]
        attn = self._attention(lowest, now, middle=True)
        res_a = ResBlock(now, now, spec.emb_dim, spec.dropout)
        res_b = ResBlock(now, now, spec.emb_dim, spec.dropout)
        self.middle = EmbedSequential(res_a, attn, res_b)  # type: ignore[arg-type]

    def _build_up(self, skips: list[int]) -> None:
        spec = self.spec
        self.up = nn.ModuleList()
        now = spec.ch * spec.ch_mult[-1]
        levels = list(enumerate(zip(spec.ch_mult, spec.resolutions)))
        for level, (mult, res) in reversed(levels):
            for i in range(spec.num_res_blocks + 1):
                layers = self._block(now + skips.pop(), spec.ch * mult, res)
                now = spec.ch * mult
                if level != 0 and i == spec.num_res_blocks:
                    layers.append(Upsample(now))
                self.up.append(EmbedSequential(*layers))
        assert not skips, "every skip connection is consumed"

    def count_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all of them, or only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor | None) -> None:
        factor = 2 ** (len(self.spec.ch_mult) - 1)
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(f"x must have shape [B, {self.spec.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be divisible by {factor}, got {list(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}], got {list(t.shape)}")
        if y is None:
            return
        if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
        # The range check needs the values on the host; on accelerators it would force a sync every step,
        # and the embedding lookup there fails on an out-of-range label anyway. torch.export (the MLflow model)
        # traces without values, so the check cannot be part of the exported graph.
        if torch.compiler.is_exporting():
            return
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null_label):
            raise ValueError(f"labels y must lie in [0, {self.null_label}] (null label {self.null_label})")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict the noise eps_theta(x_t, t, y) (Eq. 8).

        Args:
            x: noisy images x_t, [B, C, H, W].
            t: timesteps, [B] (integers in 0..T-1 by convention; floats work too).
            y: labels [B] in 0..K; K (= ``null_label``) means no condition. None means all null.

        Returns:
            predicted noise, [B, C, H, W].
        """
        self._check_inputs(x, t, y)
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        temb = self.time_embed(t)  # e_t [B, 4ch]: what TSA receives
        cond = temb + self.class_embed(y)  # e_t + e_y [B, 4ch]: what the residual blocks receive
        h = self.head(x)  # [B, ch, H, W]
        skips = [h]
        for block in self.down:
            h = block(h, temb, cond)
            skips.append(h)
        h = self.middle(h, temb, cond)  # [B, ch*mult[-1], H/2^(L-1), W/2^(L-1)]
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, cond)
        return self.out_conv(F.silu(self.out_norm(h)))  # [B, C, H, W]

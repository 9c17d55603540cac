"""The PD-CBDM denoising network: a class-conditional DDPM/CBDM U-Net with timestep-dependent self-attention.

Public API: :func:`build_unet` (from a named network of :data:`NETWORKS`), :class:`UNet`, :class:`UNetSpec`,
:func:`parse_resolutions`, and the attention blocks :class:`SelfAttention` and :class:`TimestepSelfAttention`
(TSA, Eq. 13-14).
"""

from pdcbdm.models.attention import SelfAttention, TimestepSelfAttention
from pdcbdm.models.layers import ConditionBlock, EmbedSequential, TimestepBlock
from pdcbdm.models.unet import NETWORKS, OWN_NETWORKS, UNet, UNetSpec, build_unet, check_network_size, parse_resolutions

__all__ = [
    "OWN_NETWORKS",
    "NETWORKS",
    "ConditionBlock",
    "EmbedSequential",
    "SelfAttention",
    "TimestepBlock",
    "TimestepSelfAttention",
    "UNet",
    "UNetSpec",
    "build_unet",
    "check_network_size",
    "parse_resolutions",
]

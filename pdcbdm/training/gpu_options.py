"""The speed options of ``train.gpu_options`` (comma-separated; none by default): each is measured on a GPU by
``python -m pipelines.gpu_check`` before it may become a default (docs/cluster-and-gpu.md).

- ``channels_last``: the U-Net's weights and batches in NHWC, the layout cuDNN's convolutions prefer in bf16;
- ``fused_adam``: Adam's update in one fused kernel (``torch.optim.Adam(fused=True)``);
- ``tf32``: TF32 tensor cores for fp32 matmuls and convolutions (``train.precision=fp32`` only; bf16 autocast
  does not use them); process-wide;
- ``cudnn_benchmark``: cuDNN times its algorithms for each input shape once and keeps the fastest; process-wide;
- ``compile``: ``torch.compile`` of the (wrapped) network; the checkpoints keep the plain network's weights;
- ``bf16_groupnorm``: GroupNorm (and the SiLU after it) in autocast's bf16 instead of fp32
  (``pdcbdm.models.layers.GroupNorm``); its effect on the loss curve: docs/results.md, "Step costs".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pdcbdm.config import GPU_OPTIONS, parse_gpu_options
from pdcbdm.models.layers import GroupNorm

__all__ = ["GPU_OPTIONS", "apply_gpu_options", "channels_last", "parse_gpu_options"]


def apply_gpu_options(options: tuple[str, ...], net: nn.Module) -> None:
    """Set the process-wide flags and the network's layout that ``options`` ask for (``compile`` and
    ``fused_adam`` are the trainer's to apply: they wrap the network and choose the optimiser)."""
    if "tf32" in options:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "cudnn_benchmark" in options:
        torch.backends.cudnn.benchmark = True
    if "channels_last" in options:
        net.to(memory_format=torch.channels_last)
    if "bf16_groupnorm" in options:
        for module in net.modules():
            if isinstance(module, GroupNorm):
                module.low_precision = True


def channels_last(x: Tensor) -> Tensor:
    """A batch in the NHWC layout the ``channels_last`` network expects."""
    return x.contiguous(memory_format=torch.channels_last)

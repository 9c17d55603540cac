"""Counting the host round trips a piece of work makes, on any device.

On CUDA a host round trip stalls the CPU until the GPU has drained its queue, so a training step that makes one
runs at the speed of its slowest kernel launch instead of overlapping the next step's launches with this step's
work. ``HostSyncCounter`` counts, at the ATen dispatcher (so C++ calls inside composite operators count too):

- scalar reads: ``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``, ``.tolist()`` (``aten._local_scalar_dense``);
- operators whose output shape depends on tensor values (``nonzero``, ``masked_select``, ``unique``, boolean-mask
  indexing, ``repeat_interleave`` without an output size): CUDA reads the size back before it allocates;
- copies between devices (``.to(device)``, ``.cpu()``, ``copy_`` across devices) and tensors made from host data
  (``torch.tensor(list)``), which on CUDA are uploads.

It runs on the CPU too, where no operator syncs, so a CPU test holds a step to the budget of a GPU run. There every
tensor lives on the host, so reads that touch only host tensors on every device are told apart and not counted
(``host``): values read through ``host_value`` (drawn from a host generator on purpose), the step counts torch's
optimisers keep on the CPU unless fused or capturable, and the U-Net's label check, which runs only for labels on
the CPU. On CUDA ``torch.cuda.set_sync_debug_mode`` is the device's own check of the same thing.
"""

from __future__ import annotations

import contextvars
import sys
from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "host_value"]

_aten = torch.ops.aten
_SHAPE_FROM_VALUES = {
    _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.repeat_interleave.Tensor, _aten.is_nonzero.default,
}
# (file ending, function): reads there touch host tensors on every device (see the module docstring)
_HOST_SITES = {
    ("torch/optim/optimizer.py", "_get_value"),
    ("pdcbdm/models/unet.py", "_check_inputs"),
}
_reading_host = contextvars.ContextVar("pdcbdm_reading_host", default=False)


def host_value(x: Tensor) -> float:
    """``float(x)`` for a tensor that lives on the host by design (a draw of a host generator that decides
    control flow): not a device round trip, and ``HostSyncCounter`` counts it as ``host``."""
    token = _reading_host.set(True)
    try:
        return float(x)
    finally:
        _reading_host.reset(token)


def _mask_index(func: Any, args: Any) -> bool:
    """Indexing with a boolean mask (``x[x > 0]``): its result's size is the mask's count."""
    if func not in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
        return False
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)


def _crosses_devices(func: Any, args: Any, out: Any) -> bool:
    """A copy whose result lives on another device than its input (``_to_copy`` with a device, ``copy_``)."""
    if func is _aten._to_copy.default:
        return isinstance(out, Tensor) and out.device != args[0].device
    if func is _aten.copy_.default:
        return args[0].device != args[1].device
    return False


_MACHINERY = ("torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile.py", "pdcbdm/training/syncs.py")


def _at_host_site() -> bool:
    """Whether the code that made the current read (the first frame outside the dispatch machinery) is one of
    ``_HOST_SITES``."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        name = code.co_filename.replace("\\", "/")
        if not any(part in name for part in _MACHINERY):
            return any(name.endswith(end) and code.co_name == fn for end, fn in _HOST_SITES)
        frame = frame.f_back
    return False


class HostSyncCounter(TorchDispatchMode):
    """A context manager counting host round trips by kind (``scalar_read``, ``shape_from_values``,
    ``device_copy``, ``from_host``, and ``host`` for reads of host tensors, which ``total`` leaves out); ``ops``
    counts the operators behind ``total``."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind != "host")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = self._kind(func, args, out)
        if kind is not None:
            self.kinds[kind] += 1
            if kind != "host":
                self.ops[str(func)] += 1
        return out

    @staticmethod
    def _kind(func: Any, args: Any, out: Any) -> str | None:
        if func is _aten._local_scalar_dense.default:
            return "host" if _reading_host.get() or _at_host_site() else "scalar_read"
        if func in _SHAPE_FROM_VALUES or _mask_index(func, args):
            return "shape_from_values"
        if func is _aten.lift_fresh.default:
            return "from_host"
        if _crosses_devices(func, args, out):
            return "device_copy"
        return None

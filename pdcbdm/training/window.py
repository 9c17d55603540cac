"""The loss terms of the steps since the last read, kept on the device and read back once per window.

Reading a loss back after each step would stall a GPU at every step (a host round trip); instead each step adds
its terms to device-side sums, and ``read`` returns the window's means in one transfer. A step whose terms are
not finite is remembered (the first one, with its values) and ``read`` raises for it, naming that step: the
training loop reads at least at every ``train.log_every`` steps and before it saves or evaluates anything, so a
divergence stops a run within one window and never reaches a checkpoint or an evaluation as if it were healthy.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the per-step values, in the order the divergence message names them
STEP_KEYS = ("dm", "cbdm", "pd", "pd_kl", "loss", "grad_norm")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step and every term's value."""


class LossWindow:
    """Device-side sums of ``STEP_KEYS`` over the steps since the last ``read``, the first non-finite step, and
    occasional extra values (the gradient diagnostics) that come with the next read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(STEP_KEYS), device=device)

    def _reset(self) -> None:
        self.sums = torch.zeros(len(STEP_KEYS), device=self.device)
        self.steps = 0
        self.lr_sum = 0.0
        self.extra: dict[str, Tensor] = {}

    def add(self, terms: dict[str, Tensor], step: int, lr: float) -> None:
        """One step's values (0-d tensors on the device, ``STEP_KEYS``) after optimiser step ``step`` (1-based)."""
        values = torch.stack([terms[k].detach().float().reshape(()) for k in STEP_KEYS])
        bad = ~torch.isfinite(values).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        self.bad_values = torch.where(bad, values, self.bad_values)
        self.sums += values
        self.steps += 1
        self.lr_sum += lr

    def add_extra(self, values: dict[str, Tensor]) -> None:
        self.extra.update(values)

    def read(self) -> dict[str, float]:
        """The window's means (and its extra values) in one transfer; raises ``NonFiniteLossError`` if a step
        since the start of the run was not finite."""
        extra_keys = list(self.extra)
        packed = torch.cat([self.sums / max(self.steps, 1), self.first_bad.reshape(1).float(), self.bad_values,
                            torch.stack([self.extra[k].float().reshape(()) for k in extra_keys]) if extra_keys
                            else self.sums.new_zeros(0)]).tolist()
        n = len(STEP_KEYS)
        first_bad = int(packed[n])
        if first_bad >= 0:
            detail = ", ".join(f"{k}={v:.6g}" for k, v in zip(STEP_KEYS, packed[n + 1:2 * n + 1]))
            raise NonFiniteLossError(f"non-finite loss at step {first_bad}: {detail}")
        out = dict(zip(STEP_KEYS, packed[:n])) if self.steps else {}
        out.update(zip(extra_keys, packed[2 * n + 1:]))
        if self.steps:
            out["lr"] = self.lr_sum / self.steps
        self._reset()
        return out

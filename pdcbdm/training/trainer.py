"""The Ray-free training state and step: Adam with linear warm-up, gradient clipping, EMA, bf16 autocast.

The same ``Trainer`` runs in ``python -m pdcbdm.train`` and inside each Ray Train worker; the platform passes a
``wrap_model`` (Ray's ``prepare_model``: DDP when there are several workers) and its rank and world size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pdcbdm.config import Config
from pdcbdm.data import ImageDataset, dataset_image_shape, head_tail_split
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.labels import from_spec
from pdcbdm.models import NETWORKS, build_unet
from pdcbdm.training.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from pdcbdm.training.diagnostics import term_gradient_norm_tensors
from pdcbdm.training.feed import BatchFeed
from pdcbdm.training.gpu_options import apply_gpu_options, channels_last, parse_gpu_options
from pdcbdm.training.step import Batch, Shard, compute_loss
from pdcbdm.training.window import LossWindow, NonFiniteLossError

PRECISIONS = ("fp32", "bf16", "auto")  # train.precision: resolve_precision
LR_SCHEDULES = ("constant", "cosine")  # train.lr_schedule: LrFactor


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX (where
    oneDNN uses bf16 instructions; elsewhere CPU autocast emulates bf16 and is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast where the hardware runs it natively, else fp32."""
    if spec == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return spec


def build_network(cfg: Config, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The U-Net for a config and data set shape."""
    overrides: dict[str, Any] = {}
    if cfg.model.dropout is not None:
        overrides["dropout"] = cfg.model.dropout
    if cfg.model.num_heads is not None:
        overrides["num_heads"] = cfg.model.num_heads
    if cfg.model.ch is not None:
        overrides["ch"] = cfg.model.ch
    return build_unet(cfg.model.network, num_classes, tsa_resolutions=cfg.model.tsa_resolutions,
                      image_size=image_shape[1], in_channels=image_shape[0], **overrides)


def network_levels(cfg: Config) -> tuple[int, ...]:
    """The feature-map resolutions (largest first) of the U-Net ``build_network`` makes for ``cfg``'s data: the
    network's levels at the size the data are served at (``data.image_size``), which is where TSA can go."""
    size = dataset_image_shape(cfg.data.dataset, cfg.data.image_size, root=cfg.data.root)[1]
    return dataclasses.replace(NETWORKS[cfg.model.network], image_size=size).resolutions


@dataclass(frozen=True)
class LrFactor:
    """The learning rate's factor after ``step`` optimiser steps: a linear warm-up over ``warmup`` steps, then 1
    (``constant``) or a cosine from 1 down to ``final`` at step ``total`` (``cosine``). On a short budget the decay
    lets the last steps settle instead of jittering at the peak rate, which the EMA alone smooths only in part."""

    warmup: int
    total: int
    schedule: str = "constant"
    final: float = 0.1

    @classmethod
    def of(cls, train: Any) -> "LrFactor":
        return cls(train.warmup, train.steps, train.lr_schedule, train.lr_final)

    def __call__(self, step: int) -> float:
        if step + 1 < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant" or self.total <= self.warmup:
            return 1.0
        done = min(1.0, (step + 1 - self.warmup) / (self.total - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * done))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay for the update after ``step`` optimiser steps: min(decay, (1 + step) / (10 + step)).

    The warm-up (as in TensorFlow's ExponentialMovingAverage with num_updates) keeps the random initialisation
    from lingering: without it, decay 0.99 leaves 0.99^150 = 22% of the init in the average at step 150, and
    0.9999 leaves 37% at step 10,000; with it the init's share is below 1e-9 after 100 steps.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def ema_ready_step(decay: float) -> int:
    """The first step at which the EMA's averaging window, 1 / (1 - decay_t), spans at most half of the steps
    taken: from then on the EMA mostly averages networks of the second half of training, so an evaluation of it
    (and an early-stopping decision on that evaluation) reflects the current network, not the early ones."""
    # window_t = min(1 / (1 - decay), (10 + t) / 9): the warm-up part is below t / 2 from t = 3 on
    return max(3, math.ceil(round(2.0 / (1.0 - decay), 6)))


class EMA:
    """Exponential moving average of a network's parameters (kept in fp32) with a warm-up of its decay
    (``ema_decay_at``); buffers are copied."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        d = ema_decay_at(self.updates, self.decay)
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net.parameters()], 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.updates += 1


class Trainer:
    """Holds network, EMA, optimiser, schedule, data feed and the step counter of one run (one rank).

    ``advance`` makes an optimiser step without a host round trip (the batch, its draws, the schedule and the
    loss window live on the device); ``take_window`` reads the steps' mean values back, once per window, and
    raises ``NonFiniteLossError`` for a diverged step; ``train_step`` is both, for one step."""

    def __init__(
        self, cfg: Config, dataset: ImageDataset, *, device: torch.device | str = "cpu", rank: int = 0,
        world_size: int = 1, wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if cfg.train.batch_size % world_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the number of workers "
                             f"({world_size})")
        self.cfg, self.dataset, self.device = cfg, dataset, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.counts = dataset.counts()
        self.num_classes = len(self.counts)
        # seeded init: same weights for any rank or worker count. torch.manual_seed also seeds every CUDA device:
        # the fork restores this device's CUDA state too, so each rank keeps the dropout RNG its worker seeded
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.train.seed)
            self.net = build_network(cfg, self.num_classes, tuple(dataset.image_shape)).to(self.device)
        self.gpu_options = parse_gpu_options(cfg.train.gpu_options)
        apply_gpu_options(self.gpu_options, self.net)
        self.ema = EMA(self.net, cfg.train.ema_decay)
        self.model = wrap_model(self.net) if wrap_model else self.net
        if "compile" in self.gpu_options:
            self.model = torch.compile(self.model)
        fused = {"fused": True} if "fused_adam" in self.gpu_options else {}
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.train.lr, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LrFactor.of(cfg.train))
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(self.device)
        self.label_probs = from_spec(self.counts, cfg.loss.label_dist).to(self.device, torch.float32)
        self.split = head_tail_split(self.counts, cfg.loss.split_ratio, mode=cfg.loss.split_mode, seed=cfg.data.seed)
        # one seed for every rank: each draws the global batch's randomness and keeps its slice (see Shard). The
        # tensors are drawn on the device; the coin that decides a step's passes (guidance dropout) on the host.
        # On the CPU both are one generator: the draws of every earlier CPU run.
        seed = cfg.train.seed * 100_003
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.host_generator = self.generator if self.device.type == "cpu" else torch.Generator().manual_seed(seed + 1)
        self.feed = BatchFeed(dataset, self.split, self.device, self.generator, rank, world_size)
        self.window = LossWindow(self.device)
        self.shard = Shard(rank, world_size)
        self.step = 0
        self.local_batch = cfg.train.batch_size // world_size
        pairs = cfg.loss.pd_pairs or cfg.train.batch_size // 2
        self.local_pairs = max(1, pairs // world_size)

    # -- data -----------------------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        """The next batch (this rank's rows), on the device; with the PD loss on, its head and tail pairs."""
        feed = self.feed
        batch = Batch(*self._layout(feed.gather(feed.next_indices(self.cfg.train.batch_size), self.local_batch)))
        if self.cfg.loss.pd_weight > 0:
            n = self.local_pairs * self.world_size
            head, tail = feed.group(True, n), feed.group(False, n)
            batch.head = self._layout(feed.gather(head, self.local_pairs))
            batch.tail = self._layout(feed.gather(tail, self.local_pairs))
        return batch

    def _layout(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = xy
        return (channels_last(x) if "channels_last" in self.gpu_options else x), y

    # -- optimisation ---------------------------------------------------------------------------------------
    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def advance(self, batch: Batch | None = None) -> None:
        """One optimiser step, with nothing read back to the host: its values go to ``window`` (the gradient
        diagnostics too, on rank 0 every ``train.log_every`` steps). A non-finite step is found by the next
        ``take_window``; with DDP the all-reduced gradient norm is non-finite on every rank at once, so all
        workers stop at the same step instead of one rank leaving the others in a collective."""
        self.model.train()
        batch = batch or self.next_batch()
        loss, terms = compute_loss(
            self.model, self.diffusion, batch, self.cfg.loss, label_probs=self.label_probs,
            null_label=self.num_classes, generator=self.generator, autocast=self.autocast, shard=self.shard,
            host_generator=self.host_generator,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        if self.rank == 0 and (self.step + 1) % self.cfg.train.log_every == 0:
            self.window.add_extra(self.gradient_norms(batch))
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net)
        self.step += 1
        self.window.add(terms, self.step, self.scheduler.get_last_lr()[0])

    def take_window(self) -> dict[str, float]:
        """The mean values of the steps since the last call (one host round trip); raises NonFiniteLossError
        naming the first non-finite step. Call it before the state is saved or evaluated."""
        return self.window.read()

    def train_step(self, batch: Batch | None = None) -> dict[str, float]:
        """One optimiser step and its values as floats (a host round trip per step: the training loops call
        ``advance`` and read a window at a time). Raises NonFiniteLossError on NaN/inf."""
        self.advance(batch)
        return self.take_window()

    def gradient_norms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each loss term's parameter-gradient norm on ``batch`` and the PD term's share of L_DM's, on the device
        (see ``pdcbdm.training.diagnostics``). Its own generator: the run's draws stay the same with or
        without it."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed * 7919 + self.step)
        return term_gradient_norm_tensors(self.net, self.diffusion, batch, self.cfg.loss,
                                          label_probs=self.label_probs, null_label=self.num_classes,
                                          generator=generator, autocast=self.autocast)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's global RNG state (CPU, and CUDA on a GPU; dropout draws from it and it differs per rank),
        gathered from all ranks: a collective when ``world_size > 1``, which every rank must call."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [state]
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, state)
        return [{k: v.cpu() for k, v in s.items()} for s in states]

    def state_payload(self, rng_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """The training state; ``rng_states`` (``rng_states()``, gathered by every rank) gives each rank its own
        RNG state back on ``load``, else only this rank's is kept."""
        return {
            "rng_ranks": rng_states or [{"cpu": torch.get_rng_state()}],
            "config": self.cfg.to_dict(), "num_classes": self.num_classes, "class_counts": list(self.counts),
            "image_shape": list(self.dataset.image_shape), "class_names": list(self.dataset.class_names),
            "step": self.step, "net": self.net.state_dict(), "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(), "generator_device": self.device.type,
            "host_generator": self.host_generator.get_state(), "torch_rng": torch.get_rng_state(),
            **self.feed.state(),
        }

    def sampling_payload(self) -> dict[str, Any]:
        """What sampling and evaluation need (``load_model``): config, data shape and classes, step and the EMA
        network; no optimiser state, no training network (``weights: "ema"``). ``net`` names the same tensors as
        ``ema`` (every checkpoint has both keys; ``torch.save`` stores shared tensors once)."""
        ema = self.ema.module.state_dict()
        return {
            "config": self.cfg.to_dict(), "num_classes": self.num_classes, "class_counts": list(self.counts),
            "image_shape": list(self.dataset.image_shape), "class_names": list(self.dataset.class_names),
            "step": self.step, "ema": ema, "net": ema, "weights": "ema",
        }

    def save(self, path: str | Path, rng_states: list[dict[str, torch.Tensor]] | None = None) -> Path:
        return save_checkpoint(path, self.state_payload(rng_states))

    def load(self, path: str | Path) -> None:
        """Resume network, EMA, optimiser, schedule, RNG and step from a checkpoint of the same network."""
        data = load_checkpoint(path, map_location=self.device)
        if data["num_classes"] != self.num_classes:
            raise CheckpointError(f"checkpoint {path} has {data['num_classes']} classes, the data set "
                                  f"{self.num_classes}")
        load_state_strict(self.net, data["net"], "network", path)
        load_state_strict(self.ema.module, data["ema"], "EMA network", path)
        if "optimizer" in data:
            self.optimizer.load_state_dict(data["optimizer"])
            self.scheduler.load_state_dict(data["scheduler"])
        self.step = int(data["step"])
        self.ema.updates = self.step
        self._load_generators(data)
        self._load_rng(data)
        if "data_order" in data:
            self.feed.load(data["data_order"], int(data["data_cursor"]))

    def _load_generators(self, data: dict[str, Any]) -> None:
        """The batch draws as they were at the checkpoint; a checkpoint made on another kind of device (whose
        generator state this one cannot take) continues with draws seeded by (seed, step)."""
        if data.get("generator_device", "cpu") != self.device.type:
            seed = self.cfg.train.seed * 100_003 + 1_000_033 * self.step
            self.generator.manual_seed(seed)
            if self.host_generator is not self.generator:
                self.host_generator.manual_seed(seed + 1)
            return
        if "generator" in data:
            self.generator.set_state(data["generator"].cpu())
        if "host_generator" in data and self.host_generator is not self.generator:
            self.host_generator.set_state(data["host_generator"].cpu())

    def _load_rng(self, data: dict[str, Any]) -> None:
        """Each rank's global RNG (dropout draws from it) as it was at the checkpoint; a checkpoint of another
        worker count gives each rank a distinct stream (seed, rank and step) instead of rank 0's for all."""
        state = _rng_of_rank(data, self.rank, self.world_size)
        if state is None:
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.rank + int(data["step"]))
            return
        torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)


def _rng_of_rank(data: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """The RNG state a rank continues with: its own when the checkpoint has every rank's (same world size)."""
    ranks = data.get("rng_ranks") or []
    if len(ranks) == world_size:
        return ranks[rank]
    if rank == 0 and "torch_rng" in data:
        return {"cpu": data["torch_rng"]}
    return None


def load_model(path: str | Path, *, which: str = "ema",
               device: torch.device | str = "cpu") -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the network of a checkpoint for sampling/evaluation: (network in eval mode, config, checkpoint)."""
    if which not in ("ema", "net"):
        raise ValueError(f"which must be 'ema' or 'net', got {which!r}")
    data = load_checkpoint(path, map_location=device)
    try:
        cfg = Config.from_dict(data["config"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {exc}") from None
    shape = tuple(data.get("image_shape") or ())
    if len(shape) != 3:
        raise CheckpointError(f"checkpoint {path} lacks its image_shape")
    net = build_network(cfg, int(data["num_classes"]), shape).to(device)
    load_state_strict(net, data[which], f"{which} weights", path)
    return net.eval(), cfg, data

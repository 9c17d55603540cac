"""Generated samples for an evaluation: drawn with classifier-free guidance by one worker or shared out between the
workers of a trial (each samples its rows and extracts their features, rank 0 gathers them), at the shape the
evaluation scores.

The workers of a trial exchange their shares right after drawing them, before rank 0 scores anything: they all
sample at the same time, so an exchange waits only for the slowest share of the same work, and a worker's wait is
bounded by what its own share took (``ShareExchange``); a wait that ends without the shares raises
``ShareWaitError``, which names the rank, the evaluation and the guidance value."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pdcbdm.config import Config
from pdcbdm.data import reference_image_shape
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.metrics import FeatureExtractor, FeatureSet, extract_all
from pdcbdm.sampling import generate, share_indices, uniform_labels

from .settings import feature_extractor, final_sampling, sampler_settings

__all__ = ["Samples", "SampleSource", "ShareExchange", "ShareWaitError", "resize_samples", "gather_to_rank0"]

# A worker that has drawn its share waits for the others at most SHARE_WAIT_FLOOR_S plus SHARE_WAIT_FACTOR times
# what its own share took: the others drew theirs (the same work, within a row per batch) at the same time, so a
# longer wait means one of them is stuck or gone. The floor covers start-up skew and a busy CPU; the factor scales
# the limit with the work (eval.protocol=paper: 1,000 guided steps a sample, hours a share) and leaves room for a
# slower card or node. Generous on purpose: a limit too short fails a trial after its training, one too long only
# delays the error of a stuck worker.
SHARE_WAIT_FLOOR_S = 600.0
SHARE_WAIT_FACTOR = 4.0


class ShareWaitError(RuntimeError):
    """A worker's wait for the other workers' shares of an evaluation ended without them: they took longer than its
    limit (``ShareExchange.wait_s``) or one of them was lost. The message names the rank that waited, for what
    (the evaluation and its guidance value), how long, and the transport's reason."""


@dataclass(frozen=True)
class ShareExchange:
    """Where the workers of a trial exchange their shares of an evaluation, and how long a worker waits.

    ``group``: the process group the shares travel on; None is the default group under its own timeout (the one
    the trial's training uses, not changed here). A trial gives the exchange a gloo group of its own
    (``new_group(backend="gloo")``, ``tune.worker``): its waits never hold an NCCL collective, whose timeout is a
    watchdog abort of the process, and a wait that ends raises ``ShareWaitError`` here. On such a group a worker
    waits at most ``wait_s(own_s)``, own_s being what its own share took (set as the group's timeout before each
    exchange: ``dist.set_timeout``, which gloo applies to the operations that follow)."""

    group: Any = None
    floor_s: float = SHARE_WAIT_FLOOR_S
    factor: float = SHARE_WAIT_FACTOR

    def wait_s(self, own_s: float) -> float | None:
        """The limit of a wait after a share that took ``own_s`` seconds; None on the default group."""
        return None if self.group is None else self.floor_s + self.factor * own_s


@dataclass
class Samples:
    """One generated set in the order one worker would draw it: uint8 images, labels and their features;
    ``seconds``: how long this worker took to draw, extract and (with several workers) gather it."""

    images: torch.Tensor
    labels: torch.Tensor
    features: FeatureSet
    seconds: float = 0.0


@dataclass
class SampleSource:
    """What every worker needs for its share of an evaluation: the config's samplers and the feature extractor.

    The reference statistics, judge and floors stay with rank 0's ``Evaluator``: the other workers only sample
    their rows of each batch, extract features and send them to rank 0 (``shared_samples``, over ``exchange``)."""

    cfg: Config
    extractor: FeatureExtractor
    num_classes: int
    image_shape: tuple[int, int, int]
    device: torch.device
    score_shape: tuple[int, int, int] | None = None
    exchange: ShareExchange = field(default_factory=ShareExchange)

    @classmethod
    def build(cls, cfg: Config, *, num_classes: int, image_shape: Sequence[int], device: torch.device | str = "cpu",
              cache_dir: str | os.PathLike | None = None) -> "SampleSource":
        """The config's feature extractor (``eval.extractor``, read from ``cache_dir`` as ``Evaluator.build``);
        ``image_shape`` is the network's, samples are scored at the data set's ``reference_image_shape``."""
        device = torch.device(device)
        extractor = feature_extractor(cfg, device, cache_dir)
        return cls(cfg, extractor, num_classes, tuple(image_shape), device,
                   reference_image_shape(cfg.data.dataset, root=cfg.data.root))

    def sample(self, net: nn.Module, guidance: float, n: int, *, seed: int = 0, progress: bool = False,
               autocast: Callable[[], Any] | None = None, final: bool = False, rank: int = 0,
               world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's share of n samples (uint8) with labels uniform over classes (all of them with one worker):
        with the config's sampler and steps, except for a ``final`` evaluation under ``eval.protocol=paper`` (see
        ``final_sampling``), at the shape they are scored at (``resize_samples``). The share's global positions
        are ``share_indices(n, eval.batch_size, rank, world)``."""
        labels = uniform_labels(n, self.num_classes).to(self.device)
        kw = {"autocast": autocast} if autocast else {}
        diffusion_cfg, sampling = (final_sampling(self.cfg) if final
                                   else (self.cfg.diffusion, sampler_settings(self.cfg)))
        images = generate(net, GaussianDiffusion(diffusion_cfg), labels, self.image_shape, guidance=guidance,
                          null_label=self.num_classes, batch_size=self.cfg.eval.batch_size, seed=seed,
                          progress=progress, rank=rank, world=world, **sampling, **kw)
        rows = share_indices(n, self.cfg.eval.batch_size, rank, world)
        return resize_samples(images, self.score_shape), labels.cpu()[rows]

    def features(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        feats, logits = self._extract(images)
        return FeatureSet(feats, logits, labels.numpy(), extractor=self.extractor.identity,
                          logits_note=getattr(self.extractor, "logits_note", ""))

    def _extract(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and logits (of the images at the shape they are scored at); empty arrays of the right width
        for an empty share."""
        if images.shape[0] > 0:
            return extract_all(self.extractor, resize_samples(images, self.score_shape),
                               batch_size=self.cfg.eval.batch_size, progress=False)
        width = self.extractor.num_classes_logits
        return np.zeros((0, self.extractor.feature_dim)), None if width is None else np.zeros((0, width))

    def shared_samples(self, net: nn.Module, guidance: float, n: int, *, seed: int = 0, progress: bool = False,
                       autocast: Callable[[], Any] | None = None, final: bool = False, rank: int = 0,
                       world: int = 1, label: str = "an evaluation") -> Samples | None:
        """n samples drawn by ``world`` workers together (every rank calls it: a collective): each samples its
        rows and extracts their features, rank 0 gathers them in the one-worker order and returns them; the
        other ranks return None. With one worker, the plain sampling. ``label`` names the evaluation in the
        error of a wait that ends without the other shares (``ShareWaitError``)."""
        start = time.perf_counter()
        images, labels = self.sample(net, guidance, n, seed=seed, progress=progress, autocast=autocast, final=final,
                                     rank=rank, world=world)
        if world == 1:
            features = self.features(images, labels)
            return Samples(images, labels, features, time.perf_counter() - start)
        feats, logits = self._extract(images)
        part = {"index": share_indices(n, self.cfg.eval.batch_size, rank, world), "images": images,
                "features": torch.from_numpy(feats), "logits": None if logits is None else torch.from_numpy(logits),
                "extractor": self.extractor.identity}
        what = f"the other workers' shares of the samples at w={guidance:g} of {label}"
        parts = gather_to_rank0(part, self.device, group=self.exchange.group,
                                wait_s=self.exchange.wait_s(time.perf_counter() - start), what=what)
        if parts is None:
            return None
        return replace(self._assemble(parts, n), seconds=time.perf_counter() - start)

    def _assemble(self, parts: list[dict[str, Any]], n: int) -> Samples:
        """The workers' shares in global order; refused when a worker used another feature network."""
        for rank, part in enumerate(parts):
            if part["extractor"] != self.extractor.identity:
                raise ValueError(f"evaluation worker {rank} extracted features with {part['extractor']!r}, rank 0 "
                                 f"with {self.extractor.identity!r}: every worker must score in one feature space "
                                 f"(give every node the same eval.inception_weights and feature cache)")
        order = torch.cat([p["index"] for p in parts]).argsort()
        if not torch.equal(torch.cat([p["index"] for p in parts])[order], torch.arange(n)):
            raise ValueError(f"the workers' shares do not cover the {n} samples exactly once")
        images = torch.cat([p["images"] for p in parts])[order]
        feats = torch.cat([p["features"] for p in parts])[order].numpy()
        logits = None if parts[0]["logits"] is None else torch.cat([p["logits"] for p in parts])[order].numpy()
        labels = uniform_labels(n, self.num_classes)
        return Samples(images, labels, FeatureSet(feats, logits, labels.numpy(), extractor=self.extractor.identity,
                                                  logits_note=getattr(self.extractor, "logits_note", "")))

    def grid_samples(self, net: nn.Module, guidances: Sequence[float], n: int, *, seed: int = 0,
                     progress: bool = False, autocast: Callable[[], Any] | None = None, rank: int = 0,
                     world: int = 1, label: str = "a final evaluation") -> list[Samples] | None:
        """A final evaluation's samples at each guidance value (``shared_samples``; every rank calls it): the
        gathered sets on rank 0, None on the others. Every share is exchanged as soon as it is drawn, none is
        scored here: rank 0 scores them afterwards (``Evaluator.score_grid``), when the other ranks wait for
        nothing but its report."""
        out = [self.shared_samples(net, w, n, seed=seed, progress=progress, autocast=autocast, final=True, rank=rank,
                                   world=world, label=label) for w in guidances]
        return None if rank != 0 else out


def resize_samples(images: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    """uint8 samples at the shape the evaluation scores (None or their own: unchanged): bilinear, as the digits
    data are upsampled from their native 8x8 (``pdcbdm.data.digits``), so that the samples of a network trained at
    8x8 meet the reference images on the same footing."""
    if shape is None or tuple(images.shape[1:]) == tuple(shape):
        return images
    if images.shape[1] != shape[0]:
        raise ValueError(f"samples have {images.shape[1]} channels, the evaluation scores {shape[0]}")
    if images.shape[0] == 0:
        return images.new_zeros((0, *shape))
    out = torch.nn.functional.interpolate(images.float(), size=tuple(shape[1:]), mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def gather_to_rank0(part: dict[str, Any], device: torch.device, *, group: Any = None, wait_s: float | None = None,
                    what: str = "the other workers' parts") -> list[dict[str, Any]] | None:
    """Every rank's ``part`` (tensors, strings, None) on rank 0, in rank order; None on the other ranks.

    ``group``: the process group (None: the default group), spanning every rank; ``wait_s``: this rank's limit
    for the exchange (each of its two operations), set as the group's timeout, so only for a group of the
    exchange's own. A wait that ends without the parts (a timeout, or a worker lost) raises ``ShareWaitError``
    naming ``what``; NCCL's timeout is an abort, which never gets here. Read back with ``weights_only`` (tensors
    and plain values only). NCCL moves the bytes through the current CUDA device, hence the device context."""
    rank, world = dist.get_rank(), dist.get_world_size(group)
    parts: list[Any] | None = [None] * world if rank == 0 else None
    if wait_s is not None:
        dist.set_timeout(timedelta(seconds=wait_s), group)
    start = time.monotonic()
    try:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            dist.gather_object(part, parts, dst=0, group=group, weights_only=True)
    except RuntimeError as exc:  # gloo's timeout or a lost peer (DistBackendError is a RuntimeError)
        limit = "" if wait_s is None else f" (its limit: {wait_s:.0f} s)"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ShareWaitError(f"rank {rank} waited {time.monotonic() - start:.0f} s{limit} for {what} and stopped "
                             f"without them: {reason}") from exc
    return parts

"""Generated samples for an evaluation: drawn with classifier-free guidance by one worker or shared out between the
workers of a trial (each samples its rows and extracts their features, rank 0 gathers them), at the shape the
evaluation scores."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
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

__all__ = ["Samples", "SampleSource", "resize_samples", "gather_to_rank0"]


@dataclass
class Samples:
    """One generated set in the order one worker would draw it: uint8 images, labels and their features."""

    images: torch.Tensor
    labels: torch.Tensor
    features: FeatureSet


@dataclass
class SampleSource:
    """What every worker needs for its share of an evaluation: the config's samplers and the feature extractor.

    The reference statistics, judge and floors stay with rank 0's ``Evaluator``: the other workers only sample
    their rows of each batch, extract features and send them to rank 0 (``shared_samples``)."""

    cfg: Config
    extractor: FeatureExtractor
    num_classes: int
    image_shape: tuple[int, int, int]
    device: torch.device
    score_shape: tuple[int, int, int] | None = None

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
                       world: int = 1) -> Samples | None:
        """n samples drawn by ``world`` workers together (every rank calls it: a collective): each samples its
        rows and extracts their features, rank 0 gathers them in the one-worker order and returns them; the
        other ranks return None. With one worker, the plain sampling."""
        images, labels = self.sample(net, guidance, n, seed=seed, progress=progress, autocast=autocast, final=final,
                                     rank=rank, world=world)
        if world == 1:
            return Samples(images, labels, self.features(images, labels))
        feats, logits = self._extract(images)
        part = {"index": share_indices(n, self.cfg.eval.batch_size, rank, world), "images": images,
                "features": torch.from_numpy(feats), "logits": None if logits is None else torch.from_numpy(logits),
                "extractor": self.extractor.identity}
        parts = gather_to_rank0(part, self.device)
        return None if parts is None else self._assemble(parts, n)

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
                     world: int = 1) -> list[Samples] | None:
        """A final evaluation's samples at each guidance value (``shared_samples``; every rank calls it): the
        gathered sets on rank 0, None on the others."""
        out = [self.shared_samples(net, w, n, seed=seed, progress=progress, autocast=autocast, final=True, rank=rank,
                                   world=world) for w in guidances]
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


def gather_to_rank0(part: dict[str, Any], device: torch.device) -> list[dict[str, Any]] | None:
    """Every rank's ``part`` (tensors, strings, None) on rank 0, in rank order; None on the other ranks.

    Read back with ``weights_only`` (tensors and plain values only). NCCL moves the bytes through the current CUDA
    device, hence the device context."""
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[Any] | None = [None] * world if rank == 0 else None
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        dist.gather_object(part, parts, dst=0, weights_only=True)
    return parts

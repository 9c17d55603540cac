"""The in-domain CNN of a user's own data (``eval.extractor=domain``): the digits CNN's role, for any prepared set.

A small CNN trained on the prepared folder's train split is the feature network of FID / precision-recall / PRD
and, because it classifies exactly the data's classes, the classifier behind class consistency and the judge
(``logit_classes``). It needs no download: evaluation on own data works offline right after installation.

Rules:
  * input: the data's uint8 images, any channels; a side above ``max_side`` is area-averaged down to it first (a
    CPU trains and runs it at any prepared size), then conv stages halve the side down to 4x4;
  * training: class-balanced batches (every class drawn equally often, whatever its count: the long tail must
    not leave the tail classes unreadable), ``DomainNetConfig.steps`` steps on one thread with its own seed;
  * checked on the held-out split (mean per-class accuracy, recorded: user data may be hard, nothing is refused);
  * cached in the cache folder by the data digest of _meta.json, the class names and the settings, and trained
    once per node even when several trials ask at once (a lock file beside the cache file);
  * identity: ``domain-cnn/sha256:<weights>``, as every extractor: the feature space runs record and compare.
Features are the penultimate embedding (before its ReLU, as the digits CNN's); logits its K-way output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdcbdm.data.own import prepared_heldout, prepared_train
from pdcbdm.data.prepared import read_prepared_meta
from ._io import atomic_torch_save, resolve_cache_dir, sha256_state, sha256_text
from .extractor_base import InDomainExtractor

__all__ = ["DomainNetConfig", "DomainNet", "DomainExtractor", "train_domain_net", "domain_net_path"]

_FORMAT = 1
NAME = "domain-cnn"
MIN_SIDE = 8


@dataclass(frozen=True)
class DomainNetConfig:
    """Architecture and training of the in-domain CNN (every field is part of the cache key).

    Args:
        embed_dim: size of the penultimate embedding (the FID features).
        width: channels of the first conv stage; each later stage doubles them, up to 4 x width.
        max_side: larger images are area-averaged down to this side first.
        epochs: passes over the train split the step count aims at, within [min_steps, max_steps].
        min_steps, max_steps: bounds of the step count.
        batch_size: images per step.
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        seed: seeds the initialisation, dropout and the batches.
    """

    embed_dim: int = 64
    width: int = 32
    max_side: int = 32
    epochs: float = 10.0
    min_steps: int = 300
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "width", "min_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DomainNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_side < MIN_SIDE:
            raise ValueError(f"DomainNetConfig.max_side must be >= {MIN_SIDE}, got {self.max_side}")
        if self.max_steps < self.min_steps or self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"DomainNetConfig: need max_steps >= min_steps, epochs > 0 and lr > 0, got "
                             f"{self.max_steps}, {self.min_steps}, {self.epochs}, {self.lr}")

    def steps(self, num_images: int) -> int:
        """Training steps for a train split of ``num_images``: ``epochs`` passes, within the bounds."""
        return int(min(max(math.ceil(self.epochs * num_images / self.batch_size), self.min_steps), self.max_steps))


def input_side(image_size: int, max_side: int) -> int:
    """The side the network works at: the largest power of two <= min(image_size, max_side)."""
    if image_size < MIN_SIDE:
        raise ValueError(f"the domain CNN needs images of at least {MIN_SIDE}x{MIN_SIDE}, got side {image_size}")
    return 2 ** int(math.log2(min(image_size, max_side)))


class DomainNet(nn.Module):
    """Conv stages (conv 3x3, batch norm, ReLU, 2x2 max pool) from ``input_side`` down to 4x4, a linear embedding
    and a K-way classifier.

    Args:
        in_channels: image channels (1 or 3, any).
        image_size: side of the data's images.
        num_classes: K.
        embed_dim, width, max_side: as DomainNetConfig.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, embed_dim: int = 64, width: int = 32,
                 max_side: int = 32) -> None:
        super().__init__()
        self.side = input_side(image_size, max_side)
        layers: list[nn.Module] = []
        now = in_channels
        for i in range(int(math.log2(self.side // 4))):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(now, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            now = out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(now * 16, embed_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(embed_dim, num_classes))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, C, H, W] -> (embedding [B, embed_dim], logits [B, K])."""
        x = images.to(torch.float32) / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (self.side, self.side):
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        embedding = self.body(x)
        return embedding, self.head(embedding)


def _balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return 1.0 / counts.clamp(min=1)[labels]


def balanced_accuracy(net: DomainNet, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float | None:
    """Mean over the classes present of each class's accuracy (None without images)."""
    if len(labels) == 0:
        return None
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(images[s:s + 500])[1].argmax(1) for s in range(0, len(labels), 500)])
    right = [(predicted[labels == k] == k).double().mean() for k in range(num_classes) if (labels == k).any()]
    return float(torch.stack(right).mean())


def train_domain_net(train: Any, heldout: Any | None, config: DomainNetConfig = DomainNetConfig()
                     ) -> tuple[DomainNet, float | None]:
    """Train the CNN on ``train`` (an ImageDataset: uint8 images, labels, class names, hflip) with class-balanced
    batches and measure its balanced accuracy on ``heldout``; one thread, the global RNG left untouched.

    Returns:
        (network in eval mode, held-out balanced accuracy or None without held-out images).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same network on every machine size; no oversubscription beside trials
    try:
        with torch.random.fork_rng(devices=[]):
            net = _train(train, config)
    finally:
        torch.set_num_threads(threads)
    if heldout is None:
        return net, None
    return net, balanced_accuracy(net, heldout.images, heldout.labels, train.num_classes)


def _train(train: Any, config: DomainNetConfig) -> DomainNet:
    c, h, _ = train.image_shape
    torch.manual_seed(config.seed)
    net = DomainNet(c, h, train.num_classes, config.embed_dim, config.width, config.max_side)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    weights = _balanced_weights(train.labels, train.num_classes)
    gen = torch.Generator().manual_seed(config.seed)
    net.train()
    for _ in range(config.steps(len(train))):
        # a gather of one batch from the (memory-mapped) images: the split is never copied whole
        idx = torch.multinomial(weights, config.batch_size, replacement=True, generator=gen).sort().values
        images = train.images[idx]
        if train.hflip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        loss = F.cross_entropy(net(images)[1], train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def domain_net_path(cache_dir: str | os.PathLike[str] | None, config: DomainNetConfig, digest: str,
                    class_names: Sequence[str]) -> Path:
    """Cache file of the network trained with ``config`` on the prepared data of ``digest``."""
    key = sha256_text(f"{NAME}-v{_FORMAT}", json.dumps(dataclasses.asdict(config), sort_keys=True), digest,
                      json.dumps(list(class_names)))
    return resolve_cache_dir(cache_dir) / f"{NAME}-{key[:20]}.pt"


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (created): the trials of a node that ask for the same uncached network
    wait for the first one's instead of each training their own."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class DomainExtractor(InDomainExtractor):
    """The trained in-domain CNN as a FeatureExtractor: ``embed_dim`` features, logits over the data's classes.

    Args:
        net: trained network.
        accuracy: its held-out balanced accuracy (None: no held-out images).
        class_names: the classes its logits classify (``logit_classes``).
        input_shape: (C, H, W) of the images it takes.
        device: where it runs.
    """

    name = NAME

    def __init__(self, net: DomainNet, accuracy: float | None, class_names: Sequence[str],
                 input_shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.net = net.eval().requires_grad_(False)
        self.accuracy = None if accuracy is None else float(accuracy)
        self.feature_dim = int(net.body[-1].out_features)
        self.num_classes_logits = int(net.head[-1].out_features)
        self.logit_classes = tuple(str(n) for n in class_names)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.identity = f"{NAME}/sha256:{sha256_state(net.state_dict())}"
        self.to(device)

    @classmethod
    def load_or_train(cls, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                      device: torch.device | str = "cpu",
                      config: DomainNetConfig = DomainNetConfig()) -> DomainExtractor:
        """The cached network of the prepared folder ``root`` for ``config``, or one trained on its train split,
        checked on its held-out split and cached (atomic write, one trainer per node)."""
        meta = read_prepared_meta(root)
        names, shape = meta["class_names"], meta["image_shape"]
        path = domain_net_path(cache_dir, config, meta["digest"], names)
        with _exclusive(path.with_name(path.name + ".lock")):
            if not path.is_file():
                heldout = prepared_heldout(root) if "heldout" in meta["splits"] else None
                net, accuracy = train_domain_net(prepared_train(root), heldout, config)
                atomic_torch_save({"format": _FORMAT, "config": json.dumps(dataclasses.asdict(config)),
                                   "state_dict": net.state_dict(), "accuracy": -1.0 if accuracy is None else accuracy,
                                   "class_names": list(names), "image_shape": list(shape),
                                   "digest": meta["digest"]}, path)
        extractor = cls._from_file(path, config, names, shape, device)
        extractor.cache_files = (path,)
        return extractor

    @classmethod
    def _from_file(cls, path: Path, config: DomainNetConfig, names: Sequence[str], shape: Sequence[int],
                   device: torch.device | str) -> DomainExtractor:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a domain-network cache file of format {_FORMAT}; delete it to retrain")
        if list(blob["class_names"]) != list(names) or list(blob["image_shape"]) != list(shape):
            raise ValueError(f"{path} holds a network for other classes or images; delete it to retrain")
        net = DomainNet(int(shape[0]), int(shape[1]), len(names), config.embed_dim, config.width, config.max_side)
        net.load_state_dict(blob["state_dict"])
        accuracy = None if blob["accuracy"] < 0 else float(blob["accuracy"])
        return cls(net, accuracy, names, shape, device)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net(images)

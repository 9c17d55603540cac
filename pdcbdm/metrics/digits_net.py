"""A small digits CNN: the feature network for FID / precision-recall / PRD and the classifier for IS and class
consistency on the digits data sets (the download-free stand-in for the FID Inception of docs/method.md "Metrics").

Trained on the balanced digits training split and checked on the held-out split (>= 95% accuracy required), then
cached on disk with its accuracy. Features are the 64-d penultimate embedding (before its ReLU, so no unit is
constant zero and per-class covariances of tens of samples stay usable); logits are its 10-way output.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pdcbdm.data import build_dataset
from ._io import atomic_torch_save, dataset_identity, resolve_cache_dir, sha256_state, sha256_text
from .extractor_base import InDomainExtractor

__all__ = ["DigitsNetConfig", "DigitsNet", "DigitsExtractor", "train_digits_net", "digits_net_path"]

_FORMAT = 1
NAME = "digits-cnn"


@dataclass(frozen=True)
class DigitsNetConfig:
    """Architecture and training of the digits CNN (every field is part of the cache key).

    Args:
        embed_dim: size of the penultimate embedding used as FID features.
        epochs: passes over the training split.
        batch_size: images per step.
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        seed: seeds the initialisation, dropout and the batch order.
        min_accuracy: held-out accuracy the trained network must reach.
    """

    embed_dim: int = 64
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    min_accuracy: float = 0.95

    def __post_init__(self) -> None:
        for name in ("embed_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DigitsNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"DigitsNetConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"DigitsNetConfig.min_accuracy must be in [0, 1], got {self.min_accuracy}")


class DigitsNet(nn.Module):
    """Two conv stages (16 -> 8 -> 4 pixels), a linear embedding and a 10-way classifier.

    Args:
        embed_dim: embedding size (the FID features).
        num_classes: number of digit classes.
    """

    def __init__(self, embed_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # [B, 32, 8, 8]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 64, 4, 4]
            nn.Flatten(), nn.Linear(64 * 4 * 4, embed_dim),               # [B, embed_dim]
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(embed_dim, num_classes))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 1, 16, 16] -> (embedding [B, embed_dim], logits [B, num_classes])."""
        x = images.to(torch.float32) / 127.5 - 1.0
        embedding = self.body(x)
        return embedding, self.head(embedding)


def _accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(images[s:s + 500])[1].argmax(1) for s in range(0, len(images), 500)])
    return float((predicted == labels).double().mean())


def train_digits_net(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, config: DigitsNetConfig = DigitsNetConfig()) -> tuple[DigitsNet, float]:
    """Train the CNN (cross-entropy, Adam) and measure its held-out accuracy; the global RNG is left untouched.

    Args:
        train_images, test_images: uint8 [N, 1, 16, 16].
        train_labels, test_labels: int [N] in 0..9.
        config: architecture and training settings.

    Returns:
        (network in eval mode, held-out accuracy in [0, 1]).
    """
    threads = torch.get_num_threads()
    # One thread: results do not depend on the machine's core count, and a busy machine does not slow
    # a tiny network down through thread oversubscription.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(train_images, train_labels, test_images, test_labels, config)
    finally:
        torch.set_num_threads(threads)


def _train(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
           test_labels: torch.Tensor, config: DigitsNetConfig) -> tuple[DigitsNet, float]:
    """The training loop of `train_digits_net` (global RNG already forked)."""
    torch.manual_seed(config.seed)
    net = DigitsNet(config.embed_dim)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    labels = train_labels.to(torch.int64)
    for _ in range(config.epochs):
        net.train()
        for batch in torch.randperm(len(labels), generator=order).split(config.batch_size):
            loss = F.cross_entropy(net(train_images[batch])[1], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval(), _accuracy(net, test_images, test_labels.to(torch.int64))


def digits_net_path(cache_dir: str | os.PathLike[str] | None, config: DigitsNetConfig, data_key: str) -> Path:
    """Cache file of the network trained with `config` on the data identified by `data_key`."""
    key = sha256_text(f"{NAME}-v{_FORMAT}", json.dumps(dataclasses.asdict(config), sort_keys=True), data_key)
    return resolve_cache_dir(cache_dir) / f"{NAME}-{key[:20]}.pt"


class DigitsExtractor(InDomainExtractor):
    """The trained digits CNN as a FeatureExtractor: 64-d features, 10-way logits, 1 x 16 x 16 uint8 input.

    Args:
        net: trained network.
        accuracy: its held-out accuracy.
        device: where it runs.
    """

    name = NAME
    input_shape = (1, 16, 16)
    logit_classes = tuple(str(k) for k in range(10))  # the digits data sets' class names

    def __init__(self, net: DigitsNet, accuracy: float, device: torch.device | str = "cpu") -> None:
        self.net = net.eval().requires_grad_(False)
        self.accuracy = float(accuracy)
        self.feature_dim = int(net.body[-1].out_features)
        self.num_classes_logits = int(net.head[-1].out_features)
        self.identity = f"{NAME}/sha256:{sha256_state(net.state_dict())}"
        self.to(device)

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu",
                      config: DigitsNetConfig = DigitsNetConfig()) -> DigitsExtractor:
        """Load the cached network for `config`, or train it on build_dataset("digits", split="train"), check it
        on split="test" and cache it (atomic write).

        Args:
            cache_dir: cache folder (default $PDCBDM_CACHE or ~/.cache/pdcbdm).
            device: where the network runs.
            config: architecture and training settings.
        """
        train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
        data_key = sha256_text(dataset_identity(train.images, train.labels), dataset_identity(test.images, test.labels))
        path = digits_net_path(cache_dir, config, data_key)
        if path.is_file():
            extractor = cls._from_file(path, config, device)
        else:
            net, accuracy = train_digits_net(train.images, train.labels, test.images, test.labels, config)
            if accuracy < config.min_accuracy:
                raise RuntimeError(f"the digits network reached {accuracy:.3f} held-out accuracy, below "
                                   f"min_accuracy={config.min_accuracy}; not cached")
            atomic_torch_save({"format": _FORMAT, "config": json.dumps(dataclasses.asdict(config)),
                               "state_dict": net.state_dict(), "accuracy": accuracy}, path)
            extractor = cls(net, accuracy, device)
        extractor.cache_files = (path,)
        return extractor

    @classmethod
    def _from_file(cls, path: Path, config: DigitsNetConfig, device: torch.device | str) -> DigitsExtractor:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a digits-network cache file of format {_FORMAT}; delete it to retrain")
        net = DigitsNet(config.embed_dim)
        net.load_state_dict(blob["state_dict"])
        if blob["accuracy"] < config.min_accuracy:
            raise ValueError(f"cached digits network {path} has accuracy {blob['accuracy']:.3f} < "
                             f"{config.min_accuracy}")
        return cls(net, blob["accuracy"], device)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net(images)

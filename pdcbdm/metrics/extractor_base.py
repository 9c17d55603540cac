"""The feature-extractor interface every metric's features come from: ``FeatureExtractor`` (a frozen network from
uint8 images to features and, with a classifier head, logits) and ``InDomainExtractor`` (a network trained on the
data set's own images: the digits CNN, the domain CNN of a prepared set).

Its own module so that the networks (``digits_net``, ``domain_net``, ``inception``) and the factory that builds them
(``extractors.build_extractor``) import it without importing each other.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureExtractor", "InDomainExtractor"]


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().to(torch.float64).numpy()


class FeatureExtractor(abc.ABC):
    """A frozen network mapping uint8 images to features (and, when it has a classifier head, logits).

    Attributes:
        name: short name ("inception-v3-compat", "digits-cnn").
        identity: "<name>/sha256:<hex>" of the exact weights; part of every cached statistic's key.
        feature_dim: D of the features.
        num_classes_logits: C of the logits, or None when the network has no classifier head.
        logits_note: why there are no logits ("" when there are).
        logit_classes: the names of the classes the logits classify when the network was trained on a data set's
            own classes (the digits CNN: "0".."9"; the domain CNN: the prepared data's names); None otherwise
            (Inception's ImageNet logits serve the Inception Score only).
        device: where the network runs.
        cache_files: files of the cache folder that hold this network (a trained one), which another machine can
            copy into its own cache folder to get the very same network; () when there are none.
    """

    name: str
    identity: str
    feature_dim: int
    num_classes_logits: int | None
    logits_note: str = ""
    logit_classes: tuple[str, ...] | None = None
    device: torch.device
    cache_files: tuple[os.PathLike[str], ...] = ()

    def judges(self, class_names: Any) -> bool:
        """Whether the logits classify exactly these classes (in this order), so a judge may read them."""
        return self.logit_classes is not None and tuple(self.logit_classes) == tuple(str(n) for n in class_names)

    @property
    def has_logits(self) -> bool:
        """Whether `extract` returns logits."""
        return self.num_classes_logits is not None

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> FeatureExtractor:
        """Move the network to `device` (in place) and return self."""

    @abc.abstractmethod
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and logits (or None) of a checked uint8 batch already on `self.device`."""

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate a uint8 [B, C, H, W] batch; subclasses adapt channels."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (images.dtype, tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a uint8 tensor [B, C, H, W], got {got}")
        return images

    def extract(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [B, D] and logits [B, C] (or None) of uint8 images [B, C, H, W], both float64 numpy."""
        batch = self._check_images(images).to(self.device)
        with torch.no_grad():
            feats, logits = self._forward(batch)
        return _to_numpy(feats), (None if logits is None else _to_numpy(logits))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, feature_dim={self.feature_dim})"



class InDomainExtractor(FeatureExtractor):
    """A network trained on a data set's own images (the digits CNN, the domain CNN): it holds ``net``, takes
    images of exactly ``input_shape`` and moves with ``to``."""

    net: Any
    input_shape: tuple[int, int, int]

    def to(self, device: torch.device | str) -> InDomainExtractor:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        images = super()._check_images(images)
        if tuple(images.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"the {self.name} network takes uint8 [B, {', '.join(map(str, self.input_shape))}] "
                             f"images (its data's), got {tuple(images.shape)}")
        return images

"""Feature extractors behind one small interface, a batched `extract_all`, and `build_extractor`.

Three networks give the features every metric works on (METHOD.md "Metrics"): the FID Inception-V3 (2048-d pool3
features, 1008-way logits for IS when its weights have them) for CIFAR, a small digits CNN (64-d embedding, 10-way
logits) for the download-free digits data sets, and the in-domain CNN of a user's prepared data (``domain``, 64-d,
logits over the data's own classes; ``pdcbdm.metrics.domain_net``).

Whether a network's logits can judge a data set's classes is not a matter of their count (Inception's 1,008
ImageNet logits would "classify" a 1,008-class user set): ``logit_classes`` names the classes a network was trained
on, and only a network whose ``logit_classes`` are the data's class names judges them.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .evaluate import FeatureSet

__all__ = ["FeatureExtractor", "extract_all", "extract_feature_set", "build_extractor", "EXTRACTOR_KINDS"]

EXTRACTOR_KINDS = ("inception", "digits", "domain")


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

def _images_of(source: Any) -> torch.Tensor:
    """The uint8 image tensor of `source`: a tensor itself, or an ImageDataset-like object's `.images`."""
    images = source.images if hasattr(source, "images") else source
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"source must be a uint8 tensor [N, C, H, W] or have an .images tensor, got "
                         f"{type(source).__name__}")
    return images


def extract_all(extractor: FeatureExtractor, source: Any, batch_size: int = 100,
                device: torch.device | str | None = None,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and logits of every image of `source`, in batches.

    Args:
        extractor: the network.
        source: uint8 tensor [N, C, H, W] or an object with such an `.images` tensor (ImageDataset).
        batch_size: images per forward pass.
        device: move the extractor there first (None: leave it where it is).
        progress: show a tqdm progress bar.

    Returns:
        (features [N, D], logits [N, C] or None), float64 numpy.
    """
    images = _images_of(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        extractor.to(device)
    feats, logits = [], []
    for start in tqdm(range(0, images.shape[0], batch_size), disable=not progress,
                      desc=f"features ({extractor.name})", unit="batch"):
        f, lg = extractor.extract(images[start:start + batch_size])
        feats.append(f)
        logits.append(lg)
    if not feats:
        raise ValueError("source holds no images")
    return np.concatenate(feats), (None if logits[0] is None else np.concatenate(logits))


def extract_feature_set(extractor: FeatureExtractor, source: Any, labels: Any = None, *, batch_size: int = 100,
                        device: torch.device | str | None = None, progress: bool = True) -> FeatureSet:
    """`extract_all` wrapped into a FeatureSet that carries the extractor's identity and its no-logits note.

    Args:
        extractor, source, batch_size, device, progress: as `extract_all`.
        labels: [N] labels (for generated images: the class each was generated for); None = `source.labels`.
    """
    if labels is None:
        if not hasattr(source, "labels"):
            raise ValueError("labels is required when source has no .labels")
        labels = source.labels
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    features, logits = extract_all(extractor, source, batch_size=batch_size, device=device, progress=progress)
    return FeatureSet(features, logits, labels, extractor=extractor.identity, logits_note=extractor.logits_note)


def build_extractor(kind: str, *, weights_path: str | os.PathLike[str] | None = None,
                    device: torch.device | str = "cpu", cache_dir: str | os.PathLike[str] | None = None,
                    data_root: str | os.PathLike[str] | None = None) -> FeatureExtractor:
    """Build a feature extractor by kind.

    Args:
        kind: "inception" (FID Inception-V3, for CIFAR), "digits" (the small digits CNN, trained and cached on
            first use) or "domain" (the CNN of the prepared data in ``data_root``, trained and cached on first use).
        weights_path: Inception weights file in torch-fidelity's layout (see `resolve_inception_weights` for the
            fallbacks when None); must be None for the trained networks.
        device: where the network runs.
        cache_dir: folder of the trained networks (default $PDCBDM_CACHE or ~/.cache/pdcbdm); unused by
            "inception", whose weights come from torch-fidelity's cache or the other sources.
        data_root: the prepared folder (data.root) "domain" is trained on; unused by the others.
    """
    if kind == "inception":
        from .inception import InceptionExtractor

        return InceptionExtractor.from_sources(weights_path, device=device)
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown extractor kind {kind!r}; choose one of {EXTRACTOR_KINDS}")
    if weights_path is not None:
        raise ValueError(f"weights_path is only for kind='inception'; the {kind} network is trained and cached in "
                         f"cache_dir")
    if kind == "digits":
        from .digits_net import DigitsExtractor

        return DigitsExtractor.load_or_train(cache_dir=cache_dir, device=device)
    if data_root is None:
        raise ValueError("data_root (data.root) is required for kind='domain': the prepared folder whose train "
                         "split the network learns")
    from .domain_net import DomainExtractor

    return DomainExtractor.load_or_train(data_root, cache_dir=cache_dir, device=device)

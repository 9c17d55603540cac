"""Feature extractors behind one small interface, a batched `extract_all`, and `build_extractor`.

Three networks give the features every metric works on (docs/method.md "Metrics"): the FID Inception-V3 (2048-d pool3
features, 1008-way logits for IS when its weights have them) for CIFAR, a small digits CNN (64-d embedding, 10-way
logits) for the download-free digits data sets, and the in-domain CNN of a user's prepared data (``domain``, 64-d,
logits over the data's own classes; ``pdcbdm.metrics.domain_net``).

Whether a network's logits can judge a data set's classes is not a matter of their count (Inception's 1,008
ImageNet logits would "classify" a 1,008-class user set): ``logit_classes`` names the classes a network was trained
on, and only a network whose ``logit_classes`` are the data's class names judges them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pdcbdm.progress import tqdm
from .digits_net import DigitsExtractor
from .domain_net import DomainExtractor
from .extractor_base import FeatureExtractor, InDomainExtractor
from .scoring import FeatureSet

__all__ = ["FeatureExtractor", "InDomainExtractor", "extract_all", "extract_feature_set", "build_extractor",
           "EXTRACTOR_KINDS"]

EXTRACTOR_KINDS = ("inception", "digits", "domain")


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
        # deferred: torch-fidelity and its torchvision take seconds to import (docs/results.md, "Import costs")
        from .inception import InceptionExtractor

        return InceptionExtractor.from_sources(weights_path, device=device)
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown extractor kind {kind!r}; choose one of {EXTRACTOR_KINDS}")
    if weights_path is not None:
        raise ValueError(f"weights_path is only for kind='inception'; the {kind} network is trained and cached in "
                         f"cache_dir")
    if kind == "digits":
        return DigitsExtractor.load_or_train(cache_dir=cache_dir, device=device)
    if data_root is None:
        raise ValueError("data_root (data.root) is required for kind='domain': the prepared folder whose train "
                         "split the network learns")
    return DomainExtractor.load_or_train(data_root, cache_dir=cache_dir, device=device)

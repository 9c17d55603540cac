"""Checkpoint evaluation: sample with classifier-free guidance over a grid of w, score with ``pdcbdm.metrics``.

Shared by ``pipelines/evaluate.py`` and the search's workers so that every trial is judged the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pdcbdm.config import Config, parse_float_list
from pdcbdm.data import build_reference_dataset
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.metrics import FeatureExtractor, FeatureSet, build_extractor, evaluate_features, extract_all
from pdcbdm.metrics import fid_from_features, group_fid, reference_features
from pdcbdm.sampling import generate, uniform_labels


@dataclass
class GuidanceResult:
    """Scores of one guidance value: the flat metrics dict, the per-class table, and the samples themselves."""

    guidance: float
    metrics: dict[str, Any]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class Evaluator:
    """Everything needed to score a network: feature extractor, cached reference features, head/tail split."""

    cfg: Config
    extractor: FeatureExtractor
    reference: FeatureSet
    num_classes: int
    head: tuple[int, ...]
    tail: tuple[int, ...]
    image_shape: tuple[int, int, int]
    device: torch.device

    @classmethod
    def build(cls, cfg: Config, *, num_classes: int, head: Sequence[int], tail: Sequence[int],
              device: torch.device | str = "cpu", cache_dir: str | os.PathLike | None = None,
              progress: bool = False) -> "Evaluator":
        """Load the extractor and the reference features (the balanced set METHOD.md names), cached on disk."""
        device = torch.device(device)
        extractor = build_extractor(cfg.eval.extractor, weights_path=cfg.eval.inception_weights, device=device,
                                    cache_dir=cache_dir)
        ref_ds = build_reference_dataset(cfg.data.dataset, root=cfg.data.root, download=cfg.data.download)
        reference = reference_features(extractor, ref_ds, cache_dir, progress=progress)
        return cls(cfg, extractor, reference, num_classes, tuple(head), tuple(tail), tuple(ref_ds.image_shape), device)

    def sample(self, net: nn.Module, guidance: float, n: int, *, seed: int = 0, progress: bool = False,
               autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (uint8) with labels uniform over classes, using the config's sampler and steps."""
        s = self.cfg.sample
        labels = uniform_labels(n, self.num_classes).to(self.device)
        kw = {"autocast": autocast} if autocast else {}
        images = generate(net, GaussianDiffusion(self.cfg.diffusion), labels, self.image_shape, sampler=s.sampler,
                          steps=s.steps, guidance=guidance, eta=s.eta, null_label=self.num_classes,
                          batch_size=self.cfg.eval.batch_size, seed=seed, progress=progress, **kw)
        return images, labels.cpu()

    def features(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        feats, logits = extract_all(self.extractor, images, batch_size=self.cfg.eval.batch_size, progress=False)
        return FeatureSet(feats, logits, labels.numpy(), extractor=self.extractor.identity,
                          logits_note=getattr(self.extractor, "logits_note", ""))

    def proxy(self, net: nn.Module, *, guidance: float, seed: int = 0,
              autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The cheap scores the search's scheduler ranks trials by: ``eval.proxy_samples`` samples at one w, their
        FID and the tail classes' FID (the whole set's when no tail sample was drawn). Returns (images, labels, scores)."""
        images, labels = self.sample(net, guidance, self.cfg.eval.proxy_samples, seed=seed, autocast=autocast)
        feats = self.features(images, labels)
        ref = self.reference
        fid = fid_from_features(feats.features, ref.features)
        tail = group_fid(feats.features, feats.labels, ref.features, ref.labels, self.tail)
        return images, labels, {"proxy_fid": fid, "proxy_fid_tail": fid if tail is None else tail}

    def score(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> tuple[dict[str, Any], list[dict]]:
        """Every metric of METHOD.md for one sample set: (flat metrics, per-class rows)."""
        result = evaluate_features(self.features(images, labels), self.reference, head_classes=self.head,
                                   tail_classes=self.tail, num_classes=self.num_classes, seed=seed)
        return result.to_dict(), result.per_class

    def evaluate_grid(self, net: nn.Module, guidances: Sequence[float] | None = None, *, n: int | None = None,
                      seed: int = 0, progress: bool = False,
                      autocast: Callable[[], Any] | None = None) -> list[GuidanceResult]:
        """One sampling per guidance value (the grid of ``eval.guidance_grid`` by default), each fully scored."""
        grid = list(guidances) if guidances is not None else list(parse_float_list(self.cfg.eval.guidance_grid, "eval.guidance_grid"))
        n = n or self.cfg.eval.num_samples
        out = []
        for w in grid:
            images, labels = self.sample(net, w, n, seed=seed, progress=progress, autocast=autocast)
            metrics, per_class = self.score(images, labels, seed=seed)
            out.append(GuidanceResult(w, {"guidance": w, **metrics}, per_class, images, labels))
        return out


def best_by_fid(results: Sequence[GuidanceResult]) -> GuidanceResult:
    """The guidance value with the lowest FID."""
    if not results:
        raise ValueError("no guidance results to choose from")
    return min(results, key=lambda r: r.metrics["fid"])


def headline(result: GuidanceResult) -> dict[str, float | None]:
    """The metrics a search ranks and tables show, from one guidance value's scores."""
    keys = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "consistency_mean",
            "consistency_head", "consistency_tail", "tail_to_head_confusion")
    return {k: result.metrics.get(k) for k in keys}

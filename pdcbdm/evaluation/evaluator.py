"""A trained network's report: ``Evaluator`` samples it with classifier-free guidance over a grid of w and scores
every sample set with ``pdcbdm.metrics``, each score beside its noise floor (``<metric>_floor``,
``<metric>_floor_std``: the same metric for real images outside the reference at the same per-class counts,
``pdcbdm.metrics.floor``, computed once per data set, extractor and size and cached on disk).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pdcbdm.config import Config, parse_float_list
from pdcbdm.data import PREPARED, dataset_image_shape
from pdcbdm.metrics import (FLOOR_SEEDS, FeatureExtractor, FeatureSet, FloorUnavailable, Judge, evaluate_features,
                            extract_all, fid_to_reference, floor_data_key, noise_floor,
                            proxy_noise_floor, shot_groups)
from pdcbdm.metrics.memorisation import memorisation_floor, memorisation_report, memorisation_share

from .real_sets import RealSets
from .samples import Samples, SampleSource, ShareExchange, resize_samples
from .settings import feature_extractor

__all__ = ["GuidanceResult", "Evaluator"]


@dataclass
class GuidanceResult:
    """Scores of one guidance value: the flat metrics dict, the per-class table, and the samples themselves."""

    guidance: float
    metrics: dict[str, Any]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)  # sample_s, score_s


@dataclass
class Evaluator:
    """Everything needed to score a network: feature extractor, cached reference features, head/tail split."""

    cfg: Config
    extractor: FeatureExtractor
    reference: FeatureSet
    num_classes: int
    head: tuple[int, ...]
    tail: tuple[int, ...]
    image_shape: tuple[int, int, int]  # the network's (data.image_size); samples are scored at score_shape
    device: torch.device
    score_shape: tuple[int, int, int] | None = None
    judge: Judge | None = None
    floor_pool: FeatureSet | None = None
    floor_note: str | None = None
    cache_dir: str | os.PathLike | None = None
    floor_seeds: int = FLOOR_SEEDS
    reference_kind: str | None = None
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    train_features: FeatureSet | None = None
    judge_accuracy: float | None = None
    judge_network: FeatureExtractor | None = None  # the judging network when it is not the extractor (eval.judge)
    exchange: ShareExchange = field(default_factory=ShareExchange)  # where a trial's workers send their shares
    _memorisation_floor: dict[str, Any] | None = field(default=None, repr=False)
    _floors: dict[tuple, dict[str, Any]] = field(default_factory=dict, repr=False)
    _floor_key: str | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: Config, *, num_classes: int, head: Sequence[int], tail: Sequence[int],
              device: torch.device | str = "cpu", cache_dir: str | os.PathLike | None = None,
              progress: bool = False, train_counts: Sequence[int] | None = None) -> "Evaluator":
        """Load the extractor, the reference features (``eval.reference``: the balanced set docs/method.md names; for a
        prepared set by default its training set re-weighted to a balanced mixture), the class judge calibrated on
        held-out images and the floor data set's features, all cached on disk. ``train_counts`` (images per class
        the network trained on) adds the many/medium/few-shot groups (``shot_groups``)."""
        device = torch.device(device)
        extractor = feature_extractor(cfg, device, cache_dir)
        real = RealSets.load(cfg, extractor, num_classes, cache_dir, progress)
        shape = dataset_image_shape(cfg.data.dataset, cfg.data.image_size, root=cfg.data.root)
        return cls(cfg, extractor, real.reference, num_classes, tuple(head), tuple(tail), shape, device,
                   score_shape=real.score_shape, judge=real.judge, floor_pool=real.floor_pool,
                   floor_note=real.floor_note, cache_dir=cache_dir, reference_kind=real.kind,
                   groups=_groups(cfg, train_counts), train_features=real.train,
                   judge_accuracy=real.judge_accuracy, judge_network=real.judge_network)

    @property
    def judge_kind(self) -> str:
        """What judged class consistency (the run's ``pdcbdm.judge`` tag): the network's name and the classes it
        covers, or "none"."""
        if self.judge is None:
            return "none"
        accuracy = "" if self.judge_accuracy is None else f", held-out accuracy {self.judge_accuracy:.3f}"
        if self.judge_network is not None:
            network = self.judge_network.name
        elif self.judge.probe is not None:
            network = f"linear probe on {self.extractor.name}"
        else:
            network = self.extractor.name
        return f"{network} ({len(self.judge.covered_classes)} of {self.num_classes} classes{accuracy})"

    def scoring(self) -> dict[str, str]:
        """How this evaluator scores (its reference images' kind and its judge, in words): runs scored differently
        are never ranked together, so a run records these beside its scores."""
        return {"reference_kind": str(self.reference_kind), "judge": self.judge_kind}

    @property
    def source(self) -> SampleSource:
        """The sampling and feature side of this evaluator (what the other workers of a trial hold too)."""
        return SampleSource(self.cfg, self.extractor, self.num_classes, self.image_shape, self.device,
                            self.score_shape, self.exchange)

    def sample(self, net: nn.Module, guidance: float, n: int, *, seed: int = 0, progress: bool = False,
               autocast: Callable[[], Any] | None = None, final: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (uint8) with labels uniform over classes: with the config's sampler and steps, except for a
        ``final`` evaluation under ``eval.protocol=paper`` (see ``final_sampling``)."""
        return self.source.sample(net, guidance, n, seed=seed, progress=progress, autocast=autocast, final=final)

    def features(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """The samples' features (and the judging network's, ``_with_judged``)."""
        return self._with_judged(self.source.features(images, labels), images)

    def _with_judged(self, feats: FeatureSet, images: torch.Tensor) -> FeatureSet:
        """``feats`` with the judging network's features and logits of ``images`` attached when another network
        than the extractor judges classes (``eval.judge=cnn``)."""
        if self.judge_network is None:
            return feats
        judged, logits = extract_all(self.judge_network, resize_samples(images, self.score_shape),
                                     batch_size=self.cfg.eval.batch_size, progress=False)
        return dataclasses.replace(feats, judged=FeatureSet(judged, logits, feats.labels,
                                                            extractor=self.judge_network.identity))

    def proxy(self, net: nn.Module, *, guidance: float, seed: int = 0,
              autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The cheap scores the search's scheduler ranks trials by: ``eval.proxy_samples`` samples at one w, their
        FID and the tail classes' FID (the whole set's when no tail sample was drawn). Returns (images, labels, scores)."""
        images, labels = self.sample(net, guidance, self.cfg.eval.proxy_samples, seed=seed, autocast=autocast)
        feats = self.features(images, labels)
        stats = self.reference.reference_statistics  # computed at the first proxy, then kept
        fid = fid_to_reference(feats.features, stats, device=self.device)
        tail = fid_to_reference(feats.features, stats, self.tail, feats.labels, self.device)
        scores = {"proxy_fid": fid, "proxy_fid_tail": fid if tail is None else tail}
        return images, labels, {**scores, **self.floors(feats.labels, proxy=True)}

    def score(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> tuple[dict[str, Any], list[dict]]:
        """Every metric of docs/method.md for one sample set, with its noise floor: (flat metrics, per-class rows).

        Flat floors: ``<metric>_floor`` and ``<metric>_floor_std`` of every whole-set and group metric (or a
        ``floor_note`` when there is no floor); per-class rows get fid_floor, kid_floor, consistency_floor and
        reject_rate_floor."""
        return self.score_features(self.features(images, labels), seed=seed)

    def score_features(self, feats: FeatureSet, *, seed: int = 0) -> tuple[dict[str, Any], list[dict]]:
        """``score`` of a sample set whose features are already extracted."""
        result = evaluate_features(feats, self.reference, head_classes=self.head, tail_classes=self.tail,
                                   num_classes=self.num_classes, seed=seed, judge=self.judge, groups=self.groups)
        floors = self.floors(feats.labels)
        flat = {k: v for k, v in floors.items() if "_class_" not in k}
        rows = _rows_with_floors(result.per_class, floors)
        memorisation = self.memorisation(feats)
        if memorisation:
            for row in rows:
                row["memorisation"] = memorisation["memorisation_class"][row["label"]]
                row["memorisation_floor"] = memorisation["memorisation_floor_class"][row["label"]]
        scalars = {k: v for k, v in memorisation.items() if not k.endswith("_class")}
        return {**result.to_dict(), **flat, **scalars}, rows

    def memorisation(self, feats: FeatureSet) -> dict[str, Any]:
        """The memorisation check of a prepared set's samples (``pdcbdm.metrics.memorisation``: the share of
        samples closer to their nearest training image than that image's nearest held-out image), beside its
        floor at the same class composition (held-out images scored leave-one-out, computed once); {} where the
        data have no training features disjoint from held-out ones (the built-in sets) or no held-out images."""
        if self.train_features is None or self.floor_pool is None or len(feats) == 0:
            return {}
        train, pool = self.train_features.features, self.floor_pool
        if self._memorisation_floor is None:
            self._memorisation_floor = memorisation_floor(train, pool.features, pool.labels,
                                                          num_classes=self.num_classes, tail_classes=self.tail,
                                                          device=self.device)
        share = memorisation_share(feats.features, feats.labels, train, pool.features,
                                   num_classes=self.num_classes, tail_classes=self.tail, device=self.device)
        return memorisation_report(share, self._memorisation_floor, feats.labels, self.tail)

    def floors(self, labels: Any, *, proxy: bool = False) -> dict[str, Any]:
        """The noise floors for a generated set with these labels (same count per class), computed once per count
        vector (in memory, and on disk by ``pdcbdm.metrics.floor``). ``proxy``: only the proxy scores' floors."""
        counts = tuple(int(c) for c in np.bincount(np.asarray(labels), minlength=self.num_classes))
        key = (proxy, counts)
        if key not in self._floors:
            self._floors[key] = self._compute_floors(counts, proxy)
        return self._floors[key]

    def _compute_floors(self, counts: tuple[int, ...], proxy: bool) -> dict[str, Any]:
        if self.floor_pool is None:
            return {} if proxy else {"floor_note": self.floor_note}
        if self._floor_key is None:
            self._floor_key = floor_data_key(self.floor_pool, self.reference)
        common = {"seeds": self.floor_seeds, "cache_dir": self.cache_dir, "data_key": self._floor_key}
        try:
            if proxy:
                return proxy_noise_floor(self.floor_pool, self.reference, counts, tail_classes=self.tail, **common)
            return noise_floor(self.floor_pool, self.reference, counts, head_classes=self.head,
                               tail_classes=self.tail, num_classes=self.num_classes, judge=self.judge,
                               groups=self.groups, **common)
        except FloorUnavailable as exc:
            return {} if proxy else {"floor_note": str(exc)}

    def evaluate_grid(self, net: nn.Module, guidances: Sequence[float] | None = None, *, n: int | None = None,
                      seed: int = 0, progress: bool = False, autocast: Callable[[], Any] | None = None,
                      world: int = 1, label: str = "a final evaluation") -> list[GuidanceResult]:
        """One sampling per guidance value (the grid of ``eval.guidance_grid`` by default), each fully scored; the
        samples follow ``eval.protocol`` (``final_sampling``).

        ``world`` > 1: this is rank 0 of ``world`` workers that split the sampling (the others call
        ``SampleSource.grid_samples`` with the same arguments and their rank); their samples' features are
        gathered here, every guidance value's before any is scored, and scored as the one-worker samples would be."""
        grid = (list(guidances) if guidances is not None
                else list(parse_float_list(self.cfg.eval.guidance_grid, "eval.guidance_grid")))
        sets = self.source.grid_samples(net, grid, n or self.cfg.eval.num_samples, seed=seed, progress=progress,
                                        autocast=autocast, world=world, label=label)
        return self.score_grid(grid, sets, seed=seed)

    def score_grid(self, guidances: Sequence[float], sets: Sequence[Samples], *,
                   seed: int = 0) -> list[GuidanceResult]:
        """The full scores of the sample sets drawn at ``guidances`` (``SampleSource.grid_samples``), in order."""
        out = []
        for w, got in zip(guidances, sets, strict=True):
            start = time.perf_counter()
            metrics, per_class = self.score_features(self._with_judged(got.features, got.images), seed=seed)
            timings = {"sample_s": got.seconds, "score_s": time.perf_counter() - start}
            out.append(GuidanceResult(w, {"guidance": w, **metrics}, per_class, got.images, got.labels, timings))
        return out


def _groups(cfg: Config, train_counts: Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """The many/medium/few-shot groups of a prepared set (a user's data); the built-in sets keep the paper's
    head/tail only."""
    if train_counts is None or cfg.data.dataset != PREPARED:
        return {}
    return shot_groups(train_counts)


def _rows_with_floors(rows: list[dict[str, Any]], floors: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class rows with the floors of their FID, KID, consistency and reject rate."""
    return [{**row, **{f"{key}_floor": floors.get(f"{key}_class_{row['label']}_floor")
                       for key in ("fid", "kid", "consistency", "reject_rate")}} for row in rows]

"""Checkpoint evaluation: sample with classifier-free guidance over a grid of w, score with ``pdcbdm.metrics``.

Shared by ``pipelines/evaluate.py`` and the search's workers so that every trial is judged the same way. Every
score comes with its noise floor (``<metric>_floor``, ``<metric>_floor_std``): the same metric for real images
outside the reference at the same per-class counts (``pdcbdm.metrics.floor``), computed once per data set,
extractor and size and cached on disk.

Class consistency, the reject rate and tail-to-head confusion need a classifier of the data's own classes: the
judge reads a network's logits only when the network was trained on these classes (``FeatureExtractor.judges``:
the digits CNN on digits, the domain CNN on its prepared data), never because its logits happen to number K.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pdcbdm.config import Config, DiffusionConfig, parse_float_list
from pdcbdm.data import (PREPARED, HeadTailSplit, build_calibration_dataset, build_floor_dataset,
                         build_reference_dataset, dataset_image_shape, head_tail_split, reference_image_shape,
                         reference_kind)
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.metrics import FeatureExtractor, FeatureSet, build_extractor, evaluate_features, extract_all
from pdcbdm.data.own import prepared_train
from pdcbdm.metrics import fid_from_features, group_fid, reference_features, shot_groups
from pdcbdm.metrics.memorisation import memorisation_floor, memorisation_report, memorisation_share
from pdcbdm.metrics import (FLOOR_SEEDS, FloorUnavailable, Judge, floor_data_key, load_or_calibrate_judge, noise_floor,
                            proxy_noise_floor)
from pdcbdm.sampling import generate, share_indices, uniform_labels


def evaluation_split(cfg: Config, counts: Sequence[int]) -> HeadTailSplit:
    """The head/tail classes every evaluation scores (head/tail FID, tail proxy FID, tail-to-head confusion).

    Computed from the data set's class counts with ``eval.split_ratio`` (with ``loss.split_mode`` and
    ``data.seed``), never with the searched ``loss.split_ratio`` of the PD loss, so that the scores of runs
    with different loss splits measure the same classes.
    """
    return head_tail_split(counts, cfg.eval.split_ratio, mode=cfg.loss.split_mode, seed=cfg.data.seed)


def feature_extractor(cfg: Config, device: torch.device | str = "cpu",
                      cache_dir: str | os.PathLike | None = None) -> FeatureExtractor:
    """``eval.extractor`` as this config resolves it: Inception with ``eval.inception_weights``, the digits CNN, or
    the domain CNN of the prepared folder ``data.root`` (each trained networks read from ``cache_dir``)."""
    root = cfg.data.root if cfg.eval.extractor == "domain" else None
    return build_extractor(cfg.eval.extractor, weights_path=cfg.eval.inception_weights, device=device,
                           cache_dir=cache_dir, data_root=root)


def sampler_settings(cfg: Config) -> dict[str, Any]:
    """The config's own sampler (``sample.*``): what proxies, grids and ``eval.protocol=fast`` use."""
    s = cfg.sample
    return {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "clip_x0": True}


def final_sampling(cfg: Config) -> tuple[DiffusionConfig, dict[str, Any]]:
    """(diffusion config, sampler settings) of a final evaluation.

    ``eval.protocol=paper`` is CBDM's reference evaluation, which the PD-CBDM paper follows ("same as baseline"):
    1000-step ancestral DDPM with the fixedlarge variance and the mean of Eq. 7 taken before any clipping of x0,
    so that CIFAR scores compare with the paper's. ``fast`` uses the config's own sampler (``sample.*``).
    """
    if cfg.eval.protocol == "paper":
        return (dataclasses.replace(cfg.diffusion, var_type="fixedlarge"),
                {"sampler": "ddpm", "steps": cfg.diffusion.timesteps, "eta": 1.0, "clip_x0": False})
    return cfg.diffusion, sampler_settings(cfg)


@dataclass
class GuidanceResult:
    """Scores of one guidance value: the flat metrics dict, the per-class table, and the samples themselves."""

    guidance: float
    metrics: dict[str, Any]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


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
    _memorisation_floor: dict[str, Any] | None = field(default=None, repr=False)
    _floors: dict[tuple, dict[str, Any]] = field(default_factory=dict, repr=False)
    _floor_key: str | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: Config, *, num_classes: int, head: Sequence[int], tail: Sequence[int],
              device: torch.device | str = "cpu", cache_dir: str | os.PathLike | None = None,
              progress: bool = False, train_counts: Sequence[int] | None = None) -> "Evaluator":
        """Load the extractor, the reference features (``eval.reference``: the balanced set METHOD.md names; for a
        prepared set by default its training set re-weighted to a balanced mixture), the class judge calibrated on
        held-out images and the floor data set's features, all cached on disk. ``train_counts`` (images per class
        the network trained on) adds the many/medium/few-shot groups (``shot_groups``)."""
        device = torch.device(device)
        d, choice = cfg.data, cfg.eval.reference
        extractor = feature_extractor(cfg, device, cache_dir)
        kind = reference_kind(d.dataset, d.root, choice)
        ref_ds = build_reference_dataset(d.dataset, root=d.root, download=d.download, choice=choice)
        reference = _features(extractor, ref_ds, cache_dir, progress)
        if kind == "balanced-train":
            reference = reference.balanced(num_classes)
        cal_ds = build_calibration_dataset(d.dataset, root=d.root, download=d.download, choice=choice)
        same = getattr(cal_ds, "identity", None) is not None and cal_ds.identity == getattr(ref_ds, "identity", None)
        calibration = reference if same or d.dataset != PREPARED else _features(extractor, cal_ds, cache_dir, progress)
        judge = _judge(extractor, calibration, num_classes, ref_ds.class_names, cache_dir)
        reference = _readable(extractor, reference, ref_ds.class_names, num_classes)
        pool, note = _floor_pool(cfg, extractor, cache_dir, progress)
        shape = dataset_image_shape(d.dataset, d.image_size, root=d.root)
        groups = {} if train_counts is None else shot_groups(train_counts)
        train = _train_features(cfg, extractor, reference, kind, cache_dir, progress) if pool is not None else None
        return cls(cfg, extractor, reference, num_classes, tuple(head), tuple(tail), shape, device,
                   score_shape=tuple(ref_ds.image_shape), judge=judge, floor_pool=pool, floor_note=note,
                   cache_dir=cache_dir, reference_kind=kind, groups=groups, train_features=train,
                   judge_accuracy=None if judge is None else _accuracy(calibration, judge))

    @property
    def judge_kind(self) -> str:
        """What judged class consistency (the run's ``pdcbdm.judge`` tag): the network's name and the classes it
        covers, or "none"."""
        if self.judge is None:
            return "none"
        accuracy = "" if self.judge_accuracy is None else f", held-out accuracy {self.judge_accuracy:.3f}"
        return f"{self.extractor.name} ({len(self.judge.covered_classes)} of {self.num_classes} classes{accuracy})"

    def tags(self) -> dict[str, str]:
        """How this evaluator scores, for a run's tags: runs scored differently are never ranked together."""
        return {"pdcbdm.reference_kind": str(self.reference_kind), "pdcbdm.judge": self.judge_kind}

    @property
    def source(self) -> SampleSource:
        """The sampling and feature side of this evaluator (what the other workers of a trial hold too)."""
        return SampleSource(self.cfg, self.extractor, self.num_classes, self.image_shape, self.device,
                            self.score_shape)

    def sample(self, net: nn.Module, guidance: float, n: int, *, seed: int = 0, progress: bool = False,
               autocast: Callable[[], Any] | None = None, final: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (uint8) with labels uniform over classes: with the config's sampler and steps, except for a
        ``final`` evaluation under ``eval.protocol=paper`` (see ``final_sampling``)."""
        return self.source.sample(net, guidance, n, seed=seed, progress=progress, autocast=autocast, final=final)

    def features(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        return self.source.features(images, labels)

    def proxy(self, net: nn.Module, *, guidance: float, seed: int = 0,
              autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The cheap scores the search's scheduler ranks trials by: ``eval.proxy_samples`` samples at one w, their
        FID and the tail classes' FID (the whole set's when no tail sample was drawn). Returns (images, labels, scores)."""
        images, labels = self.sample(net, guidance, self.cfg.eval.proxy_samples, seed=seed, autocast=autocast)
        feats = self.features(images, labels)
        ref = self.reference
        fid = fid_from_features(feats.features, ref.features, weights2=ref.weights())
        tail = group_fid(feats.features, feats.labels, ref.features, ref.labels, self.tail,
                         ref_shares=ref.class_shares)
        scores = {"proxy_fid": fid, "proxy_fid_tail": fid if tail is None else tail}
        return images, labels, {**scores, **self.floors(feats.labels, proxy=True)}

    def score(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> tuple[dict[str, Any], list[dict]]:
        """Every metric of METHOD.md for one sample set, with its noise floor: (flat metrics, per-class rows).

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
                      world: int = 1) -> list[GuidanceResult]:
        """One sampling per guidance value (the grid of ``eval.guidance_grid`` by default), each fully scored; the
        samples follow ``eval.protocol`` (``final_sampling``).

        ``world`` > 1: this is rank 0 of ``world`` workers that split the sampling (the others call
        ``SampleSource.grid_samples`` with the same arguments and their rank); their samples' features are
        gathered here and scored as the one-worker samples would be."""
        grid = list(guidances) if guidances is not None else list(parse_float_list(self.cfg.eval.guidance_grid, "eval.guidance_grid"))
        n = n or self.cfg.eval.num_samples
        sets = self.source.grid_samples(net, grid, n, seed=seed, progress=progress, autocast=autocast, world=world)
        out = []
        for w, got in zip(grid, sets):
            metrics, per_class = self.score_features(got.features, seed=seed)
            out.append(GuidanceResult(w, {"guidance": w, **metrics}, per_class, got.images, got.labels))
        return out


def _readable(extractor: FeatureExtractor, reference: FeatureSet, class_names: Sequence[str],
              num_classes: int) -> FeatureSet:
    """The reference as the metrics see it: without its logits when they number K but are not this data's classes
    (``evaluate_features`` would calibrate a judge on any K-way logits), so that no class metric reads them."""
    if reference.logits is None or reference.logits.shape[1] != num_classes or extractor.judges(class_names):
        return reference
    note = f"{extractor.name}'s logits are not the data set's classes (no judge of class consistency)"
    return dataclasses.replace(reference, logits=None, logits_note=note)


def _judge(extractor: FeatureExtractor, calibration: FeatureSet, num_classes: int, class_names: Sequence[str],
           cache_dir: str | os.PathLike | None) -> Judge | None:
    """The class judge calibrated on real images the in-domain CNN never trained on (``calibration``: digits'
    reference, a prepared set's held-out reference part), cached on disk; it covers the classes with >= 2 of them
    (judge.py, "Coverage"). None when the extractor was not trained on the data set's classes (Inception) or fewer
    than 2 classes have 2 images to calibrate on."""
    c = calibration
    if c.logits is None or not extractor.judges(class_names) or c.logits.shape[1] != num_classes:
        return None
    try:
        return load_or_calibrate_judge(c.features, c.logits, c.labels, num_classes, extractor=extractor.identity,
                                       cache_dir=cache_dir)
    except ValueError:  # fewer than 2 classes to calibrate on: the metrics report why there is no consistency
        return None


def _features(extractor: FeatureExtractor, data: Any, cache_dir: str | os.PathLike | None,
              progress: bool) -> FeatureSet:
    """Features of a real image set, cached on disk by its identity and the extractor's."""
    return reference_features(extractor, data, cache_dir, dataset_id=getattr(data, "identity", None),
                              progress=progress)


def _accuracy(calibration: FeatureSet, judge: Judge) -> float | None:
    """The classifier's plain accuracy (argmax) on its held-out calibration images of the classes the judge
    covers: how well it knows the classes it judges."""
    rows = np.isin(calibration.labels, judge.covered_classes)
    if calibration.logits is None or not rows.any():
        return None
    return float((calibration.logits[rows].argmax(axis=1) == calibration.labels[rows]).mean())


def _train_features(cfg: Config, extractor: FeatureExtractor, reference: FeatureSet, kind: str,
                    cache_dir: str | os.PathLike | None, progress: bool) -> FeatureSet | None:
    """Features of a prepared set's training images for the memorisation check (the reference's own when it is
    the training set); None for a built-in set, whose floor pool may hold training images."""
    if cfg.data.dataset != PREPARED:
        return None
    if kind in ("balanced-train", "train"):
        return reference
    return _features(extractor, prepared_train(cfg.data.root), cache_dir, progress)


def _floor_pool(cfg: Config, extractor: FeatureExtractor, cache_dir: str | os.PathLike | None,
                progress: bool) -> tuple[FeatureSet | None, str | None]:
    """Features of the floor data set (``build_floor_dataset``), cached like the reference's; or a note."""
    try:
        data = build_floor_dataset(cfg.data.dataset, root=cfg.data.root, download=cfg.data.download,
                                   choice=cfg.eval.reference)
    except (OSError, ValueError) as exc:
        return None, f"no noise floor: the floor data set is unavailable ({exc})"
    if len(data) == 0:
        return None, "no noise floor: the floor data set is empty (every held-out image is in the reference)"
    return _features(extractor, data, cache_dir, progress), None


def _rows_with_floors(rows: list[dict[str, Any]], floors: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class rows with the floors of their FID, KID, consistency and reject rate."""
    return [{**row, **{f"{key}_floor": floors.get(f"{key}_class_{row['label']}_floor")
                       for key in ("fid", "kid", "consistency", "reject_rate")}} for row in rows]


def best_by_fid(results: Sequence[GuidanceResult], min_consistency: float = 0.0) -> GuidanceResult:
    """The guidance value with the lowest FID among those whose class consistency (``consistency_mean``, the
    judge's share of readable samples drawn as their own class) reaches ``min_consistency``; all values when none
    does or when the extractor has no judge (Inception). Why: FID compares the whole sample set with the
    reference and is blind to labels, so a sample of the wrong class costs it nothing; on Digits-LT the lowest FID
    is at w = 0, where 15% of the samples are of another class (``eval.min_consistency``)."""
    if not results:
        raise ValueError("no guidance results to choose from")

    def consistent(r: GuidanceResult) -> bool:
        value = r.metrics.get("consistency_mean")
        return value is None or value >= min_consistency

    pool = [r for r in results if consistent(r)] or list(results)
    return min(pool, key=lambda r: r.metrics["fid"])


HEADLINE_KEYS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "kid", "kid_head",
                 "kid_tail", "consistency_mean", "consistency_head", "consistency_tail", "tail_to_head_confusion",
                 "reject_rate", "reject_rate_head", "reject_rate_tail", "fid_few", "kid_few", "consistency_few",
                 "memorisation", "memorisation_tail")


def headline(result: GuidanceResult) -> dict[str, float | None]:
    """The metrics a search ranks and tables show, from one guidance value's scores, each with its noise floor
    (``<metric>_floor``) and the floor's spread over the real draws (``<metric>_floor_std``)."""
    out = {k: result.metrics.get(k) for k in HEADLINE_KEYS}
    out.update({f"{k}_floor{s}": result.metrics.get(f"{k}_floor{s}") for k in HEADLINE_KEYS for s in ("", "_std")})
    return out

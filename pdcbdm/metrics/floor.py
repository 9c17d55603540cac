"""Noise floors: every metric computed real-vs-real at the generated set's size, to read a score against.

At the sizes a CPU evaluation affords, the metrics are far from their large-N values even for a perfect generator:
per-class FID at tens of samples per class is far above 0 between two real samples, and PRD or consistency have
floors of their own (the digits' floors: docs/evaluation.md, "Reading small samples honestly"). `noise_floor` measures
that baseline: it draws real images that are disjoint from the reference, with exactly the generated set's count per
class (the evaluation's labels are uniform over classes), and scores them against the same reference with the same
settings and the same judge as the generated set. What is averaged: `FLOOR_SEEDS` = 3 independent draws (draw r uses
seed r for the images and for PRD's clusterings); each metric M is reported as M_floor (their mean) and M_floor_std
(their sample standard deviation, ddof = 1), so a generated score within a couple of M_floor_std of M_floor is
indistinguishable from real data at this N. The draws' raw scores are cached as JSON (atomic writes) in the cache
folder's "floor" subfolder, keyed by the content of both feature sets, the extractor, the judge, the per-class
counts, the head/tail split and the settings: the floor of a data set / extractor / N is computed once.

Short classes: a class whose floor pool holds fewer images than the generated set has samples of it cannot have a
per-class floor at that size. It is left out of the per-class floors and named (``floor_short_classes``, with a
``floor_note``), and its draws hold every floor image it has, so that the whole-set and group floors of the other
classes are still reported (they then rest on fewer images of the short classes than the generated set, which can
only raise them: a conservative floor). Only when every class of the generated set is short is there no floor
(``FloorUnavailable``).

The real images (`pdcbdm.data.build_floor_dataset`): for digits the training pool outside the held-out reference,
for CIFAR the test split against the training-set reference, for a prepared set its held-out images outside the
reference (`pdcbdm.data.own`). Caveat for digits: the digits CNN was trained on that pool, so the consistency and
reject-rate floors describe images the judge has seen, a small optimism (its accuracy on the pool against the
held-out split: docs/results.md, "Metrics"). The diffusion model learns from the same pool, so it is also the
distribution a perfect generator would reproduce.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdcbdm.io import write_json_atomic

from ._io import resolve_cache_dir, sha256_text
from .fid import fid_to_reference
from .scoring import METRICS_VERSION, FeatureSet, evaluate_features
from .judge import Judge, feature_set_digest

__all__ = ["FLOOR_SEEDS", "FloorUnavailable", "floor_draw", "short_classes", "summarise_draws", "floor_data_key",
           "floor_cache_path", "noise_floor", "noise_floor_draws", "proxy_noise_floor", "proxy_noise_floor_draws"]

FLOOR_SEEDS = 3
# The cache key holds METRICS_VERSION too: a changed metric definition never reads an old floor.
_FORMAT = f"pdcbdm-floor-v1-metrics{METRICS_VERSION}"
# Counts and sizes describe the set, not its quality: no floor.
_NOT_METRICS = ("num_generated", "num_reference", "prd_n", "prd_clusters", "guidance")


class FloorUnavailable(ValueError):
    """The floor data set has too few images of some class for the requested draw (of every class, for the
    floors: see the module docstring)."""


def short_classes(pool: FeatureSet, counts: Sequence[int]) -> list[int]:
    """The classes k whose floor images are fewer than counts[k]."""
    have = np.bincount(pool.labels, minlength=len(counts))
    return [k for k, count in enumerate(counts) if count > have[k]]


def _unavailable(pool: FeatureSet, k: int, count: int) -> FloorUnavailable:
    return FloorUnavailable(f"the floor data set has {int((pool.labels == k).sum())} images of class {k}, the "
                            f"generated set {count}: no real-vs-real floor at this size")


def floor_draw(pool: FeatureSet, counts: Sequence[int], seed: int, *, allow_short: bool = False) -> FeatureSet:
    """A seeded draw without replacement of counts[k] images of each class k from `pool` (rows by class); with
    ``allow_short``, every image of a class that has fewer (else FloorUnavailable)."""
    rng = np.random.default_rng(seed)
    picked = []
    for k, count in enumerate(counts):
        members = np.flatnonzero(pool.labels == k)
        if count > len(members) and not allow_short:
            raise _unavailable(pool, k, count)
        picked.append(rng.choice(members, size=min(int(count), len(members)), replace=False))
    idx = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return pool.subset(idx)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise_draws(draws: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """{M_floor: mean, M_floor_std: sample std (None for one draw)} over the draws, for every numeric metric M
    (None values skipped; M_floor is None when no draw has a value)."""
    keys = [k for k in dict.fromkeys(k for d in draws for k in d)
            if k not in _NOT_METRICS and not k.startswith("n_class_")
            and any(_is_number(d.get(k)) for d in draws)]
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(d[key]) for d in draws if _is_number(d.get(key))]
        out[f"{key}_floor"] = float(np.mean(values))
        out[f"{key}_floor_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out


def floor_data_key(pool: FeatureSet, reference: FeatureSet) -> str:
    """Content key of the two feature sets a floor depends on (hash of their arrays, extractor identities and the
    reference's class shares: the same images re-weighted are another reference)."""
    shares = "own" if reference.class_shares is None else repr(reference.class_shares.tolist())
    return sha256_text(feature_set_digest(pool.features, pool.logits, pool.labels), pool.extractor,
                       feature_set_digest(reference.features, reference.logits, reference.labels),
                       reference.extractor, shares)


def _judge_key(judge: Judge | None) -> str:
    if judge is None:
        return "no-judge"
    return sha256_text(repr((judge.min_confidence, judge.max_distance, judge.keep, judge.extractor)),
                       feature_set_digest(judge.centroids, judge.scale, np.zeros(0, dtype=np.int64)))


def floor_cache_path(key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The JSON file of the floor with cache key `key` (in the cache folder's "floor" subfolder)."""
    folder = resolve_cache_dir(cache_dir) / "floor"
    folder.mkdir(exist_ok=True)
    return folder / f"floor-{key[:24]}.json"


def _cached_draws(key: str, cache_dir: str | os.PathLike[str] | None,
                  compute: Any) -> list[dict[str, Any]]:
    """The draws stored under `key`, or `compute()`'s, written atomically first."""
    path = floor_cache_path(key, cache_dir)
    if path.is_file():
        try:
            blob = json.loads(path.read_text())
            if blob.get("format") == _FORMAT and blob.get("key") == key:
                return blob["draws"]
        except (OSError, ValueError):
            pass  # unreadable: recompute and overwrite
    draws = compute()
    write_json_atomic(path, {"format": _FORMAT, "key": key, "draws": draws})
    return draws


def _short_report(pool: FeatureSet, counts: Sequence[int]) -> tuple[list[int], dict[str, str]]:
    """The short classes and what the floors say about them ({} when none); FloorUnavailable when every class
    of the generated set is short."""
    short = short_classes(pool, counts)
    if not short:
        return [], {}
    wanted = [k for k, count in enumerate(counts) if count > 0]
    if set(wanted) <= set(short):
        raise _unavailable(pool, short[0], counts[short[0]])
    have = np.bincount(pool.labels, minlength=len(counts))
    detail = ", ".join(f"{k} ({have[k]} < {counts[k]})" for k in short)
    return short, {"floor_short_classes": ",".join(map(str, short)),
                   "floor_note": f"no per-class floor for class(es) {detail}: the floor data set has fewer images "
                                 f"of them than the generated set; the whole-set and group floors use all it has"}


def _without_classes(draw: dict[str, Any], classes: Sequence[int]) -> dict[str, Any]:
    suffixes = tuple(f"_class_{k}" for k in classes)
    return {key: value for key, value in draw.items() if not key.endswith(suffixes)}


def noise_floor(pool: FeatureSet, reference: FeatureSet, counts: Sequence[int],
                **kwargs: Any) -> dict[str, Any]:
    """Every metric of `evaluate_features` for real draws of `counts` images per class against `reference`,
    summarised: {M_floor, M_floor_std} for every numeric flat metric M of EvalResult.to_dict (per-class ones
    included), plus ``floor_short_classes`` and ``floor_note`` when some classes are short (module docstring).
    Arguments as `noise_floor_draws`."""
    _, report = _short_report(pool, [int(c) for c in counts])
    return {**summarise_draws(noise_floor_draws(pool, reference, counts, **kwargs)), **report}


def noise_floor_draws(pool: FeatureSet, reference: FeatureSet, counts: Sequence[int], *,
                      head_classes: Sequence[int], tail_classes: Sequence[int], num_classes: int,
                      judge: Judge | None = None, seeds: int = FLOOR_SEEDS,
                      cache_dir: str | os.PathLike[str] | None = None, data_key: str | None = None,
                      **evaluate_kwargs: Any) -> list[dict[str, Any]]:
    """The flat `evaluate_features` scores (EvalResult.to_dict) of each real draw, computed once and cached.

    Args:
        pool: features (and logits) of real images disjoint from the reference (`build_floor_dataset`).
        reference: the reference FeatureSet generated sets are scored against.
        counts: images per class of the generated set (np.bincount of its labels, length num_classes).
        head_classes, tail_classes, num_classes: as `evaluate_features`.
        judge: the judge the generated sets are scored with (None: the one `evaluate_features` calibrates).
        seeds: number of independent draws averaged (draw r: seed r).
        cache_dir: cache root (default $PDCBDM_CACHE or ~/.cache/pdcbdm).
        data_key: `floor_data_key(pool, reference)` when the caller has it (saves hashing the features again).
        evaluate_kwargs: further `evaluate_features` settings (k, prd_runs, prd_n_init, is_splits, device).

    Returns:
        One flat dict per draw (draw r scored with seed r), without the per-class scores of short classes.

    Raises:
        FloorUnavailable: the pool has fewer images than `counts` asks for of every class it asks for.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    counts = [int(c) for c in counts]
    settings = {k: v for k, v in evaluate_kwargs.items() if k != "device"}
    key = sha256_text(_FORMAT, "full", data_key or floor_data_key(pool, reference), _judge_key(judge),
                      json.dumps([counts, sorted(head_classes), sorted(tail_classes), num_classes, seeds,
                                  sorted(settings.items())], default=str))

    short, _ = _short_report(pool, counts)

    def compute() -> list[dict[str, Any]]:
        return [_without_classes(evaluate_features(
            floor_draw(pool, counts, seed, allow_short=True), reference, head_classes=head_classes,
            tail_classes=tail_classes, num_classes=num_classes, judge=judge, seed=seed, **evaluate_kwargs).to_dict(),
            short) for seed in range(seeds)]

    return _cached_draws(key, cache_dir, compute)


def proxy_noise_floor(pool: FeatureSet, reference: FeatureSet, counts: Sequence[int],
                      **kwargs: Any) -> dict[str, float | None]:
    """The floor of the search's proxy scores: proxy_fid_floor(_std) and proxy_fid_tail_floor(_std) (numbers only:
    the proxies are what the scheduler reads; the final evaluation's ``floor_note`` names short classes).
    Arguments as `proxy_noise_floor_draws`."""
    return summarise_draws(proxy_noise_floor_draws(pool, reference, counts, **kwargs))


def proxy_noise_floor_draws(pool: FeatureSet, reference: FeatureSet, counts: Sequence[int], *,
                            tail_classes: Sequence[int], seeds: int = FLOOR_SEEDS,
                            cache_dir: str | os.PathLike[str] | None = None,
                            data_key: str | None = None) -> list[dict[str, float]]:
    """{proxy_fid, proxy_fid_tail} of each real draw (tail FID falls back to the whole draw's FID, as the proxy
    does), computed once and cached. Arguments as `noise_floor_draws`."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    counts = [int(c) for c in counts]
    _short_report(pool, counts)
    key = sha256_text(_FORMAT, "proxy", data_key or floor_data_key(pool, reference),
                      json.dumps([counts, sorted(tail_classes), seeds]))

    def one(seed: int) -> dict[str, float]:
        draw = floor_draw(pool, counts, seed, allow_short=True)
        # against the reference as the proxy scores read it: with its class shares (a re-weighted training set)
        fid = fid_to_reference(draw.features, reference.reference_statistics)
        tail = fid_to_reference(draw.features, reference.reference_statistics, tail_classes, draw.labels)
        return {"proxy_fid": fid, "proxy_fid_tail": fid if tail is None else tail}

    return _cached_draws(key, cache_dir, lambda: [one(seed) for seed in range(seeds)])

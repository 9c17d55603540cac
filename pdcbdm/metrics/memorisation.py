"""Memorisation check: the share of generated samples that sit suspiciously close to one training image.

A long-tailed generator's classic failure is to copy the few training images of a tail class; FID against the
training set rewards that. The rule, in feature space (Euclidean distance): for a generated sample g let t be its
nearest training image and r(t) the distance from t to its nearest held-out (real, unseen) image. g is *memorised*
when ``||g - t|| < r(t)`` (strictly). A fresh real draw comes no closer to t than t's nearest held-out neighbour
often; a sample that does is suspiciously close to a copy of t. Both searches run over all training and all
held-out images regardless of class, so the rule is defined whenever the held-out set is non-empty (a tail class
often has no held-out image of its own).

Fresh real images are flagged too, and often: g's nearest training image is the nearest of N, r(t) the nearest of H,
so the rate grows with N / H (its curve on Gaussian features: docs/results.md, "Metrics"). A share therefore means
nothing on its own; it is read against `memorisation_floor`: the same statistic for the held-out images themselves,
each scored with r(t) computed leave-one-out (its own image excluded), i.e. what a generator that draws fresh real
images scores. Exact copies of training images score 1 (unless a held-out image duplicates that training image, when
r(t) = 0).

Reading the two: the rate differs between regions of feature space (their local train / held-out ratio), so
compare at the same class composition (per class, or the floor's per-class shares weighted by the generated
counts). In a class with few held-out images leave-one-out removes a visible part of the local held-out density,
which raises that class's floor, the more the fewer images it holds (the same section).

Distances are computed in row blocks ([rows, M] at a time, never Q x M for large sets), as in `precision_recall`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .precision_recall import DEFAULT_BLOCK_ELEMENTS, _as_tensor, _squared_distances

__all__ = ["nearest_neighbours", "memorised", "memorisation_share", "memorisation_floor", "memorisation_report"]

ArrayLike = np.ndarray | torch.Tensor


# ---------------------------------------------------------------- nearest neighbours

def _check_same_dim(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a_name} has {a.shape[1]}, {b_name} has {b.shape[1]}")


def _block_rows(block_rows: int | None, columns: int) -> int:
    """Query rows per distance slab: as given, or as many as keep one slab under DEFAULT_BLOCK_ELEMENTS."""
    if block_rows is None:
        return max(1, DEFAULT_BLOCK_ELEMENTS // max(columns, 1))
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
    return block_rows


def _k_nearest(queries: torch.Tensor, points: torch.Tensor, k: int, *, exclude_self: bool,
               block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [Q, k] of each query's k nearest points (nearest first) and their exact distances [Q, k].

    The ranking uses the one-matmul expansion per block; the returned distances are recomputed directly as
    ||q - p|| for the chosen points, so an exact copy has distance exactly 0 (the expansion leaves a rounding
    residue, and the memorisation rule is a strict comparison against a distance)."""
    sq = (points * points).sum(dim=1)
    indices, distances = [], []
    for start in range(0, queries.shape[0], block_rows):
        block = queries[start:start + block_rows]
        d = _squared_distances(block, points, sq)
        if exclude_self:
            # query i is point i: its own column must never win
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + start] = float("inf")
        index = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
        indices.append(index)
        distances.append(torch.linalg.vector_norm(block[:, None, :] - points[index], dim=2))
    return torch.cat(indices), torch.cat(distances)


def _prepare(queries: ArrayLike, points: ArrayLike, q_name: str, p_name: str, device: torch.device | str,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as checked tensors, centred on the points' mean (distances are translation invariant; centring
    keeps ||a||^2 + ||b||^2 - 2ab from cancelling, which matters in float32)."""
    q = _as_tensor(queries, q_name, dtype, device)
    p = _as_tensor(points, p_name, dtype, device)
    _check_same_dim(q, q_name, p, p_name)
    centre = p.mean(dim=0, keepdim=True)
    return q - centre, p - centre


def nearest_neighbours(queries: ArrayLike, points: ArrayLike, *, exclude_self: bool = False,
                       block_rows: int | None = None, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest point in Euclidean distance, computed in row blocks.

    Args:
        queries: [Q, D] features.
        points: [M, D] features searched.
        exclude_self: queries and points are the same set (queries[i] is points[i]); each query's own index is
            never returned (leave-one-out). Needs Q == M >= 2.
        block_rows: query rows per [rows, M] distance slab; None: as many as keep a slab under 2^24 elements.
        device: where distances are computed.
        dtype: float64 (default) or float32 for the ranking and the distances.

    Returns:
        (index [Q] int64 into points, distance [Q] float64). Among points at equal distance any may be returned.
    """
    q, p = _prepare(queries, points, "queries", "points", device, dtype)
    if exclude_self and (q.shape != p.shape or p.shape[0] < 2):
        raise ValueError(f"exclude_self needs queries and points to be the same set of at least 2 rows, "
                         f"got queries {tuple(q.shape)} and points {tuple(p.shape)}")
    with torch.no_grad():
        index, distance = _k_nearest(q, p, 1, exclude_self=exclude_self,
                                     block_rows=_block_rows(block_rows, p.shape[0]))
    return index[:, 0].cpu().numpy().astype(np.int64), distance[:, 0].cpu().double().numpy()


# ---------------------------------------------------------------- the rule

def memorised(gen_features: ArrayLike, train_features: ArrayLike, heldout_features: ArrayLike, *,
              device: torch.device | str = "cpu", block_rows: int | None = None) -> np.ndarray:
    """Per generated sample: whether it is memorised.

    Sample g is memorised when ||g - t|| < r(t), where t is g's nearest training image (over all of
    train_features) and r(t) the distance from t to its nearest held-out image (over all of heldout_features).

    Args:
        gen_features: [G, D] generated features.
        train_features: [N, D] training-set features (the images the generator learnt from).
        heldout_features: [H, D] real features of images the generator never saw, H >= 1.
        device: where distances are computed (float64).
        block_rows: rows per distance slab (see `nearest_neighbours`).

    Returns:
        [G] bool array.
    """
    gen = _as_tensor(gen_features, "gen_features", torch.float64, device)
    train = _as_tensor(train_features, "train_features", torch.float64, device)
    held = _as_tensor(heldout_features, "heldout_features", torch.float64, device)
    _check_same_dim(gen, "gen_features", train, "train_features")
    _check_same_dim(held, "heldout_features", train, "train_features")
    t_index, g_to_t = nearest_neighbours(gen, train, block_rows=block_rows, device=device)
    # r(t) is only needed for the training images that are some sample's nearest: search from those alone
    needed, where = np.unique(t_index, return_inverse=True)
    _, radius = nearest_neighbours(train[torch.as_tensor(needed, device=train.device)], held,
                                   block_rows=block_rows, device=device)
    return g_to_t < radius[where]


def _leave_one_out_flags(train: torch.Tensor, held: torch.Tensor, block_rows: int | None) -> np.ndarray:
    """Per held-out image h: ||h - t|| < r_h(t), t = h's nearest training image, r_h(t) = distance from t to its
    nearest held-out image other than h (the two nearest held-out images of t suffice)."""
    t_index, h_to_t = nearest_neighbours(held, train, block_rows=block_rows, device=held.device)
    needed, where = np.unique(t_index, return_inverse=True)
    centre = held.mean(dim=0, keepdim=True)  # as in `_prepare`
    with torch.no_grad():
        index, distance = _k_nearest(train[torch.as_tensor(needed, device=train.device)] - centre, held - centre, 2,
                                     exclude_self=False, block_rows=_block_rows(block_rows, held.shape[0]))
    index, distance = index.cpu().numpy()[where], distance.cpu().double().numpy()[where]
    own = np.arange(held.shape[0])
    # h itself may be t's nearest held-out image: then the next one is t's nearest "other" held-out image
    radius = np.where(index[:, 0] == own, distance[:, 1], distance[:, 0])
    return h_to_t < radius


# ---------------------------------------------------------------- shares per class and tail

def _check_labels(labels: ArrayLike, name: str, rows: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), one label per feature row, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if rows and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _check_classes(num_classes: int, tail_classes: Iterable[int]) -> list[int]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    tail = [int(c) for c in tail_classes]
    bad = [c for c in tail if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"tail_classes must lie in [0, {num_classes}), got {bad}")
    return tail


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def _summarise(flags: np.ndarray, labels: np.ndarray, num_classes: int, tail: list[int]) -> dict[str, Any]:
    return {
        "memorisation": _share(flags),
        "memorisation_tail": _share(flags[np.isin(labels, tail)]),
        "memorisation_class": [_share(flags[labels == c]) for c in range(num_classes)],
    }


def memorisation_share(gen_features: ArrayLike, gen_labels: ArrayLike, train_features: ArrayLike,
                       heldout_features: ArrayLike, *, num_classes: int, tail_classes: Iterable[int],
                       device: torch.device | str = "cpu", block_rows: int | None = None) -> dict[str, Any]:
    """Share of generated samples that are memorised (see `memorised` for the rule), overall, tail and per class.

    The nearest-neighbour searches run over all training and all held-out images regardless of class; labels
    only group the generated samples (by the class they were generated for).

    Args:
        gen_features: [G, D] generated features, G >= 1.
        gen_labels: [G] integer class each sample was generated for, in [0, num_classes).
        train_features: [N, D] training features, N >= 1.
        heldout_features: [H, D] held-out real features, H >= 1.
        num_classes: K.
        tail_classes: the tail classes' labels.
        device: where distances are computed.
        block_rows: rows per distance slab (see `nearest_neighbours`).

    Returns:
        {"memorisation": share over all samples, "memorisation_tail": share over samples of tail classes (None
        if there is none), "memorisation_class": K shares (None for a class with no sample)}. Read them against
        `memorisation_floor`.
    """
    tail = _check_classes(num_classes, tail_classes)
    gen = _as_tensor(gen_features, "gen_features", torch.float64, device)
    labels = _check_labels(gen_labels, "gen_labels", gen.shape[0], num_classes)
    flags = memorised(gen, train_features, heldout_features, device=device, block_rows=block_rows)
    return _summarise(flags, labels, num_classes, tail)


def memorisation_floor(train_features: ArrayLike, heldout_features: ArrayLike, heldout_labels: ArrayLike, *,
                       num_classes: int, tail_classes: Iterable[int], device: torch.device | str = "cpu",
                       block_rows: int | None = None) -> dict[str, Any]:
    """The memorisation share of real held-out images themselves: the noise floor of `memorisation_share`.

    Held-out image h is flagged when ||h - t|| < r_h(t), t = h's nearest training image and r_h(t) the distance
    from t to its nearest held-out image other than h (leave-one-out, else h would be its own competitor and never
    flagged). That is the score of a generator that draws fresh real images, scored against H - 1 held-out images
    instead of H: negligible where a class has hundreds of held-out images, an upward bias of a class's floor
    where it has a handful (see the module notes). Compare with `memorisation_share` per class or at the same class
    composition.

    Args:
        train_features: [N, D] training features, N >= 1.
        heldout_features: [H, D] held-out real features, H >= 2.
        heldout_labels: [H] integer classes of the held-out images, in [0, num_classes).
        num_classes, tail_classes, device, block_rows: as in `memorisation_share`.

    Returns:
        The keys of `memorisation_share`, over the held-out images grouped by their labels.
    """
    tail = _check_classes(num_classes, tail_classes)
    train = _as_tensor(train_features, "train_features", torch.float64, device)
    held = _as_tensor(heldout_features, "heldout_features", torch.float64, device)
    _check_same_dim(held, "heldout_features", train, "train_features")
    if held.shape[0] < 2:
        raise ValueError(f"heldout_features needs at least 2 rows for a leave-one-out floor, got {held.shape[0]}")
    labels = _check_labels(heldout_labels, "heldout_labels", held.shape[0], num_classes)
    flags = _leave_one_out_flags(train, held, block_rows)
    return _summarise(flags, labels, num_classes, tail)


def memorisation_report(share: dict[str, Any], floor: dict[str, Any], gen_labels: ArrayLike,
                        tail_classes: Iterable[int]) -> dict[str, Any]:
    """A sample set's memorisation beside its floor at the same class composition (module docstring): flat
    ``memorisation``, ``memorisation_tail`` and their ``_floor`` (the floor's per-class shares weighted by the
    generated counts, over the classes that have a floor, i.e. held-out images; None when none has), plus
    ``memorisation_class`` and ``memorisation_floor_class`` (K entries each, for the per-class rows)."""
    counts = np.bincount(np.asarray(gen_labels, dtype=np.int64), minlength=len(floor["memorisation_class"]))

    def weighted(classes: Iterable[int]) -> float | None:
        pairs = [(counts[k], floor["memorisation_class"][k]) for k in classes
                 if counts[k] > 0 and floor["memorisation_class"][k] is not None]
        total = sum(n for n, _ in pairs)
        return float(sum(n * v for n, v in pairs) / total) if total else None

    every = range(len(counts))
    return {"memorisation": share["memorisation"], "memorisation_tail": share["memorisation_tail"],
            "memorisation_floor": weighted(every), "memorisation_tail_floor": weighted(tail_classes),
            "memorisation_class": share["memorisation_class"],
            "memorisation_floor_class": floor["memorisation_class"]}

"""The class judge behind class consistency: counts a classifier's decision only when it can read the image.

Class consistency and tail-to-head confusion (class_metrics.py) ask a classifier which class a generated sample
shows. A plain argmax always answers, and on this project's digits CNN it answers a head class for pure noise and
for blank images (docs/results.md, "Metrics"), so unreadable tail samples counted as tail-to-head confusion.

The judge therefore rejects a sample (decision REJECT = -1) unless both tests pass:
1. confidence: its max softmax probability is at least `min_confidence`;
2. typicality: the distance of its features to the centroid of the predicted class, each feature dimension divided
   by the pooled within-class standard deviation of the real images (a diagonal Mahalanobis distance), is at most
   `max_distance`.
The first test alone does not reject noise: the CNN is over-confident off the data. The second does: with
thresholds from half of the held-out digits the joint rule keeps nearly all of the other half and rejects noise and
blank images, where a plain Euclidean distance lets noise through and a full-covariance Mahalanobis distance
over-fits the 64-d covariance and rejects unseen real digits (the same section).

Calibration (`calibrate_judge`): on real images held out from the classifier's training (for the digits CNN, the
evaluation reference, 50 per class), both thresholds sit at the same per-test quantile q, the smallest on a grid
for which the joint rule keeps at least `keep` of those images, with each image's distance to its own class centroid
taken leave-one-out so that the thresholds are not fitted to the images they are measured on. `keep` defaults to
0.98: on the digits a larger keep puts the confidence threshold below one half, so that an image the CNN splits
between two classes would still count as read, while 0.98 still rejects every noise and blank image tested (the
same section). The price is a reject-rate floor on real images, which the evaluation reports as reject_rate_floor.

Coverage. A user's tail class may have no held-out image at all (preparation never robs a tail class of its few
training images). The judge covers the classes with at least 2 calibration images (``Judge.covered``) and needs 2
such classes: a class it does not cover has no centroid to test typicality against, so a sample it would read as
that class is rejected, and the evaluation leaves samples generated for such a class unjudged (no consistency or
reject rate of their own, not in any group's), naming the classes.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write, resolve_cache_dir, sha256_text

__all__ = ["REJECT", "DEFAULT_KEEP", "Judge", "calibrate_judge", "judge_cache_path", "load_or_calibrate_judge",
           "feature_set_digest", "softmax_confidence"]

REJECT = -1
DEFAULT_KEEP = 0.98
_FORMAT = "pdcbdm-judge-v2"
# Per-test quantiles tried, from strict to lenient: the first whose joint rule keeps `keep` is chosen.
_QUANTILE_STEPS = 401


def softmax_confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max softmax probability [N], argmax [N]) of logits [N, C], computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    return prob.max(axis=1), prob.argmax(axis=1)


@dataclass(frozen=True, eq=False)
class Judge:
    """A calibrated reading rule for one classifier (see the module docstring).

    Args:
        min_confidence: smallest max softmax probability accepted.
        max_distance: largest scaled distance to the predicted class's centroid accepted.
        centroids: [K, D] class means of the calibration features.
        scale: [D] pooled within-class standard deviation per feature dimension.
        keep: the share of real calibration images the rule was set to keep.
        kept: the share it keeps on them (leave-one-out distances), >= keep.
        num_calibration: number of calibration images.
        extractor: identity of the network whose features and logits it reads.
        covered: [K] bool, the classes with >= 2 calibration images (module docstring); None: all of them.
        probe: a classifier of the features (``probe.LinearProbe``) whose logits the judge reads instead of the
            network's own, for a feature network with no head over the data's classes (Inception); None: the
            network's logits.
    """

    min_confidence: float
    max_distance: float
    centroids: np.ndarray
    scale: np.ndarray
    keep: float
    kept: float
    num_calibration: int
    extractor: str = ""
    covered: np.ndarray | None = None
    probe: Any = None  # a probe.LinearProbe; typed loosely so that judge.py imports no training code

    @property
    def num_classes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def covered_classes(self) -> tuple[int, ...]:
        """The classes the judge can read (all when ``covered`` is None)."""
        if self.covered is None:
            return tuple(range(self.num_classes))
        return tuple(int(k) for k in np.flatnonzero(self.covered))

    def distances(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Scaled distance of each feature row to the centroid of `classes[i]`."""
        diff = (np.asarray(features, dtype=np.float64) - self.centroids[classes]) / self.scale
        return np.sqrt(np.einsum("nd,nd->n", diff, diff))

    def decide(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The judged class of each sample, or REJECT where the judge cannot read it.

        Args:
            features: [N, D] features of the same network as the logits.
            logits: [N, K] classifier logits (ignored, may be None, when the judge reads its ``probe``).
        """
        if self.probe is not None:
            logits = self.probe.logits(features)
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [N, {self.num_classes}], got shape {logits.shape}")
        if len(features) != len(logits):
            raise ValueError(f"features has {len(features)} rows but logits has {len(logits)}")
        confidence, predicted = softmax_confidence(logits)
        readable = (confidence >= self.min_confidence) & (self.distances(features, predicted) <= self.max_distance)
        if self.covered is not None:
            readable &= self.covered[predicted]  # no centroid to test typicality against
        return np.where(readable, predicted, REJECT)

    def summary(self) -> dict[str, float | int]:
        """The thresholds and shares, for logs and JSON."""
        return {"judge_min_confidence": self.min_confidence, "judge_max_distance": self.max_distance,
                "judge_keep": self.keep, "judge_kept": self.kept, "judge_calibration_n": self.num_calibration,
                "judge_classes": len(self.covered_classes)}


def _leave_one_out_distances(features: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                             centroids: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Each image's scaled distance to its predicted class's centroid, its own class's centroid without itself."""
    counts = np.bincount(labels, minlength=len(centroids)).astype(np.float64)
    centre = centroids[predicted].copy()
    own = (predicted == labels) & (counts[labels] > 1)
    n = counts[labels[own]][:, None]
    centre[own] = (n * centroids[labels[own]] - features[own]) / (n - 1)
    diff = (features - centre) / scale
    return np.sqrt(np.einsum("nd,nd->n", diff, diff))


def calibrate_judge(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, num_classes: int, *,
                    keep: float = DEFAULT_KEEP, extractor: str = "") -> Judge:
    """Fit the judge's centroids and scale on real images and set both thresholds to keep `keep` of them.

    Args:
        features: [N, D] features of real images the classifier was not trained on.
        logits: [N, K] its logits on them.
        labels: [N] their true classes in [0, K); a class with < 2 images is not covered (module docstring),
            at least 2 classes must be.
        num_classes: K.
        keep: share of these images the joint rule must keep, in (0, 1).
        extractor: identity of the network (recorded).
    """
    feats, lg = np.asarray(features, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    if lg.ndim != 2 or lg.shape[1] != num_classes or len(lg) != len(feats) or len(labels) != len(feats):
        raise ValueError(f"need features [N, D], logits [N, {num_classes}] and labels [N] with one N, got "
                         f"{feats.shape}, {lg.shape}, {labels.shape}")
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) != num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got up to {int(labels.max())}")
    covered = counts >= 2
    if covered.sum() < 2:
        raise ValueError(f"the judge needs >= 2 calibration images in at least 2 classes; counts per class: "
                         f"{counts.tolist()}")
    rows = covered[labels]
    feats, lg, labels = feats[rows], lg[rows], labels[rows]
    centroids = np.stack([feats[labels == k].mean(axis=0) if covered[k] else np.zeros(feats.shape[1])
                          for k in range(num_classes)])
    residual = feats - centroids[labels]
    scale = np.sqrt((residual ** 2).sum(axis=0) / (len(feats) - int(covered.sum())))
    scale = np.maximum(scale, 1e-12 * max(float(scale.max()), 1.0))
    confidence, predicted = softmax_confidence(lg)
    distance = _leave_one_out_distances(feats, labels, predicted, centroids, scale)
    distance[~covered[predicted]] = np.inf  # read as a class the judge cannot test: rejected, as decide() does
    if not np.isfinite(distance).any():
        raise ValueError("the classifier reads every calibration image as a class with < 2 calibration images")
    for q in np.linspace(keep, 1.0, _QUANTILE_STEPS):
        min_conf = float(np.quantile(confidence, 1.0 - q, method="lower"))
        max_dist = float(np.quantile(distance[np.isfinite(distance)], q, method="higher"))
        kept = float(((confidence >= min_conf) & (distance <= max_dist)).mean())
        if kept >= keep:
            break
    return Judge(min_conf, max_dist, centroids, scale, float(keep), kept, len(feats), extractor,
                 None if covered.all() else covered)


def feature_set_digest(features: np.ndarray, logits: np.ndarray | None, labels: np.ndarray) -> str:
    """Hex sha256 of a feature set's arrays (shape, dtype and values): a cache key for what is derived from it."""
    digest = hashlib.sha256()
    for array in (features, logits, labels):
        if array is None:
            digest.update(b"none|")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))  # no copy of a 50,000 x 2,048 feature array
    return digest.hexdigest()


def judge_cache_path(data_digest: str, extractor_identity: str, keep: float,
                     cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache file of the judge calibrated on the features `data_digest` of `extractor_identity` with `keep`."""
    folder = resolve_cache_dir(cache_dir) / "judge"
    folder.mkdir(exist_ok=True)
    return folder / f"judge-{sha256_text(_FORMAT, data_digest, extractor_identity, repr(float(keep)))[:24]}.npz"


def _save(path: Path, judge: Judge) -> None:
    arrays = {"format": np.array(_FORMAT), "min_confidence": np.array(judge.min_confidence),
              "max_distance": np.array(judge.max_distance), "centroids": judge.centroids, "scale": judge.scale,
              "keep": np.array(judge.keep), "kept": np.array(judge.kept),
              "num_calibration": np.array(judge.num_calibration), "extractor": np.array(judge.extractor),
              "covered": np.ones(judge.num_classes, bool) if judge.covered is None else judge.covered}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load(path: Path) -> Judge | None:
    """The cached judge, or None for a file that is not one (foreign, truncated, another format): it is computed
    and written again."""
    try:
        return _read(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _read(path: Path) -> Judge | None:
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != _FORMAT:
            return None
        covered = data["covered"].astype(bool)
        return Judge(float(data["min_confidence"]), float(data["max_distance"]), data["centroids"], data["scale"],
                     float(data["keep"]), float(data["kept"]), int(data["num_calibration"]), str(data["extractor"]),
                     None if covered.all() else covered)


def load_or_calibrate_judge(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, num_classes: int, *,
                            extractor: str, keep: float = DEFAULT_KEEP,
                            cache_dir: str | os.PathLike[str] | None = None) -> Judge:
    """`calibrate_judge`, computed once per (calibration features, extractor, keep) and then read from the cache
    folder's "judge" subfolder (atomic .npz writes, no pickles). Arguments as `calibrate_judge`."""
    path = judge_cache_path(feature_set_digest(np.asarray(features), np.asarray(logits), np.asarray(labels)),
                            extractor, keep, cache_dir)
    if path.is_file():
        cached = _load(path)
        if cached is not None and cached.extractor == extractor and cached.num_classes == num_classes:
            return cached
    judge = calibrate_judge(features, logits, labels, num_classes, keep=keep, extractor=extractor)
    _save(path, judge)
    return judge

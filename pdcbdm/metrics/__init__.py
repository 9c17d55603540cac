"""Evaluation metrics of docs/method.md "Metrics": FID, IS, improved precision/recall, PRD F_8 / F_1/8, plus KID,
per-class and head/tail diagnostics, over features from the FID Inception-V3 or a small digits CNN, and the
real-vs-real noise floor of each at the evaluated size.

Typical use:
    extractor = build_extractor("digits")                      # or "inception"
    ref = reference_features(extractor, build_reference_dataset("digits-lt"))
    gen = extract_feature_set(extractor, generated_uint8_images, gen_labels)
    result = evaluate_features(gen, ref, head_classes=..., tail_classes=..., num_classes=10)
    result.to_dict()
    pool = reference_features(extractor, build_floor_dataset("digits-lt"))   # real images outside the reference
    noise_floor(pool, ref, np.bincount(gen_labels, minlength=10), head_classes=..., tail_classes=..., num_classes=10)
"""

from .class_metrics import (class_consistency, group_consistency, group_fid, per_class_fid, reject_rate,
                            shot_groups, tail_to_head_confusion)
from .mixture import balanced_shares, mixture_weights
from .scoring import EvalResult, FeatureSet, evaluate_features
from .extractors import EXTRACTOR_KINDS, FeatureExtractor, build_extractor, extract_all, extract_feature_set
from .fid import (GaussianStats, ReferenceStatistics, feature_statistics, fid_from_features, fid_to_reference,
                  frechet_distance)
from .floor import FLOOR_SEEDS, FloorUnavailable, floor_data_key, floor_draw, noise_floor, proxy_noise_floor
from .inception_score import inception_score
from .judge import REJECT, Judge, calibrate_judge, load_or_calibrate_judge
from .kid import group_kid, kid_from_features, per_class_kid
from .prd import equal_size_sets, max_f_beta, prd_cluster_count, prd_curve, prd_f_scores, prd_from_features
from .precision_recall import improved_precision_recall, knn_radii, manifold_membership
from .reference import load_feature_set, reference_cache_path, reference_features, save_feature_set

__all__ = [
    "EXTRACTOR_KINDS", "EvalResult", "FLOOR_SEEDS", "FeatureExtractor", "FeatureSet", "FloorUnavailable", "Judge",
    "REJECT", "build_extractor", "calibrate_judge", "class_consistency", "equal_size_sets", "evaluate_features",
    "extract_all", "extract_feature_set", "feature_statistics", "fid_from_features", "fid_to_reference",
    "GaussianStats", "ReferenceStatistics", "floor_data_key", "floor_draw",
    "frechet_distance", "group_consistency", "group_fid", "group_kid", "improved_precision_recall",
    "inception_score", "kid_from_features", "knn_radii", "load_feature_set", "load_or_calibrate_judge",
    "manifold_membership", "max_f_beta", "noise_floor", "per_class_fid", "per_class_kid", "prd_cluster_count",
    "prd_curve", "prd_f_scores", "prd_from_features", "proxy_noise_floor", "reference_cache_path",
    "reference_features", "reject_rate", "save_feature_set", "tail_to_head_confusion", "shot_groups",
    "balanced_shares", "mixture_weights",
]

"""Evaluation metrics of METHOD.md "Metrics": FID, IS, improved precision/recall, PRD F_8 / F_1/8, plus per-class
and head/tail diagnostics, over features from the FID Inception-V3 or a small digits CNN.

Typical use:
    extractor = build_extractor("digits")                      # or "inception"
    ref = reference_features(extractor, build_reference_dataset("digits-lt"))
    gen = extract_feature_set(extractor, generated_uint8_images, gen_labels)
    result = evaluate_features(gen, ref, head_classes=..., tail_classes=..., num_classes=10)
    result.to_dict()
"""

from .class_metrics import class_consistency, group_fid, per_class_fid, tail_to_head_confusion
from .evaluate import EvalResult, FeatureSet, evaluate_features
from .extractors import EXTRACTOR_KINDS, FeatureExtractor, build_extractor, extract_all, extract_feature_set
from .fid import feature_statistics, fid_from_features, frechet_distance
from .inception_score import inception_score
from .prd import max_f_beta, prd_curve, prd_f_scores, prd_from_features
from .precision_recall import improved_precision_recall, knn_radii, manifold_membership
from .reference import load_feature_set, reference_cache_path, reference_features, save_feature_set

__all__ = [
    "EXTRACTOR_KINDS", "EvalResult", "FeatureExtractor", "FeatureSet", "build_extractor", "class_consistency",
    "evaluate_features", "extract_all", "extract_feature_set", "feature_statistics", "fid_from_features", "frechet_distance", "group_fid",
    "improved_precision_recall", "inception_score", "knn_radii", "load_feature_set", "manifold_membership",
    "max_f_beta", "per_class_fid", "prd_curve", "prd_f_scores", "prd_from_features", "reference_cache_path",
    "reference_features", "save_feature_set", "tail_to_head_confusion",
]

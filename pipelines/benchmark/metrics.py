"""The ``metrics`` section: feature extractors' throughput, precision/recall, PRD and FID at their sizes, and
every metric of one evaluation (``metrics_job``, which ``pipelines.gpu_check`` runs too)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.benchmark.runner import JobRunner, PeakMemory, _base_spec, _log, time_call
from pipelines.benchmark.settings import BenchSettings


# ---------------------------------------------------------------------------------------------------------------
# metric jobs
# ---------------------------------------------------------------------------------------------------------------
def _build_extractor(kind: str, device: str) -> tuple[Any, tuple[int, int, int], str]:
    """(extractor, input image shape, note). The digits CNN is built with fresh weights: its cost does not
    depend on them, and training it would dominate the job. Inception weights come only from disk (no download);
    FileNotFoundError when there are none."""
    if kind == "digits":
        # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
        from pdcbdm.metrics.digits_net import DigitsExtractor, DigitsNet

        return DigitsExtractor(DigitsNet(), accuracy=0.0, device=device), (1, 16, 16), "untrained weights"
    if kind == "inception":
        # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
        from pdcbdm.metrics.inception import InceptionExtractor, resolve_inception_weights

        weights = resolve_inception_weights(allow_download=False)
        return InceptionExtractor(weights, device), (3, 32, 32), f"weights: {weights.source}"
    raise ValueError(f"unknown extractor {kind!r}; valid: digits, inception")


def features_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Features/s of one extractor over ``spec["images"]`` random uint8 images, in batches of ``spec["batch"]``."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from pdcbdm.metrics import extract_all

    try:
        extractor, shape, note = _build_extractor(spec["extractor"], spec["device"])
    except FileNotFoundError as err:
        return {"extractor": spec["extractor"], "skipped": str(err).splitlines()[0]}
    images = torch.randint(0, 256, (spec["images"], *shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    memory = PeakMemory(spec["device"])
    memory.start()
    extractor.extract(images[:min(spec["batch"], spec["images"])])  # warm-up
    sec, cpu = time_call(lambda: extract_all(extractor, images, batch_size=spec["batch"], progress=False),
                         spec["device"])
    return {"extractor": spec["extractor"], "name": extractor.name, "note": note, "images": spec["images"],
            "image_shape": list(shape), "batch": spec["batch"], "feature_dim": extractor.feature_dim,
            "seconds": sec, "cpu_s": cpu, "features_per_s": spec["images"] / sec, **memory.stop()}


def _random_features(n: int, dim: int, seed: int) -> tuple[Any, Any]:
    """Reference and generated features [n, dim]: two independent float32 draws of one standard Gaussian (the
    metrics' cost depends on the sizes only)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim), dtype=np.float32), rng.standard_normal((n, dim), dtype=np.float32)


def precision_recall_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of improved precision/recall (k = 5) at n x n random features."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    from pdcbdm.metrics import improved_precision_recall

    ref, gen = _random_features(spec["n"], spec["dim"], 0)
    memory = PeakMemory(spec["device"])
    memory.start()
    out: dict[str, Any] = {}
    run = lambda: out.update(zip(("precision", "recall"),  # noqa: E731
                                 improved_precision_recall(ref, gen, k=5, device=spec["device"])))
    sec, cpu = time_call(run, spec["device"])
    return {"metric": "precision_recall", "n_ref": spec["n"], "n_gen": spec["n"], "dim": spec["dim"], "k": 5,
            "seconds": sec, "cpu_s": cpu, **out, **memory.stop()}


def fid_job(spec: dict[str, Any]) -> dict[str, Any]:
    """FID of n generated features against a reference 5 x n, as each evaluation paid for it before the reference
    statistics were kept (both covariances and scipy's sqrtm of their product), computed from scratch with the
    eigendecomposition (both covariances, the reference's root), and with the reference's statistics kept: the
    first evaluation (the reference's covariance and root, once) and every later one."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import scipy.linalg
    from pdcbdm.metrics import ReferenceStatistics, feature_statistics, fid_from_features, fid_to_reference

    n, dim = spec["n"], spec["dim"]
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((5 * n, dim), dtype=np.float32).astype(np.float64)
    gen = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float64)
    labels = np.zeros(len(ref), dtype=np.int64)

    def sqrtm_path() -> float:
        (m1, s1), (m2, s2) = feature_statistics(gen), feature_statistics(ref)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))

    values: dict[str, float] = {}
    stats = ReferenceStatistics(ref, labels)
    timed = {}
    for key, call in (("sqrtm_s", sqrtm_path), ("uncached_s", lambda: fid_from_features(gen, ref)),
                      ("first_s", lambda: (stats.of().root, fid_to_reference(gen, stats))[1]),
                      ("cached_s", lambda: fid_to_reference(gen, stats))):
        timed[key], _ = time_call(lambda c=call, k=key: values.__setitem__(k, c()), "cpu")
    return {"metric": "fid", "n_gen": n, "n_ref": 5 * n, "dim": dim, **timed,
            "fid": values["cached_s"], "fid_sqrtm": values["sqrtm_s"]}


def prd_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of PRD's (F_8, F_1/8) at n x n random features (the torch k-means, on the device)."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    from pdcbdm.metrics import prd_f_scores

    ref, gen = _random_features(spec["n"], spec["dim"], 1)
    memory = PeakMemory(spec["device"])
    memory.start()
    out: dict[str, Any] = {}
    run = lambda: out.update(zip(("f_8", "f_1_8"), prd_f_scores(  # noqa: E731
        gen, ref, num_clusters=spec["clusters"], num_runs=spec["runs"], n_init=spec["n_init"],
        device=spec["device"])))
    sec, cpu = time_call(run, spec["device"])
    return {"metric": "prd", "n_ref": spec["n"], "n_gen": spec["n"], "dim": spec["dim"],
            "num_clusters": spec["clusters"], "num_runs": spec["runs"], "n_init": spec["n_init"],
            "device": spec["device"], "seconds": sec, "cpu_s": cpu, **out, **memory.stop()}


def _mixture_features(n: int, dim: int, seed: int, *, shift: float = 0.0, classes: int = 10,
                      rank: int = 64) -> tuple[Any, Any]:
    """[n, dim] float32 features and their labels (balanced over ``classes``) with the shape of real network
    features: a class mixture on a ``rank``-dimensional subspace (class means and a decaying within-class spectrum
    on one basis, the same for every draw), plus small isotropic noise, passed through a softplus (pool features
    are non-negative). ``shift`` moves each class mean by about that many leading within-class standard deviations
    in a fixed random direction: a generated set close to, but not, the reference. The draw's own randomness comes
    from ``seed`` and ``n``, so sets of different sizes are independent draws."""
    family = np.random.default_rng(1234)  # one basis and one set of class means for every draw
    basis = family.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    means = 3.0 * family.standard_normal((classes, rank)).astype(np.float32)
    moves = family.standard_normal((classes, rank)).astype(np.float32)
    scales = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)  # a decaying spectrum, as Inception's
    rng = np.random.default_rng([seed, n])
    labels = np.arange(n) % classes
    latent = means[labels] + shift * moves[labels] / np.sqrt(rank) + rng.standard_normal((n, rank),
                                                                                         dtype=np.float32) * scales
    x = latent @ basis + 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
    return np.logaddexp(0.0, x).astype(np.float32), labels


def metrics_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Every feature metric of one evaluation, timed one by one, for ``spec["n"]`` generated features against a
    ``5 x n`` reference (10k x 50k at 2,048-d: CIFAR's evaluation): the reference's statistics once (mean,
    covariance, root: ``first_s``), then per evaluation FID against them, improved precision/recall (k = 5)
    against the whole reference, KID against a seeded KID_MAX_REFERENCE subsample of it, and PRD on equal-size
    sets, each as ``evaluate_features`` calls it, on ``spec["device"]``. ``total_s``: the per-evaluation sum."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    from pdcbdm.metrics import ReferenceStatistics, fid_to_reference, improved_precision_recall, kid_from_features
    from pdcbdm.metrics import prd_f_scores
    from pdcbdm.metrics.scoring import KID_MAX_REFERENCE

    n, dim, device = spec["n"], spec["dim"], spec["device"]
    ref, ref_labels = _mixture_features(5 * n, dim, 0)
    gen, gen_labels = _mixture_features(n, dim, 1, shift=0.5)
    kid_rows = np.sort(np.random.default_rng(0).choice(len(ref), size=min(KID_MAX_REFERENCE, len(ref)),
                                                       replace=False))
    stats = ReferenceStatistics(ref, ref_labels)
    calls = {
        "first_s": lambda: stats.of(device=device).root,
        "fid_s": lambda: fid_to_reference(gen, stats, device=device),
        "precision_recall_s": lambda: improved_precision_recall(ref, gen, k=5, device=device),
        "kid_s": lambda: kid_from_features(gen, ref[kid_rows], gen_labels=gen_labels,
                                           ref_labels=ref_labels[kid_rows], device=device),
        "prd_s": lambda: prd_f_scores(gen, ref, num_clusters=spec["clusters"], num_runs=spec["runs"],
                                      n_init=spec["n_init"], device=device),
    }
    memory = PeakMemory(device)
    memory.start()
    timed: dict[str, float] = {}
    values: dict[str, Any] = {}
    for key, call in calls.items():
        timed[key], timed[key[:-2] + "_cpu_s"] = time_call(
            lambda c=call, k=key: values.__setitem__(k, c()), device)
        _log(f"[metrics]   {key[:-2]}: {timed[key]:.3g} s")
    precision, recall = values["precision_recall_s"]
    f_8, f_1_8 = values["prd_s"]
    return {"metric": "metrics", "n_gen": n, "n_ref": 5 * n, "n_kid_ref": len(kid_rows), "dim": dim,
            "device": device, "num_clusters": spec["clusters"], "num_runs": spec["runs"], "n_init": spec["n_init"],
            **timed, "total_s": sum(timed[k] for k in ("fid_s", "precision_recall_s", "kid_s", "prd_s")),
            "fid": values["fid_s"], "precision": precision, "recall": recall, "kid": values["kid_s"],
            "f_8": f_8, "f_1_8": f_1_8, **memory.stop()}


def run_metrics_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """Extractor throughput, then precision/recall and PRD at metric_n x metric_n, FID at metric_n x 5 metric_n,
    and every metric of one evaluation at metric_n x 5 metric_n (``metrics_job``)."""
    features = []
    for kind in s.extractors:
        _log(f"[metrics] features/s of {kind}")
        images = s.feature_images if kind == "digits" else s.inception_images
        features.append(runner.run("features", {**_base_spec(s), "extractor": kind, "images": images,
                                                "batch": min(250 if kind == "digits" else 50, images)}))
    n, dim = s.metric_n, s.feature_dim
    _log(f"[metrics] precision/recall at {n} x {n}")
    pr = runner.run("precision_recall", {**_base_spec(s), "n": n, "dim": dim})
    _log(f"[metrics] PRD at {n} x {n}")
    prd = runner.run("prd", {**_base_spec(s), "n": n, "dim": dim, "clusters": s.prd_clusters, "runs": s.prd_runs,
                             "n_init": s.prd_n_init})
    _log(f"[metrics] FID at {n} x {5 * n}")
    fid = runner.run("fid", {**_base_spec(s), "n": n, "dim": dim})
    _log(f"[metrics] every metric of one evaluation at {n} x {5 * n} on {s.device}")
    suite = runner.run("metrics", {**_base_spec(s), "n": n, "dim": dim, "clusters": s.prd_clusters,
                                   "runs": s.prd_runs, "n_init": s.prd_n_init})
    return {"features": features, "precision_recall": pr, "prd": prd, "fid": fid, "metrics": suite}

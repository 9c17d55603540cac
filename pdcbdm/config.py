"""Configuration: one frozen dataclass per concern, validated on construction.

Every field can be overridden from the command line as ``section.field=value`` (for example
``loss.pd_weight=0.05``); the searched knobs keep the names the search space and MLflow params use:
``loss.pd_weight`` (lambda of Eq. 10), ``loss.cbdm_tau`` / ``loss.cbdm_gamma`` (Eq. 9), ``loss.label_dist``
(Eq. 12), ``loss.split_ratio`` (the PD loss's head/tail split) and ``model.tsa_resolutions`` (Eq. 13-14). The
guidance strength w (``sample.guidance``) needs no retraining and is not searched: a search scores its proxies at
``eval.proxy_guidance`` and its final scores over ``eval.guidance_grid``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdcbdm.io import write_json_atomic


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the bad value."""


# every value an error message shows is cut to a readable length (a space file's value may be huge)
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 120
_SHOW.maxlist = _SHOW.maxdict = 8
_SHOW.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)``, cut to a length an error message can carry."""
    return _SHOW.repr(value)


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name} {why}, got {shown(value)}")


# q_s(k) ∝ n_k^(-s): the named ``loss.label_dist`` values and their s (pdcbdm.labels reads both from here)
LABEL_DIST_POWERS = {"cbdm": -1.0, "inverted": 1.0, "uniform": 0.0}
LABEL_DIST_NAMES = tuple(LABEL_DIST_POWERS)


def parse_label_dist(spec: str) -> float:
    """Map ``loss.label_dist`` to the power s of q_s(k) ∝ n_k^(-s) (Eq. 12 generalised).

    ``cbdm`` is s = -1 (q = training frequency), ``uniform`` s = 0, ``inverted`` s = 1 (PD-CBDM, Eq. 12), and
    ``power:S`` any real S.
    """
    if spec in LABEL_DIST_POWERS:
        return LABEL_DIST_POWERS[spec]
    if isinstance(spec, str) and spec.startswith("power:"):
        try:
            return float(spec.split(":", 1)[1])
        except ValueError:
            pass
    raise ConfigError(
        f"loss.label_dist must be one of {', '.join(LABEL_DIST_NAMES)} or 'power:S' (S a number), got {spec!r}"
    )


def parse_resolution_list(spec: str, name: str) -> tuple[int, ...]:
    """Parse "16,8,4" into (16, 8, 4); "" gives ()."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers such as '16' or '16,8,4', got {spec!r}") from None
    _check(all(v > 0 for v in values), name, spec, "must hold positive resolutions")
    return values


GPU_OPTIONS = ("channels_last", "fused_adam", "tf32", "cudnn_benchmark", "compile", "bf16_groupnorm")


def parse_gpu_options(spec: str) -> tuple[str, ...]:
    """``train.gpu_options``: comma-separated names from ``GPU_OPTIONS`` (pdcbdm.training.gpu_options), or ""."""
    names = tuple(part.strip() for part in spec.split(",") if part.strip())
    unknown = [n for n in names if n not in GPU_OPTIONS]
    if unknown:
        raise ValueError(f"train.gpu_options={spec!r}: unknown option(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(GPU_OPTIONS)}")
    return names


def parse_float_list(spec: str, name: str) -> tuple[float, ...]:
    """Parse "0,1,2" into (0.0, 1.0, 2.0)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers such as '0,1,2', got {spec!r}") from None
    _check(len(values) > 0, name, spec, "must hold at least one value")
    _check(all(math.isfinite(v) for v in values), name, spec, "must hold finite numbers")
    return values


# Plausible ceilings of the sizes that set a run's memory and time: a value past one is a typo far more often than
# a plan (2e9 timesteps would allocate schedules of 16 GB each); ``check_ceilings`` refuses them unless the
# caller's explicit flag (--allow-large) says the size is meant.
CEILINGS: dict[str, int] = {
    "diffusion.timesteps": 10_000, "sample.steps": 10_000, "train.steps": 10_000_000, "train.batch_size": 8_192,
    "train.threads": 1_024, "loss.pd_pairs": 8_192, "eval.num_samples": 100_000, "eval.proxy_samples": 100_000,
    "eval.batch_size": 16_384, "eval.noise_error_images": 100_000,
}
ALLOW_LARGE_FLAG = "--allow-large"


def check_ceilings(cfg: "Config", allow_large: bool = False) -> None:
    """Refuse a size above its ``CEILINGS`` entry (ConfigError naming the field, the ceiling and the flag that
    lifts them), unless ``allow_large``."""
    if allow_large:
        return
    flat = cfg.flat()
    for key, ceiling in CEILINGS.items():
        value = flat[key]
        if value is not None and value > ceiling:
            raise ConfigError(f"{key} = {shown(value)} is above its ceiling {ceiling:,} (a size that would exhaust "
                              f"memory or time); pass {ALLOW_LARGE_FLAG} if you mean it")


def _finite_numbers(cfg: "Config") -> None:
    """Every float field finite: inf or nan trains nothing useful and fails late (a NaN loss after minutes)."""
    for key, value in cfg.flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")


# The choices of the fields below, copied from the modules that implement them: those import torch, which the
# config must not (a command line checks its config before anything heavy loads). tests/test_config.py holds
# each copy equal to its owner's.
NETWORKS = ("small", "cifar", "own32", "own64", "own128")  # pdcbdm.models.NETWORKS
DATASETS = ("digits-lt", "digits", "cifar10-lt", "cifar100-lt", "cifar10", "cifar100")  # pdcbdm.data.DATASET_NAMES
PREPARED = "parquet"  # a user's own data, prepared into the folder data.root (pdcbdm.data.own.PREPARED)
REFERENCE_CHOICES = ("auto", "balanced-train", "train", "heldout", "folder")  # pdcbdm.data.own
JUDGE_CHOICES = ("auto", "probe", "cnn")  # eval.judge: pdcbdm.evaluation.real_sets
EXTRACTORS = ("digits", "domain", "inception")  # pdcbdm.metrics.EXTRACTOR_KINDS
VAR_TYPES = ("fixedlarge", "fixedsmall")  # pdcbdm.diffusion
PD_FORMS = ("distance", "plain", "saturating")  # pdcbdm.losses
SPLIT_MODES = ("classes", "samples")  # pdcbdm.data.split
LR_SCHEDULES = ("constant", "cosine")  # pdcbdm.training.trainer
PRECISIONS = ("fp32", "bf16", "auto")  # pdcbdm.training.trainer
SAMPLERS = ("ddpm", "ddim")  # pdcbdm.sampling
PROTOCOLS = ("fast", "paper")  # pdcbdm.evaluation.settings


@dataclass(frozen=True)
class ModelConfig:
    """The denoising U-Net (see ``pdcbdm.models.build_unet``): a named network, TSA placement (Eq. 13-14), and
    optional overrides of its dropout, attention heads and base width ``ch`` (None keeps the network's)."""

    network: str = "small"
    tsa_resolutions: str = "8"
    dropout: float | None = None
    num_heads: int | None = None
    ch: int | None = None

    def __post_init__(self) -> None:
        _check(self.network in NETWORKS, "model.network", self.network, f"must be one of {', '.join(NETWORKS)}")
        if self.ch is not None:
            _check(self.ch >= 1, "model.ch", self.ch, "must be >= 1 (the U-Net's base width)")
        parse_resolution_list(self.tsa_resolutions, "model.tsa_resolutions")
        if self.dropout is not None:
            _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        if self.num_heads is not None:
            _check(self.num_heads >= 1, "model.num_heads", self.num_heads, "must be >= 1")


@dataclass(frozen=True)
class DiffusionConfig:
    """Linear beta schedule and reverse variance (Eq. 1-8)."""

    timesteps: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 0.02
    var_type: str = "fixedlarge"

    def __post_init__(self) -> None:
        _check(self.timesteps >= 2, "diffusion.timesteps", self.timesteps, "must be >= 2")
        _check(0.0 < self.beta_1 < 1.0, "diffusion.beta_1", self.beta_1, "must be in (0, 1)")
        _check(self.beta_1 <= self.beta_T < 1.0, "diffusion.beta_T", self.beta_T, "must be in [beta_1, 1)")
        _check(self.var_type in VAR_TYPES, "diffusion.var_type", self.var_type,
               "must be 'fixedlarge' or 'fixedsmall'")


@dataclass(frozen=True)
class LossConfig:
    """Loss terms: L_DM with label dropout (Eq. 8), CBDM's L_DA (Eq. 9), the PD loss (Eq. 10-11), q (Eq. 12).

    ``cbdm_tau = 0`` turns L_DA off; ``pd_weight = 0`` turns the PD loss off. ``pd_form`` is ``distance``
    (default: -lambda m d_ref tanh(d / (m d_ref)), d = sqrt(KL), m = ``pd_scale``; see ``pdcbdm.losses.pd_loss``),
    ``plain`` (-lambda * KL, as Eq. 10 reads) or ``saturating`` (-lambda KL / (KL + pd_scale), the earlier default,
    which barely acts).
    """

    p_uncond: float = 0.1
    cbdm_tau: float = 1.0
    cbdm_gamma: float = 0.25
    label_dist: str = "inverted"
    pd_weight: float = 0.1
    pd_form: str = "distance"
    pd_scale: float = 2.0
    pd_pairs: int = 0
    split_ratio: float = 0.7
    split_mode: str = "classes"

    def __post_init__(self) -> None:
        _check(0.0 <= self.p_uncond < 1.0, "loss.p_uncond", self.p_uncond, "must be in [0, 1)")
        _check(self.cbdm_tau >= 0.0, "loss.cbdm_tau", self.cbdm_tau, "must be >= 0")
        _check(self.cbdm_gamma >= 0.0, "loss.cbdm_gamma", self.cbdm_gamma, "must be >= 0")
        parse_label_dist(self.label_dist)
        _check(self.pd_weight >= 0.0, "loss.pd_weight", self.pd_weight, "must be >= 0")
        _check(self.pd_form in PD_FORMS, "loss.pd_form", self.pd_form,
               "must be 'distance', 'plain' or 'saturating'")
        _check(self.pd_scale > 0.0, "loss.pd_scale", self.pd_scale, "must be > 0")
        _check(self.pd_pairs >= 0, "loss.pd_pairs", self.pd_pairs, "must be >= 0 (0 = half the batch)")
        _check(0.0 < self.split_ratio < 1.0, "loss.split_ratio", self.split_ratio, "must be in (0, 1)")
        _check(self.split_mode in SPLIT_MODES, "loss.split_mode", self.split_mode,
               "must be 'classes' or 'samples'")


@dataclass(frozen=True)
class DataConfig:
    """Which data set (see ``pdcbdm.data.DATASET_NAMES``), its long-tail imbalance rho, and (digits only) the size
    the network sees: ``image_size`` 8 trains at the digits' native 8x8, whose samples are upsampled (bilinear, as
    the data are) to the 16x16 the evaluation scores at; None trains at 16x16.

    ``dataset=parquet`` is a user's own data prepared into the folder ``root`` (required; made absolute against
    the working folder): shape, class names and counts come from its _meta.json, so ``imbalance`` stays unset and
    ``image_size`` is unset or the prepared side. The folder is read only where it exists: a config names the
    data, it can be loaded where the data are not.
    """

    dataset: str = "digits-lt"
    root: str | None = None
    imbalance: float | None = None
    seed: int = 0
    download: bool = False
    image_size: int | None = None

    def __post_init__(self) -> None:
        names = (*DATASETS, PREPARED)
        _check(self.dataset in names, "data.dataset", self.dataset, f"must be one of {', '.join(names)}")
        if self.imbalance is not None:
            _check(self.imbalance >= 1.0, "data.imbalance", self.imbalance, "must be >= 1")
        if self.dataset.startswith("digits"):  # scikit-learn's digits: no folder, nothing to download
            for name, value in (("root", self.root), ("download", self.download or None)):
                if value is not None:
                    raise ConfigError(f"data.{name} = {shown(value)} is not read by data.dataset={self.dataset} (the "
                                      f"digits come with scikit-learn); leave it unset, or choose a data set that "
                                      f"reads it (cifar10-lt, cifar100-lt, parquet)")
        if self.dataset == PREPARED:
            self._check_prepared()
        elif self.image_size is not None:
            # deferred: the data sets own their sizes, and the data package imports torch, which the config must not
            from pdcbdm.data.registry import dataset_image_shape

            try:
                dataset_image_shape(self.dataset, self.image_size)
            except ValueError as exc:
                raise ConfigError(f"data.image_size: {exc}") from None

    def _check_prepared(self) -> None:
        if self.root is None or not str(self.root).strip():
            raise ConfigError(f"data.root: required with data.dataset={PREPARED} (the folder `python -m "
                              f"pipelines.prepare_data --from-folder DIR --out D` wrote)")
        # absolute from here on: trials run in other folders (Ray's working directory), where a relative path
        # would name another folder or none
        object.__setattr__(self, "root", os.path.abspath(os.path.expanduser(str(self.root))))
        if self.imbalance is not None:
            raise ConfigError(f"data.imbalance: a prepared data set keeps its own class counts; leave it unset with "
                              f"data.dataset={PREPARED}, got {self.imbalance!r}")
        _check(not self.download, "data.download", self.download, f"must be false with data.dataset={PREPARED}")
        if self.image_size is not None and (Path(self.root) / "_meta.json").is_file():
            from pdcbdm.data.own import prepared_image_shape  # deferred: imports torch, which the config must not

            try:
                prepared_image_shape(self.root, self.image_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: Adam with linear warm-up, then a constant learning rate or a cosine decay to ``lr_final`` x lr
    at ``steps`` (``lr_schedule``); gradient clipping, EMA; precision fp32, bf16 autocast, or auto (bf16 where the
    CPU or GPU runs it natively, else fp32)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000
    threads: int = 0
    device: str = "auto"
    gpu_options: str = ""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        parse_gpu_options(self.gpu_options)
        _check(self.batch_size >= 2, "train.batch_size", self.batch_size, "must be >= 2")
        _check(self.lr > 0.0, "train.lr", self.lr, "must be > 0")
        _check(self.warmup >= 0, "train.warmup", self.warmup, "must be >= 0")
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule,
               "must be 'constant' or 'cosine'")
        _check(0.0 <= self.lr_final <= 1.0, "train.lr_final", self.lr_final,
               "must be in [0, 1] (a fraction of train.lr)")
        _check(self.grad_clip > 0.0, "train.grad_clip", self.grad_clip, "must be > 0")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", self.ema_decay, "must be in [0, 1)")
        _check(self.precision in PRECISIONS, "train.precision", self.precision,
               "must be 'fp32', 'bf16' or 'auto'")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, "must be >= 1")
        _check(self.threads >= 0, "train.threads", self.threads, "must be >= 0 (0 = torch's default)")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "train.device",
               self.device, "must be 'auto', 'cpu' or 'cuda[:N]'")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling: DDPM ancestral (T steps) or DDIM (``steps``), classifier-free guidance strength w."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.sampler in SAMPLERS, "sample.sampler", self.sampler, "must be 'ddpm' or 'ddim'")
        _check(self.steps >= 1, "sample.steps", self.steps, "must be >= 1")
        _check(self.guidance >= 0.0, "sample.guidance", self.guidance, "must be >= 0")
        _check(self.eta >= 0.0, "sample.eta", self.eta, "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: feature network, sample counts and the grid of guidance values scored per checkpoint.

    ``extractor``: ``digits`` (the CNN of the digits data sets), ``domain`` (a CNN trained on a prepared data set's
    own train split, cached by its data digest: ``pdcbdm.metrics.domain_net``; needs ``data.dataset=parquet``) or
    ``inception`` (the FID Inception-V3; ``inception_weights`` or the fallbacks of ``pdcbdm.metrics.inception``).

    ``split_ratio`` is the head/tail split the head/tail metrics use (head and tail FID, tail-to-head confusion,
    the tail proxy FID): the first ceil(r K) classes by frequency (``loss.split_mode`` and ``data.seed`` as the
    loss's split), fixed for every run so that scores stay comparable when the PD loss's own ``loss.split_ratio``
    is searched. ``proxy_guidance`` is the w of the proxy scores a search ranks and stops trials by; the final
    scores cover ``guidance_grid`` and report the best w: the lowest FID among the w whose class consistency
    reaches ``min_consistency`` (FID is blind to labels; see ``pdcbdm.evaluation.best_by_fid``). ``protocol`` is
    how final scores sample: ``fast`` (the config's ``sample.*`` sampler) or ``paper`` (CBDM's and the paper's:
    1000-step ancestral DDPM, fixedlarge variance, the mean before x0 is clipped; the default of the ``cifar*``
    presets); proxies always use ``sample.*``.

    ``reference`` is what the metrics compare samples with. ``auto``: a built-in set's balanced set (digits'
    held-out split, CIFAR's full training set); for a prepared set (no balanced set exists) the user's reference
    folder when one was prepared, else ``balanced-train``: the training images' features re-weighted to a
    class-balanced mixture (``pdcbdm.metrics.mixture``). A prepared set also takes ``train`` (unweighted),
    ``heldout`` (half of its held-out split) and ``folder``. Runs scored against different references are never
    ranked together (their tag ``pdcbdm.reference_kind``).

    ``judge`` is the classifier behind class consistency, tail-to-head confusion and the reject rate (its tag
    ``pdcbdm.judge``). ``auto``: the extractor's own logits when it was trained on the data's classes (the digits
    and domain CNNs), else, on a prepared set, ``probe``: a class-balanced linear probe on the extractor's
    features. ``cnn``: the domain CNN of the prepared set (its features and logits), whatever the extractor: the
    in-domain judge beside Inception features. ``probe`` and ``cnn`` need a prepared set.
    """

    extractor: str = "digits"
    inception_weights: str | None = None
    num_samples: int = 500
    proxy_samples: int = 200
    guidance_grid: str = "0,0.5,1,2"
    proxy_guidance: float = 1.0
    split_ratio: float = 0.7
    min_consistency: float = 0.9
    batch_size: int = 250
    noise_error_images: int = 100
    noise_error_stride: int = 50
    protocol: str = "fast"
    reference: str = "auto"
    judge: str = "auto"

    def __post_init__(self) -> None:
        _check(self.protocol in PROTOCOLS, "eval.protocol", self.protocol, "must be 'fast' or 'paper'")
        _check(self.reference in REFERENCE_CHOICES, "eval.reference", self.reference,
               f"must be one of {', '.join(REFERENCE_CHOICES)}")
        _check(self.judge in JUDGE_CHOICES, "eval.judge", self.judge, f"must be one of {', '.join(JUDGE_CHOICES)}")
        _check(self.extractor in EXTRACTORS, "eval.extractor", self.extractor,
               "must be 'digits', 'domain' or 'inception'")
        _check(self.num_samples >= 2, "eval.num_samples", self.num_samples, "must be >= 2")
        _check(self.proxy_samples >= 2, "eval.proxy_samples", self.proxy_samples, "must be >= 2")
        grid = parse_float_list(self.guidance_grid, "eval.guidance_grid")
        _check(all(w >= 0 for w in grid), "eval.guidance_grid", self.guidance_grid, "must hold values >= 0")
        _check(self.proxy_guidance >= 0.0, "eval.proxy_guidance", self.proxy_guidance, "must be >= 0")
        _check(0.0 < self.split_ratio < 1.0, "eval.split_ratio", self.split_ratio, "must be in (0, 1)")
        _check(0.0 <= self.min_consistency <= 1.0, "eval.min_consistency", self.min_consistency, "must be in [0, 1]")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _check(self.noise_error_images >= 0, "eval.noise_error_images", self.noise_error_images, "must be >= 0")
        _check(self.noise_error_stride >= 1, "eval.noise_error_stride", self.noise_error_stride, "must be >= 1")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "loss": LossConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one run; written as JSON beside every run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _finite_numbers(self)
        # a network trained on other images cannot read a prepared set's classes, and the domain CNN exists only
        # for a prepared set
        extractor, dataset = self.eval.extractor, self.data.dataset
        if dataset == PREPARED and extractor == "digits":
            raise ConfigError(f"eval.extractor: 'digits' reads the 16x16 digits only; use 'domain' (a CNN trained on "
                              f"data.root's train split) or 'inception' with data.dataset={PREPARED} (the run "
                              f"presets own32, own64 and own128 set domain)")
        if self.eval.reference != "auto" and dataset != PREPARED:
            raise ConfigError(f"eval.reference: {self.eval.reference!r} applies to a prepared set "
                              f"(data.dataset={PREPARED}); {dataset} is scored against its balanced set (auto)")
        if self.eval.judge != "auto" and dataset != PREPARED:
            raise ConfigError(f"eval.judge: {self.eval.judge!r} is trained on a prepared set's classes (data.dataset="
                              f"{PREPARED}); {dataset} is judged by its extractor's own classifier (auto)")
        if extractor == "domain" and dataset != PREPARED:
            raise ConfigError(f"eval.extractor: 'domain' is trained on a prepared data set; it needs "
                              f"data.dataset={PREPARED}, got data.dataset={dataset!r}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"loss.pd_weight": 0.01, ...}``: the names MLflow params and the search space use."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
        sections = {}
        for name, kind in SECTIONS.items():
            values = dict(data.get(name, {}))
            valid = {f.name for f in dataclasses.fields(kind)}
            bad = set(values) - valid
            for key in sorted(f"{name}.{b}" for b in bad):
                _not_renamed(key)
            if bad:
                raise ConfigError(f"unknown field(s) {sorted(f'{name}.{b}' for b in bad)}; valid: {sorted(valid)}")
            sections[name] = kind(**values)
        return cls(**sections)

    def save_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "Config":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid JSON: {exc}") from None


# fields whose name changed: a config, a checkpoint or a --set with the old name is told the new one
RENAMED = {"model.preset": "model.network"}


def _not_renamed(key: str) -> None:
    """ConfigError naming the new name when ``key`` is a field's old name (``RENAMED``)."""
    if key in RENAMED:
        raise ConfigError(f"{key} is now called {RENAMED[key]}; use {RENAMED[key]}=... (the value is unchanged)")


def _field_type(kind: type, name: str) -> Any:
    hints = typing.get_type_hints(kind)
    return hints[name]


def _convert(raw: str, annotation: Any, key: str) -> Any:
    """Convert the override text to the field's type; ``none`` gives None for optional fields."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if optional and raw.strip().lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"{key} expects {getattr(base, '__name__', base)}, got {raw!r}") from None


def parse_override(item: str) -> tuple[str, str, str]:
    """Split ``section.field=value``; an error names the malformed item."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.field=value (e.g. loss.pd_weight=0.05)")
    key, raw = item.split("=", 1)
    section, name = key.strip().split(".", 1)
    return section, name, raw


def apply_overrides(cfg: Config, items: list[str] | dict[str, Any]) -> Config:
    """Return a new Config with ``section.field=value`` overrides applied and validated.

    ``items`` is a list of ``"section.field=value"`` strings (command line) or a dict ``{"section.field": value}``
    (search space); dict values are converted from text only when they are strings.
    """
    pairs = items.items() if isinstance(items, dict) else [
        (f"{s}.{n}", raw) for s, n, raw in map(parse_override, items)
    ]
    data = cfg.to_dict()
    for key, value in pairs:
        section, name = key.split(".", 1) if "." in key else (key, "")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; valid: {sorted(SECTIONS)}")
        kind = SECTIONS[section]
        if name not in {f.name for f in dataclasses.fields(kind)}:
            _not_renamed(key)
            valid = sorted(f"{section}.{f.name}" for f in dataclasses.fields(kind))
            raise ConfigError(f"unknown config field {key!r}; valid fields of {section}: {valid}")
        annotation = _field_type(kind, name)
        data[section][name] = _convert(value, annotation, key) if isinstance(value, str) else value
    return Config.from_dict(data)

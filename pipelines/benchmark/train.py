"""The ``train`` section: the training job (``Trainer.advance`` of one network, variant, precision and batch), its
plan, the relative costs and the targets' checks."""

from __future__ import annotations

from typing import Any

from pdcbdm.config import Config, LossConfig, ModelConfig, TrainConfig
from pipelines.benchmark.runner import JobRunner, PeakMemory, _base_spec, _log, timed_median
from pipelines.benchmark.settings import (NETWORK_SHAPES, NETWORK_TSA, NUM_CLASSES, REFERENCE_CPU, VARIANTS,
                                          BenchSettings)


# ---------------------------------------------------------------------------------------------------------------
# training jobs
# ---------------------------------------------------------------------------------------------------------------
def variant_config(network: str, variant: str, precision: str, batch: int) -> Any:
    """The ``pdcbdm.config.Config`` of one training variant (see VARIANTS and ``pipelines.benchmark.cli``'s docstring).

    Args:
        network: "small" or "cifar" (``model.network``).
        variant: a key of VARIANTS; sets ``loss.cbdm_tau`` (Eq. 9), ``loss.pd_weight`` (lambda, Eq. 10) and
            ``model.tsa_resolutions`` (Eq. 13-14; the network's default resolution or none).
        precision: "fp32" or "bf16" (``train.precision``).
        batch: ``train.batch_size``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
    if network not in NETWORK_SHAPES:
        raise ValueError(f"unknown network {network!r}; valid: {list(NETWORK_SHAPES)}")
    tau, pd_weight, tsa = VARIANTS[variant]
    return Config(
        model=ModelConfig(network=network, tsa_resolutions=NETWORK_TSA[network] if tsa else ""),
        loss=LossConfig(p_uncond=0.0, cbdm_tau=tau, pd_weight=pd_weight),
        train=TrainConfig(batch_size=batch, precision=precision, seed=0),
    )


def network_images_per_step(cfg: Any) -> int:
    """Images sent through the network per step: the batch, plus its y' copy when L_DA is on (Eq. 9), plus the
    head and tail pairs when the PD loss is on (Eq. 10); p_uncond is 0 in this benchmark."""
    batch = cfg.train.batch_size
    pairs = cfg.loss.pd_pairs or batch // 2
    return batch * (2 if cfg.loss.cbdm_tau > 0 else 1) + (2 * pairs if cfg.loss.pd_weight > 0 else 0)


def synthetic_dataset(network: str, seed: int = 0) -> Any:
    """Random uint8 images of the network's shape with long-tailed counts (10 classes, rho = 10, 100 down to 10)."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from pdcbdm.data import ImageDataset, longtail_counts

    counts = longtail_counts(100, NUM_CLASSES, 10.0)
    labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), *NETWORK_SHAPES[network]), dtype=torch.uint8, generator=gen)
    return ImageDataset(images, labels, [f"c{k}" for k in range(NUM_CLASSES)], hflip=network == "cifar")


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``Trainer.advance`` (the training loops' step; each timed call waits for the device) for one
    (network, variant, precision, batch; the spec's and the row's key for the network is "preset"); see
    ``pipelines.benchmark.cli``'s docstring."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    from pdcbdm.training import Trainer

    cfg = variant_config(spec["preset"], spec["variant"], spec["precision"], spec["batch"])
    trainer = Trainer(cfg, synthetic_dataset(spec["preset"]), device=spec["device"])
    memory = PeakMemory(spec["device"])
    memory.start()
    timing = timed_median(trainer.advance, spec["device"], warmup=spec["warmup"], repeats=spec["steps"])
    work = network_images_per_step(cfg)
    return {
        "preset": spec["preset"], "variant": spec["variant"], "precision": spec["precision"],
        "batch": spec["batch"], "tsa_resolutions": cfg.model.tsa_resolutions, "cbdm_tau": cfg.loss.cbdm_tau,
        "pd_weight": cfg.loss.pd_weight, "params": trainer.net.count_parameters(),
        "network_images_per_step": work, "work_ratio": work / cfg.train.batch_size,
        "step_s": timing.median_s, "step_s_all": timing.all_s, "step_cpu_s": timing.cpu_median_s,
        "images_per_s": cfg.train.batch_size / timing.median_s,
        **memory.stop(),
    }


def train_plan(s: BenchSettings) -> list[dict[str, Any]]:
    """One job spec per (network, batch, precision, variant) not in ``s.skip``, ``ddpm+cfg`` fp32 first."""
    plan = []
    for network in s.presets:
        batches = s.small_batches if network == "small" else s.cifar_batches
        for batch in batches:
            for precision in s.precisions:
                for variant in s.variants:
                    if f"{network}/{precision}/{variant}" not in s.skip:
                        plan.append({**_base_spec(s), "preset": network, "batch": batch, "precision": precision,
                                     "variant": variant, "steps": s.steps, "warmup": s.warmup})
    return plan


def _find(rows: list[dict[str, Any]], network: str, batch: int, variant: str, precision: str) -> dict[str, Any] | None:
    """The measured row of one training configuration, or None (absent or failed)."""
    for row in rows:
        if (row.get("preset"), row.get("batch"), row.get("variant"), row.get("precision")) == \
                (network, batch, variant, precision) and "step_s" in row:
            return row
    return None


def add_relative_costs(rows: list[dict[str, Any]]) -> None:
    """Add ``relative_cost`` (step time / ddpm+cfg fp32 step time at the same network and batch) and
    ``cost_per_work`` (relative cost / network work ratio: 1.0 means the variant costs exactly its extra passes),
    from wall time, and the same two from CPU time (``*_cpu``: robust to other processes' load)."""
    for row in rows:
        base = _find(rows, row.get("preset"), row.get("batch"), "ddpm+cfg", "fp32")
        if "step_s" in row and base is not None:
            row["relative_cost"] = row["step_s"] / base["step_s"]
            row["cost_per_work"] = row["relative_cost"] / row["work_ratio"]
            row["relative_cost_cpu"] = row["step_cpu_s"] / base["step_cpu_s"]
            row["cost_per_work_cpu"] = row["relative_cost_cpu"] / row["work_ratio"]


# variant -> the variant without that component (same precision, network and batch)
TSA_TWINS = {"+tsa": "ddpm+cfg", "cbdm+tsa": "+cbdm", "all": "cbdm+pd"}
PD_TWINS = {"+pd": "ddpm+cfg", "cbdm+pd": "+cbdm", "all": "cbdm+tsa"}
CBDM_TWINS = {"+cbdm": "ddpm+cfg"}


def _ratio_check(row: dict[str, Any], twin: dict[str, Any], base: dict[str, Any], check: str, *,
                 extra_work: float | None) -> dict[str, Any]:
    """A check comparing ``row`` with its ``twin`` (the same without one component), from wall and CPU times.

    With ``extra_work`` None: the overhead step(row) / step(twin) - 1. Otherwise the component's cost per unit of
    the network work it adds: (step(row) - step(twin)) / (step(base) * extra_work), base being ddpm+cfg.
    """
    values = []
    for key in ("step_s", "step_cpu_s"):
        if extra_work is None:
            values.append(row[key] / twin[key] - 1.0)
        else:
            values.append((row[key] - twin[key]) / (base[key] * extra_work))
    return {"preset": row["preset"], "batch": row["batch"], "variant": row["variant"],
            "precision": row["precision"], "check": check, "value": values[0], "value_cpu": values[1]}


def _row_checks(row: dict[str, Any], rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The checks one training row contributes: {preset, batch, variant, precision, check, value, value_cpu}
    (value from wall time, value_cpu from CPU time; twins and ddpm+cfg taken at the row's own precision)."""
    find = lambda variant, precision=row["precision"]: _find(  # noqa: E731
        rows, row["preset"], row["batch"], variant, precision)
    base, out, batch = find("ddpm+cfg"), [], row["batch"]
    if (twin := find(TSA_TWINS.get(row["variant"], ""))) is not None:
        out.append(_ratio_check(row, twin, base, f"TSA overhead vs {twin['variant']} (target <= 0.10)",
                                extra_work=None))
    if (twin := find(PD_TWINS.get(row["variant"], ""))) is not None and base is not None:
        pd_work = (row["network_images_per_step"] - twin["network_images_per_step"]) / batch
        out.append(_ratio_check(row, twin, base, f"PD cost / its extra passes vs {twin['variant']} (target <= 1)",
                                extra_work=pd_work))
    if (twin := find(CBDM_TWINS.get(row["variant"], ""))) is not None and base is not None:
        out.append(_ratio_check(row, twin, base, "CBDM cost / its extra pass (target <= 1)", extra_work=1.0))
    key = {k: row[k] for k in ("preset", "batch", "variant", "precision")}
    if row["precision"] == "bf16" and (twin := find(row["variant"], "fp32")) is not None:
        out.append({**key, "check": "bf16 speed-up over fp32", "value": twin["step_s"] / row["step_s"],
                    "value_cpu": twin["step_cpu_s"] / row["step_cpu_s"]})
    if device == "cpu" and row["preset"] == "cifar" and row["variant"] in ("ddpm+cfg", "+cbdm"):
        ref = REFERENCE_CPU[row["variant"]]
        out.append({**key, "check": f"images/s / reference's {ref} (fp32, batch {REFERENCE_CPU['batch']}; "
                    "target fp32 >= 1, bf16 >= 1.8)", "value": row["images_per_s"] / ref, "value_cpu": None})
    return out


def train_checks(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The issues' targets as measured ratios: TSA overhead, CBDM/PD cost per unit of extra network work, bf16
    speed-up and, on the CPU for the cifar network, throughput over the CBDM reference U-Net's (REFERENCE_CPU:
    its images/s measured on the 2-core AMD EPYC machine; it compares only there)."""
    return [check for row in rows if "step_s" in row for check in _row_checks(row, rows, device)]


def run_train_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """Run every training job; returns rows, parameter counts per network and the target checks."""
    plan = train_plan(s)
    rows = []
    for i, spec in enumerate(plan, 1):
        _log(f"[train {i}/{len(plan)}] {spec['preset']} batch {spec['batch']} {spec['precision']} {spec['variant']}")
        rows.append(runner.run("train", spec))
    add_relative_costs(rows)
    params: dict[str, dict[str, int]] = {}
    for row in rows:
        if "params" in row:
            params.setdefault(row["preset"], {})["with_tsa" if row["tsa_resolutions"] else "without_tsa"] = \
                row["params"]
    return {"rows": rows, "params": params, "num_classes": NUM_CLASSES, "checks": train_checks(rows, s.device)}

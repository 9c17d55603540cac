"""The opt-in ``quality`` section: time-to-quality curves and the samplers compared (``pipelines.quality``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from pipelines.benchmark.runner import JobRunner, _base_spec, _log
from pipelines.benchmark.settings import BenchSettings


def quality_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time-to-quality of the default preset's variants and the samplers on their last networks
    (``pipelines.quality``; pictures into ``spec["out"]``)."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    from pipelines.quality import VARIANTS as QUALITY_VARIANTS
    from pipelines.quality import parse_sampler, run_quality

    base = preset("digits")
    if spec["steps"]:
        base = apply_overrides(base, {"train.steps": spec["steps"]})
    cfgs = {v: apply_overrides(base, QUALITY_VARIANTS[v]) for v in spec["variants"]}
    return run_quality(cfgs, [parse_sampler(x) for x in spec["samplers"]], Path(spec["out"]),
                       every=spec["every"], samples=spec["samples"])


def run_quality_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """The opt-in quality job: time-to-quality curves and the sampler comparison (``pipelines.quality``)."""
    _log(f"[quality] digits preset, {', '.join(s.quality_variants)}; samplers {', '.join(s.quality_samplers)}")
    spec = {**_base_spec(s), "variants": list(s.quality_variants), "steps": s.quality_steps,
            "every": s.quality_every, "samples": s.quality_samples, "samplers": list(s.quality_samplers),
            "out": s.quality_out}
    return runner.run("quality", spec)

"""The benchmark's report: the machine it ran on, one plain-text table per section, and the jobs of a report."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

from pipelines.bench_data import data_tables
from pipelines.benchmark.runner import _proc_status_mb


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: a title line, a header, a rule, one line per row (values formatted with 3 digits)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([title, line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _error_cell(row: dict[str, Any]) -> str:
    return "error: " + str(row["error"]).splitlines()[0][:80]


def train_tables(section: dict[str, Any]) -> list[str]:
    """The training table, the parameter counts and the checks."""
    headers = ["preset", "batch", "prec", "variant", "step s", "cpu s", "images/s", "rel cost", "rel cpu",
               "cost/work", "growth MB"]
    rows = []
    for r in section["rows"]:
        head = [r.get("preset"), r.get("batch"), r.get("precision"), r.get("variant")]
        if "error" in r:
            rows.append(head + [_error_cell(r), "", "", "", "", "", ""])
        else:
            rows.append(head + [r["step_s"], r["step_cpu_s"], r["images_per_s"], r.get("relative_cost"),
                                r.get("relative_cost_cpu"), r.get("cost_per_work"), r.get("growth_mb")])
    params = [[p, c.get("without_tsa"), c.get("with_tsa")] for p, c in section["params"].items()]
    checks = [[c["preset"], c["batch"], c["precision"], c["variant"], c["check"], c["value"], c["value_cpu"]]
              for c in section["checks"]]
    title = ("Training step (median; rel cost/cpu: wall/CPU time over ddpm+cfg fp32's; cost/work: rel cost / "
             "network work)")
    return [format_table(title, headers, rows),
            format_table(f"Parameters ({section['num_classes']} classes)", ["preset", "without TSA", "with TSA"],
                         params),
            format_table("Targets (measured ratios, from wall and from CPU time)",
                         ["preset", "batch", "prec", "variant", "check", "wall", "cpu"], checks)]


def sampling_tables(section: dict[str, Any]) -> list[str]:
    """The sampling table (or the job's error)."""
    if "error" in section:
        return [f"Sampling: {_error_cell(section)}"]
    rows = [[r["what"], r["seconds"], r.get("cpu_s"), r.get("seconds_per_step"), r["images_per_s"]]
            for r in section["rows"]]
    title = (f"Sampling ({section['preset']} preset with TSA, batch {section['batch']}, "
             f"guidance w={section['guidance']:g}, fp32)")
    return [format_table(title, ["what", "seconds", "cpu s", "s/step", "images/s"], rows)]


def quality_tables(section: dict[str, Any]) -> list[str]:
    """The sampler comparison and the time-to-quality lines (or the job's error)."""
    if "error" in section:
        return [f"Quality: {_error_cell(section)}"]
    # deferred: pipelines.quality imports torch (1.7 s); pipelines.benchmark's --help imports this module
    from pipelines.quality import reached_lines, sampler_table

    return ["Samplers on the last network of each variant (score (real-vs-real floor at the same N))\n"
            + sampler_table(section["samplers"]), "Time to quality\n" + "\n".join(reached_lines(section))]


def metrics_tables(section: dict[str, Any]) -> list[str]:
    """One table: extractor throughput, precision/recall and PRD (errors and skips on their own rows)."""
    rows = []
    for f in section["features"]:
        what = f"features: {f.get('extractor')}"
        if "error" in f or "skipped" in f:
            rows.append([what, _error_cell(f) if "error" in f else "skipped: " + f["skipped"][:80], "", "", "", ""])
        else:
            rows.append([what + f" ({f['images']} images {f['image_shape']})", f["seconds"], f["cpu_s"],
                         f["features_per_s"], f.get("growth_mb"), str(f.get("note"))[:60]])
    for key in ("precision_recall", "prd"):
        m = section[key]
        if "error" in m:
            rows.append([key, _error_cell(m), "", "", "", ""])
        else:
            extra = f"P={m['precision']:.3f} R={m['recall']:.3f}" if key == "precision_recall" else \
                f"F_8={m['f_8']:.3f} F_1/8={m['f_1_8']:.3f} ({m['num_clusters']} clusters, {m['num_runs']} runs)"
            rows.append([f"{key} {m['n_gen']} x {m['n_ref']} x {m['dim']}-d", m["seconds"], m["cpu_s"], "",
                         m.get("growth_mb"), extra])
    fid = section.get("fid") or {}
    if "error" in fid:
        rows.append(["fid", _error_cell(fid), "", "", "", ""])
    elif fid:
        rows.append([f"fid {fid['n_gen']} x {fid['n_ref']} x {fid['dim']}-d, per evaluation", fid["cached_s"], "", "",
                     "", f"reference kept (first {fid['first_s']:.3g} s); from scratch {fid['uncached_s']:.3g} s, "
                         f"with scipy sqrtm {fid['sqrtm_s']:.3g} s"])
    return [format_table("Metrics", ["what", "seconds", "cpu s", "features/s", "growth MB", "note"], rows),
            *suite_tables(section.get("metrics"))]


def suite_tables(suite: dict[str, Any] | None) -> list[str]:
    """The per-metric times of one evaluation (``metrics_job``), or its error; nothing when it did not run."""
    if not suite:
        return []
    if "error" in suite:
        return [f"Metrics of one evaluation: {_error_cell(suite)}"]
    rows = [["reference statistics (once)", suite["first_s"], suite["first_cpu_s"], "mean, covariance, root"],
            ["FID", suite["fid_s"], suite["fid_cpu_s"], f"{suite['fid']:.4g}"],
            ["precision/recall (k = 5)", suite["precision_recall_s"], suite["precision_recall_cpu_s"],
             f"P={suite['precision']:.3f} R={suite['recall']:.3f}"],
            ["KID", suite["kid_s"], suite["kid_cpu_s"], f"{suite['kid']:.4g} against {suite['n_kid_ref']:,}"],
            ["PRD", suite["prd_s"], suite["prd_cpu_s"], f"F_8={suite['f_8']:.3f} F_1/8={suite['f_1_8']:.3f} "
             f"({suite['num_clusters']} clusters, {suite['num_runs']} runs, n_init {suite['n_init']})"],
            ["total per evaluation", suite["total_s"], None, "FID + P/R + KID + PRD"]]
    peak = suite.get("peak_mb")
    title = (f"Metrics of one evaluation: {suite['n_gen']:,} x {suite['n_ref']:,} x {suite['dim']}-d on "
             f"{suite['device']}" + ("" if peak is None else f" (peak {peak:,.0f} MB)"))
    return [format_table(title, ["metric", "seconds", "cpu s", "value"], rows)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, load, torch version, device name and threads of this machine."""
    import torch  # deferred: torch (1.7 s); pipelines.benchmark's --help imports this module

    flags = _cpu_flags()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16": sorted(f for f in flags if "bf16" in f or f == "amx_tile"),
        "memory_total_mb": _proc_status_mb("MemTotal", "/proc/meminfo"), "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "device": device, "threads": threads or torch.get_num_threads(),
    }
    info["device_name"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else info["cpu_model"]
    if device.startswith("cuda"):
        info["cuda"] = torch.version.cuda
    return info


def print_report(report: dict[str, Any]) -> None:
    """Print one table per section run, and the machine line."""
    m = report["machine"]
    print(f"{m['device_name']} | {m['usable_cpus']} CPUs | torch {m['torch']} | threads {m['threads']} | "
          f"load {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f} | {report['wall_s']:.0f} s wall, "
          f"{report['jobs_cpu_s']:.0f} s CPU in jobs")
    tables = {"train": train_tables, "sampling": sampling_tables, "metrics": metrics_tables,
              "quality": quality_tables, "data": data_tables}
    for name, make in tables.items():
        if name in report:
            for table in make(report[name]):
                print()
                print(table)


def _jobs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job result of a report (training rows, the sampling job, the metric jobs)."""
    found = list(report.get("train", {}).get("rows", []))
    found += [report["sampling"]] if "sampling" in report else []
    metrics = report.get("metrics", {})
    found += list(metrics.get("features", [])) + [metrics[k] for k in ("precision_recall", "prd", "metrics")
                                                  if k in metrics]
    found += [report["quality"]] if "quality" in report else []
    return found

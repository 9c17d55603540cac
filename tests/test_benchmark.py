"""Tests of `python -m pipelines.benchmark`: it runs end to end at the smallest sizes and writes a JSON report of
the documented structure. Only structure and positivity are asserted, never a timing value."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.benchmark import (VARIANTS, PeakMemory, build_parser, format_table, network_images_per_step,
                                 settings_from_args, train_plan, variant_config)
from pipelines.benchmark import main as benchmark_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0", "--small-batch", "8",
        "--sample-batch", "4", "--ddim-steps", "2", "--ddpm-probe-steps", "2", "--metric-n", "64",
        "--feature-dim", "16", "--prd-clusters", "4", "--prd-runs", "1", "--prd-n-init", "1",
        "--feature-images", "20", "--extractors", "digits"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.benchmark", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = _run(*TINY, "--sections", "train,sampling,metrics", "--presets", "small", "--variants", "ddpm+cfg,all",
                "--precisions", "fp32,bf16", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Training step" in done.stdout and "Sampling" in done.stdout and "Metrics" in done.stdout
    assert "Metrics of one evaluation: 64 x 320 x 16-d on cpu" in done.stdout
    assert not list(out.parent.glob(".bench.json.*")), "the atomic write left a temporary file"
    return json.loads(out.read_text())


def test_report_has_machine_and_settings(report):
    m = report["machine"]
    assert m["device"] == "cpu" and m["threads"] == 1 and m["cpu_model"] and m["torch"]
    assert _positive(m["logical_cpus"]) and len(m["load_average_start"]) == 3
    s = report["settings"]
    assert s["quick"] is True and s["sections"] == ["train", "sampling", "metrics"] and s["steps"] == 1
    assert _positive(report["wall_s"])


def test_train_section_rows(report):
    train = report["train"]
    rows = train["rows"]
    assert [(r["precision"], r["variant"]) for r in rows] == [
        ("fp32", "ddpm+cfg"), ("fp32", "all"), ("bf16", "ddpm+cfg"), ("bf16", "all")]
    for r in rows:
        assert "error" not in r, r
        for key in ("step_s", "images_per_s", "params", "peak_mb", "relative_cost", "cost_per_work"):
            assert _positive(r[key]), (key, r)
        assert r["growth_mb"] is not None and r["growth_mb"] >= 0
        assert len(r["step_s_all"]) == 1 and r["batch"] == 8 and r["threads"] == 1
    plain, full = rows[0], rows[1]
    assert plain["relative_cost"] == 1.0 and plain["work_ratio"] == 1.0
    # PD-CBDM: main batch, its y' copy (Eq. 9) and batch/2 head + batch/2 tail images (Eq. 10).
    assert full["network_images_per_step"] == 24 and full["work_ratio"] == 3.0
    assert full["tsa_resolutions"] == "8" and plain["tsa_resolutions"] == ""
    assert train["params"]["small"]["with_tsa"] > train["params"]["small"]["without_tsa"] > 0
    checks = {(c["precision"], c["variant"], c["check"].split(" ")[0]) for c in train["checks"]}
    assert ("bf16", "all", "bf16") in checks and all(_positive(c["value"]) for c in train["checks"])


def test_sampling_section(report):
    sampling = report["sampling"]
    assert "error" not in sampling, sampling
    assert sampling["preset"] == "small" and sampling["batch"] == 4 and _positive(sampling["params"])
    what = [r["what"] for r in sampling["rows"]]
    assert any("batched" in w and "forward" in w for w in what) and any("two forwards" in w for w in what)
    assert any(w.startswith("DDIM 2 steps") for w in what) and any(w.startswith("DDPM") for w in what)
    for r in sampling["rows"]:
        assert _positive(r["seconds"]) and _positive(r["images_per_s"])
    ddpm = next(r for r in sampling["rows"] if r["what"].startswith("DDPM"))
    assert ddpm["extrapolated"] is True and ddpm["measured_steps"] == 2


def test_metrics_section(report):
    metrics = report["metrics"]
    (digits,) = metrics["features"]
    assert digits["extractor"] == "digits" and digits["images"] == 20 and digits["feature_dim"] == 64
    assert _positive(digits["features_per_s"]) and _positive(digits["seconds"])
    pr, prd = metrics["precision_recall"], metrics["prd"]
    assert pr["n_ref"] == pr["n_gen"] == 64 and pr["dim"] == 16 and _positive(pr["seconds"])
    assert 0.0 <= pr["precision"] <= 1.0 and 0.0 <= pr["recall"] <= 1.0 and _positive(pr["peak_mb"])
    assert prd["num_clusters"] == 4 and prd["num_runs"] == 1 and _positive(prd["seconds"])
    assert 0.0 <= prd["f_8"] <= 1.0 and 0.0 <= prd["f_1_8"] <= 1.0
    fid = metrics["fid"]  # the kept reference gives the FID scipy's sqrtm path gives
    assert fid["n_gen"] == 64 and fid["n_ref"] == 320 and all(_positive(fid[k]) for k in ("cached_s", "sqrtm_s"))
    assert fid["fid"] == pytest.approx(fid["fid_sqrtm"], rel=1e-6)
    suite = metrics["metrics"]  # every metric of one evaluation, timed one by one (never asserted)
    assert (suite["n_gen"], suite["n_ref"], suite["n_kid_ref"], suite["dim"]) == (64, 320, 320, 16)
    assert suite["device"] == "cpu" and suite["num_clusters"] == 4 and suite["num_runs"] == 1
    assert all(_positive(suite[f"{m}_s"]) for m in ("first", "fid", "precision_recall", "kid", "prd", "total"))
    assert suite["fid"] > 0 and 0 <= suite["precision"] <= 1 and 0 <= suite["f_8"] <= 1 and 0 <= suite["f_1_8"] <= 1


def test_quality_section_is_opt_in_and_reports_time_to_quality(tmp_path):
    """One section alone (here the opt-in quality section): the report holds it and none of the others, written
    into a folder the command creates."""
    out, pictures = tmp_path / "sub" / "q.json", tmp_path / "pictures"
    done = _run("--sections", "quality", "--quality-variants", "ddpm", "--quality-steps", "4", "--quality-every", "2",
                "--quality-samples", "20", "--quality-samplers", "ddim:3:1", "--quality-out", str(pictures),
                "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"quality", "settings"} and not {"train", "sampling", "metrics", "data"} & set(data)
    assert [r["step"] for r in data["quality"]["curves"]["ddpm"]] == [2, 4]
    assert set(data["quality"]["reached"]["ddpm"]) == {"head_consistency", "fid", "head_consistency_held", "fid_held"}
    assert "Time to quality" in done.stdout and "| ddpm | ddim3-eta1 |" in done.stdout
    assert (pictures / "curves_ddpm.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--sections", "train,bogus"], "bogus"),
    (["--variants", "ddpm+cfg,+nope"], "+nope"),
    (["--cifar-batch", "0"], "must be >= 1"),
    (["--device", "tpu"], "tpu"),
    (["--threads", "-1"], "--threads"),
    (["--metric-n", "100", "--prd-clusters", "500"], "--prd-clusters got 500"),
])
def test_bad_arguments_name_the_value(args, needle, tmp_path, capsys):
    """The command's refusals, called in this process (a Python start per case is most of the cost; the module
    and its ``python -m`` entry are run as a process by the tests above and below): a non-zero exit whose
    message (on stderr, or the SystemExit's own, which Python prints there) names the value."""
    with pytest.raises(SystemExit) as stop:
        benchmark_main([*args, "--out", str(tmp_path / "x.json")])
    code = stop.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None) and needle in message
    assert not (tmp_path / "x.json").exists()


def test_variant_configs_and_network_work():
    assert set(VARIANTS) == {"ddpm+cfg", "+cbdm", "+pd", "+tsa", "all", "cbdm+pd", "cbdm+tsa"}
    expected = {"ddpm+cfg": (0.0, 0.0, "", 8), "+cbdm": (1.0, 0.0, "", 16), "+pd": (0.0, 0.01, "", 16),
                "+tsa": (0.0, 0.0, "16", 8), "all": (1.0, 0.01, "16", 24),
                "cbdm+pd": (1.0, 0.01, "", 24), "cbdm+tsa": (1.0, 0.0, "16", 16)}
    for name, (tau, pd, tsa, work) in expected.items():
        cfg = variant_config("cifar", name, "bf16", 8)
        assert (cfg.loss.cbdm_tau, cfg.loss.pd_weight, cfg.model.tsa_resolutions) == (tau, pd, tsa)
        assert cfg.loss.p_uncond == 0.0 and cfg.train.precision == "bf16" and cfg.model.network == "cifar"
        assert network_images_per_step(cfg) == work
    assert variant_config("small", "+tsa", "fp32", 64).model.tsa_resolutions == "8"
    with pytest.raises(ValueError, match="nope"):
        variant_config("small", "nope", "fp32", 8)
    with pytest.raises(ValueError, match="huge"):
        variant_config("huge", "all", "fp32", 8)


def _settings(*args: str):
    return settings_from_args(build_parser().parse_args([*args, "--device", "cpu"]))


def test_quick_and_full_defaults_differ():
    quick, full = _settings("--quick"), _settings()
    assert quick.cifar_batches == (8,) and full.cifar_batches == (8, 32) and full.small_batches == (16, 64)
    assert quick.metric_n == 2000 and full.metric_n == 10000 and full.steps == 10 and full.prd_runs == 10
    assert quick.steps < full.steps and quick.ddim_steps == (10,) and full.ddim_steps == (10, 50)
    assert full.variants == ("ddpm+cfg", "+cbdm", "+pd", "+tsa", "all") and full.precisions == ("fp32", "bf16")


def test_quick_plan_leaves_out_cifar_components_unless_asked():
    quick = {(j["preset"], j["precision"], j["variant"]) for j in train_plan(_settings("--quick"))}
    assert len(quick) == 15 and ("small", "bf16", "+pd") in quick and ("cifar", "bf16", "all") in quick
    assert ("cifar", "fp32", "+tsa") in quick and ("cifar", "fp32", "+cbdm") not in quick
    assert len(train_plan(_settings("--quick", "--full-grid"))) == 20
    assert len(train_plan(_settings("--quick", "--precisions", "fp32"))) == 10
    full = train_plan(_settings())
    assert len(full) == 2 * 2 * 10 and {j["batch"] for j in full if j["preset"] == "cifar"} == {8, 32}
    assert all(j["steps"] == 10 and j["warmup"] == 2 for j in full)


def test_format_table_aligns_columns():
    text = format_table("T", ["name", "value"], [["a", 1.23456], ["longer", None], ["n", 12345]])
    lines = text.splitlines()
    assert lines[0] == "T" and len({len(line) for line in lines[1:]}) == 1
    assert lines[3].endswith("1.23") and lines[4].endswith("-") and lines[5].endswith("12,345")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_a_large_temporary_allocation():
    memory = PeakMemory("cpu")
    memory.start()
    # 40 MiB of fresh pages, touched: an anonymous map, so that memory an earlier test freed into malloc's arena (still
    # resident) cannot serve it without the resident set growing
    block = mmap.mmap(-1, 40 * 2**20)
    block.write(b"\1" * len(block))
    block.close()
    result = memory.stop()
    assert result["growth_mb"] >= 30 and result["peak_mb"] >= result["growth_mb"]

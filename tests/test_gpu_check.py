"""``python -m pipelines.gpu_check`` on the CPU with --quick, so that the GPU check never rots: every step's result,
the training figures, SKIP (not FAIL) where a package is missing, and the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import gpu_check
from pipelines.gpu_check import Budget, fit, format_option_table, peak_bf16_tflops, process_flags

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("ray", "mlflow", "optuna", "torch_fidelity", "tqdm")  # what the GPU machines' image lacks
LIBRARY_STEPS = ("env", "data", "train", "options", "rng", "sample", "pt2_graph", "metrics")


def run_check(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the check as a user does; (the process, the JSON it wrote)."""
    out = tmp / "gpu-check.json"
    cmd = [sys.executable, "-m", "pipelines.gpu_check", "--device", "cpu", "--quick", "--out", str(out),
           "--work", str(tmp / "work"), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick CPU run of every step, shared by the tests that read it."""
    return run_check(tmp_path_factory.mktemp("gpucheck"))


def test_the_quick_cpu_check_passes_every_library_step(quick):
    proc, report = quick
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = report["steps"]
    assert set(steps) == set(gpu_check.STEPS)
    starts = [proc.stdout.index(f"== {name} ") for name in gpu_check.STEPS]
    assert starts == sorted(starts)  # in order, each announced with its share of the budget
    for name in LIBRARY_STEPS:
        assert steps[name]["status"] == "PASS", (name, steps[name])
        assert f"PASS {name}: " in proc.stdout
    assert steps["pt2_logged"]["status"] == "PASS"  # MLflow is installed here
    assert steps["search"]["status"] == "SKIP" and "--search" in steps["search"]["reason"]
    assert steps["targets"]["status"] == "SKIP"
    summary = report["summary"]
    assert summary["ok"] and summary["counts"] == {"PASS": 9, "FAIL": 0, "SKIP": 2}
    printed = proc.stdout[proc.stdout.index("\n{") + 1:proc.stdout.rindex("}") + 1]
    assert json.loads(printed)["status"] == summary["status"]  # the JSON summary on stdout


def test_training_reports_throughput_flops_and_no_host_round_trip_per_step(quick):
    train = quick[1]["steps"]["train"]
    assert train["img_s"] > 0 and train["steps"] == 2 and train["batch"] == 4
    assert train["gflop_per_image"] > 0 and train["peak_share"] is None  # no bf16 peak on a CPU
    assert train["syncs_per_advance"] == 0, train["sync_ops"]
    assert train["syncs_per_step"] <= 1  # at most the window's one read
    assert quick[1]["summary"]["figures"]["host_syncs_per_step"] == train["syncs_per_step"]


def test_the_options_are_timed_against_none_and_cuda_only_ones_are_named(quick):
    options = quick[1]["steps"]["options"]
    rows = {row["variant"]: row for row in options["rows"]}
    assert {"none", "channels_last", "fused_adam", "all"} <= set(rows)
    assert rows["none"]["vs_none"] == 1.0 and all(row["median_img_s"] > 0 for row in rows.values())
    assert {"tf32", "cudnn_benchmark", "compile", "bf16_groupnorm"} <= set(options["not_timed"])
    assert "single measurement" in options["table"] and "variant" in quick[0].stdout


def test_sampling_rng_and_metrics_report_their_figures(quick):
    steps = quick[1]["steps"]
    sample = steps["sample"]
    assert sample["ddpm_steps"] == 1000 and sample["ddpm_steps_timed"] < 1000 and sample["ddpm_s_per_image"] > 0
    assert sample["final_samples"] == 10_000 and sample["final_sampling_s"] > 0
    assert steps["rng"]["dropout_differs"] and steps["rng"]["batch_draws_shared"] and all(steps["rng"]["rng_kept"])
    assert steps["metrics"]["total_s"] > 0 and steps["metrics"]["n"] == 500
    assert steps["pt2_graph"]["max_abs_diff"] < 1e-3 and steps["pt2_logged"]["same_weights"]


def test_steps_whose_packages_are_missing_skip_and_the_library_steps_still_pass(tmp_path):
    """The GPU machines' image: no Ray, MLflow, Optuna, torch-fidelity or tqdm. A package of that name that raises on
    import, first on the path, hides each one."""
    shims = tmp_path / "shims"
    for name in HIDDEN:
        (shims / name).mkdir(parents=True)
        (shims / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the test')\n")
    proc, report = run_check(tmp_path, "--only", "env,data,rng,sample,pt2_logged,metrics,search", "--search",
                             env={"PYTHONPATH": os.pathsep.join([str(shims), str(ROOT)])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = report["steps"]
    assert set(steps) == {"env", "data", "rng", "sample", "pt2_logged", "metrics", "search"}
    assert steps["pt2_logged"]["status"] == "SKIP" and steps["pt2_logged"]["missing"] == ["mlflow"]
    assert steps["search"]["status"] == "SKIP" and steps["search"]["missing"] == ["ray", "mlflow", "optuna"]
    assert "SKIP search: ray, mlflow, optuna not installed" in proc.stdout
    for name in ("env", "data", "rng", "sample", "metrics"):
        assert steps[name]["status"] == "PASS", (name, steps[name])
    assert "torch-fidelity not installed" in steps["metrics"]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_fails_env_and_skips_the_rest(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cuda", "--quick", "--only", "env,data", "--out", str(out),
                           "--work", str(tmp_path / "work")])
    steps = json.loads(out.read_text())["steps"]
    assert code == 1 and steps["env"]["status"] == "FAIL" and steps["data"]["status"] == "SKIP"
    assert "FAIL env: --device cuda: torch sees no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_without_a_gpu_the_default_device_runs_the_quick_sizes(tmp_path, capsys):
    out = tmp_path / "report.json"
    threads = torch.get_num_threads()
    assert gpu_check.main(["--only", "env", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["quick"] and summary["device"] == "cpu" and summary["minutes"] == 1.0
    assert torch.get_num_threads() == threads  # the quick run's one thread is this process's again
    assert "the CPU runs the --quick sizes" in capsys.readouterr().out


def test_a_step_that_raises_is_a_fail_and_the_next_step_runs(tmp_path, monkeypatch, capsys):
    def broken(check):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.STEP_FUNCS, "env", broken)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--only", "env,targets", "--out", str(out),
                           "--work", str(tmp_path / "work")])
    steps = json.loads(out.read_text())["steps"]
    assert code == 1 and steps["env"]["status"] == "FAIL" and "RuntimeError: boom" in steps["env"]["reason"]
    assert "boom" in steps["env"]["error"] and steps["targets"]["status"] == "SKIP"
    assert "FAIL env: RuntimeError: boom" in capsys.readouterr().out


def test_unknown_steps_are_refused():
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--only", "train,warp"])


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Tesla V100-SXM2-16GB", None)])
def test_the_bf16_peak_comes_from_the_card_name(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_budget_shares_and_fitting_work():
    budget = Budget(100.0)
    assert budget.share(["train", "targets"]) == pytest.approx(budget.left(), rel=1e-3)  # targets weigh nothing
    assert budget.share(["train", "options"]) < budget.share(["options", "train"])
    assert fit(200, 0.5, 10.0) == 20 and fit(200, 0.5, 1000.0) == 200 and fit(200, 5.0, 1.0, least=2) == 2


def test_process_flags_are_set_per_variant_and_restored():
    defaults = {"matmul_tf32": False, "cudnn_tf32": True, "benchmark": False}
    before = gpu_check._flags()
    try:
        with process_flags(("tf32", "cudnn_benchmark"), defaults):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
        assert gpu_check._flags() == defaults
    finally:
        gpu_check._set_flags(before)


def test_the_option_table_says_one_span_is_one_measurement():
    rows = [{"variant": "none", "img_s": [100.0], "median_img_s": 100.0, "vs_none": 1.0, "first_step_s": 0.1,
             "loss_vs_none": 0.0}]
    assert "single measurement" in format_option_table(rows, 1, 5)
    rows[0]["img_s"] = [100.0, 90.0, 110.0]
    assert "3 rounds in alternating order" in format_option_table(rows, 3, 5)

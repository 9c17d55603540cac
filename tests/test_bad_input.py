"""Every bad input a user might type is refused before Ray starts: exit status 2, a message naming the flag or the
field, and nothing left behind in --out (no search.json, no MLflow store, no name burnt).

The drivers run in this process (their imports are paid once); a case that regressed into a real search would
start Ray here and fail the test on its exit status and its leftovers."""

from __future__ import annotations

import os

import pytest

from pdcbdm.config import CEILINGS
from tune import search

SPACE_FILES = {
    "alias.yaml": "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    "huge.yaml": "train.batch_size: {range: [16, 1000000000]}\n",
    "infinite.yaml": "loss.pd_weight: {range: [0.001, .inf], scale: log}\n",
    "broken.yaml": "loss.pd_weight: {range: [0.001\n",
    "unknown.yaml": "loss.no_such_knob: {range: [0, 1]}\n",
}

# (arguments of tune/search.py after --preset smoke, a piece of the message that names what is wrong)
CASES = [
    # non-finite numbers and sizes past their ceilings
    (["--set", "train.lr=inf"], "train.lr must be a finite number"),
    (["--set", "train.lr=nan"], "train.lr must be > 0"),
    (["--set", "eval.guidance_grid=0,inf"], "eval.guidance_grid must hold finite numbers"),
    (["--set", "diffusion.timesteps=2000000000"], "diffusion.timesteps = 2000000000 is above its ceiling 10,000"),
    (["--set", "eval.num_samples=2000000000"], "eval.num_samples = 2000000000 is above its ceiling"),
    (["--space", "{dir}/huge.yaml"], "train.batch_size = 1000000000 is above its ceiling 8,192"),
    (["--space", "{dir}/infinite.yaml"], "two finite numbers"),
    (["--space", "{dir}/alias.yaml"], "YAML anchors and aliases"),
    (["--trials", "100000000"], "--trials 100000000 is above the ceiling 10,000"),
    # fields the data set ignores
    (["--set", "data.root=/tmp/nowhere"], "data.root = '/tmp/nowhere' is not read by data.dataset=digits-lt"),
    (["--set", "data.download=true"], "data.download = True is not read"),
    # names, seeds, counts
    (["--name", "../../x"], "--name '../../x'"),
    (["--name", "/abs"], "--name '/abs'"),
    (["--name", "o'brien"], "--name \"o'brien\""),
    (["--name", "a" * 101], "--name 'aaaa"),
    (["--seed", "-1"], "--seed must lie in 0..4294967295"),
    (["--seed", "99999999999"], "--seed must lie in 0..4294967295"),
    (["--max-trial-failures", "-1"], "--max-trial-failures must be >= 0"),
    (["--max-worker-failures", "-1"], "--max-worker-failures must be >= 0"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--asha-grace", "0"], "--asha-grace must be >= 1"),
    # places that cannot be used
    (["--out", "/proc/pdcbdm-out"], "--out /proc/pdcbdm-out: cannot be created or written"),
    (["--optuna-storage", "sqlite:////nonexistent/dir/x.db"], "--optuna-storage 'sqlite:////nonexistent/dir/x.db'"),
    (["--optuna-storage", "/proc/x/journal.log"], "--optuna-storage '/proc/x/journal.log': cannot be opened"),
    (["--optuna-storage", "postgresql://u:secretpw@127.0.0.1:1/db"], "--optuna-storage postgresql://***@127.0.0.1"),
    # refused before this issue, kept refused
    (["--set", "train.lr=-1"], "train.lr must be > 0"),
    (["--set", "train.steps=abc"], "train.steps expects int, got 'abc'"),
    (["--set", "loss.split_ratio=1.5"], "loss.split_ratio must be in (0, 1), got 1.5"),
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    (["--address", "127.0.0.1:9"], "Ray address 127.0.0.1:9 is unreachable"),
    (["--set", "data.dataset=cifar10-lt", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--set", "train.lr=abc"], "train.lr expects float"),
    (["--set", "loss.no_such_field=1"], "unknown config field 'loss.no_such_field'"),
    (["--set", "nonsense"], "override 'nonsense' must look like section.field=value"),
    (["--set", "data.dataset=parquet"], "data.root: required with data.dataset=parquet"),
    (["--set", "eval.judge=cnn"], "eval.judge"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker > 0"),
    (["--workers-per-trial", "0"], "--workers-per-trial must be >= 1"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker >= 0"),
    (["--workers-per-trial", "2", "--gpus-per-worker", "0.5"], "--gpus-per-worker 0.5 with --workers-per-trial 2"),
    (["--time-budget", "-5"], "--time-budget must be a positive number of minutes"),
    (["--space", "{dir}/missing.yaml"], "cannot be read"),
    (["--space", "{dir}/broken.yaml"], "not valid YAML"),
    (["--space", "{dir}/unknown.yaml"], "'loss.no_such_knob': not a config field"),
    (["--resume", "{dir}/no-such-search"], "not a search folder"),
    (["--warm-start", "{dir}/no-such-search"], "--warm-start"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    for name, text in SPACE_FILES.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_refused_before_ray_naming_it(argv, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{dir}", str(files)) for a in argv]
    given_out = "--out" in argv
    status = search.main(["--preset", "smoke", *([] if given_out else ["--out", str(out)]), *argv])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert message in err and err.startswith("error: "), err[-2000:]
    assert "secretpw" not in err and len(err) < 2000
    assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))  # nothing written, no name burnt


def test_allow_large_lifts_the_ceilings_and_says_so_in_help(capsys):
    from pdcbdm.config import apply_overrides, check_ceilings
    from pdcbdm.presets import preset

    big = apply_overrides(preset("smoke"), {"eval.num_samples": CEILINGS["eval.num_samples"] + 1})
    check_ceilings(big, allow_large=True)
    with pytest.raises(SystemExit):
        search.parse_args(["--help"])
    assert "--allow-large" in capsys.readouterr().out


def test_default_names_are_unique_within_a_second():
    from tune.arguments import check_name, default_name

    names = {default_name("smoke") for _ in range(50)}
    assert len(names) > 40  # 4 random hex digits: a collision among 50 is rare, 10 would be absurd
    for name in names:
        check_name(name)


def test_the_grid_runners_refuse_the_same_flags(tmp_path, capsys):
    """pipelines.ablation and pipelines.confirm share the runner's checks (tune/grid.py)."""
    from pipelines import ablation

    for argv, message in ((["--name", "../x"], "--name '../x'"), (["--concurrency", "0"], "--concurrency must be"),
                          (["--set", "eval.num_samples=999999999"], "above its ceiling")):
        status = ablation.main(["--preset", "smoke", "--seeds", "1", "--variants", "cbdm", "--out",
                                str(tmp_path / "ab"), *argv])
        err = capsys.readouterr().err
        assert status == 2 and message in err, err[-2000:]
        assert not (tmp_path / "ab").exists() or not any((tmp_path / "ab").iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_gpus_asked_for_where_torch_sees_none_are_refused_naming_why(tmp_path, capsys):
    """A search that asks for GPUs (or a network sized for them, by default) on a machine where torch sees none is
    refused with torch's CUDA build and the driver found, instead of training on the CPU; --gpus-per-worker 0 is
    the explicit way to train such a network on the CPU."""
    for argv, message in ((["--gpus-per-worker", "1"], "--gpus-per-worker 1: torch sees no GPU (torch "),
                          (["--set", "model.network=own64"], "model.network own64 is sized for GPUs")):
        assert search.main(["--preset", "smoke", "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "CUDA device(s) visible" in err, err
    # --gpus-per-worker 0: the GPU check passes (what stops this one is the next check, the digits' 16 px)
    assert search.main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--set", "model.network=own64",
                        "--gpus-per-worker", "0"]) == 2
    err = capsys.readouterr().err
    assert "sized for GPUs" not in err and "is sized for 64x64 images" in err, err

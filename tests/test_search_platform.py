"""The search driver's bookkeeping without a Ray cluster: resume from any folder, interrupted searches, the
concurrency that fits, on a real Optuna study (sqlite / journal) and a real MLflow sqlite store."""

from __future__ import annotations

import argparse
import json

import pytest
from mlflow.tracking import MlflowClient

from pdcbdm.io import write_json_atomic
from tests.searchutil import ROOT, seed_cache, trial_runs
from tune import runner, search, tracking
from tune.runner import SearchError, SearchInterrupted, fits
from tune.search import main, parse_args, plan


def _record(p: runner.SearchPlan) -> None:
    """What the driver writes before its first trial: search.json, and Tune's restorable state (a real Tuner
    writes tuner.pkl on construction, no cluster needed)."""
    from ray import tune as ray_tune

    p.search_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p.search_dir / "search.json", p.meta())
    ray_tune.Tuner(lambda config: None, run_config=ray_tune.RunConfig(name="tune", storage_path=p.storage))


def test_resume_of_a_search_json_without_an_entry_names_what_is_missing(tmp_path):
    """A search.json that lacks an entry the resume reads (another format, or a file edited by hand) is refused
    before Ray starts, naming the entries and the folder."""
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "old"]))
    _record(p)
    saved = json.loads((p.search_dir / "search.json").read_text())
    write_json_atomic(p.search_dir / "search.json", {k: v for k, v in saved.items() if k not in ("name", "out")})
    with pytest.raises(SearchError, match=r"--resume .*old: search.json is unreadable \(missing name, out\)"):
        plan(parse_args(["--resume", str(p.search_dir)]))


# -- --resume of a search started without --name, with a relative --out ------------------------------------

def test_resume_without_name_and_relative_out_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = plan(parse_args(["--preset", "smoke", "--out", "rel", "--storage-path", "ray-store"]))
    assert first.out == tmp_path / "a" / "rel" and first.storage == f"{tmp_path / 'a' / 'ray-store'}/{first.name}"
    _record(first)
    saved = json.loads((first.search_dir / "search.json").read_text())
    assert saved["name"] == first.name and saved["out"] == str(tmp_path / "a" / "rel")
    assert saved["tracking_uri"] == f"sqlite:///{tmp_path / 'a' / 'rel' / 'mlflow.db'}"
    assert saved["storage"] == first.storage and saved["optuna_storage"].endswith("optuna.db")

    monkeypatch.chdir(tmp_path / "b")  # a relative --resume, from elsewhere, seconds later (another clock name)
    resumed = plan(parse_args(["--resume", f"../a/rel/searches/{first.name}"]))
    assert (resumed.name, resumed.out, resumed.search_dir, resumed.storage, resumed.uri, resumed.optuna_storage) == (
        first.name, first.out, first.search_dir, first.storage, first.uri, first.optuna_storage)
    assert resumed.resume and not (tmp_path / "b" / "mlflow.db").exists()
    assert resumed.resume_command() == f"python tune/search.py --resume {first.search_dir}"


def test_resume_without_tune_state_touches_no_mlflow_store(tmp_path, monkeypatch, capsys):
    """A Tune folder without a restorable state (a search killed while Tune wrote its first state, or storage
    moved): the resume fails before MLflow is opened (no new mlflow.db, no RUNNING parent), from any working
    directory. (A search with no Tune folder at all never started a trial: its resume starts it,
    tests/test_search_identity.py.)"""
    monkeypatch.chdir(tmp_path)
    p = plan(parse_args(["--preset", "smoke", "--out", "out"]))
    p.search_dir.mkdir(parents=True)
    write_json_atomic(p.search_dir / "search.json", p.meta())
    (p.search_dir / "tune").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = main(["--resume", str(p.search_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "no restorable Tune state" in err, err
    assert not list(tmp_path.rglob("mlflow.db")), "the resume created an MLflow store"


# -- an interrupted search, or a driver exception, leaves no run RUNNING ----------------------------------

def test_stop_search_marks_unfinished_runs_and_parent_killed(tmp_path, capsys):
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "cut"]))
    exp = tracking.ensure_experiment(p.uri, "pdcbdm", tmp_path / "mlartifacts")
    sid = p.search_id
    assert len(sid) == 32 and sid != plan(parse_args(["--preset", "smoke", "--out", str(tmp_path / "b"),
                                                     "--name", "cut"])).search_id
    parent = tracking.parent_run(p.uri, exp, "cut", {}, search_id=sid)
    done = tracking.trial_run(p.uri, exp, parent, "cut", "t1", "t1", {}, search_id=sid)
    tracking.finish_run(p.uri, done, "FINISHED")
    failed = tracking.trial_run(p.uri, exp, parent, "cut", "t2", "t2", {}, search_id=sid)
    tracking.finish_run(p.uri, failed, "FAILED", "boom")
    running = tracking.trial_run(p.uri, exp, parent, "cut", "t3", "t3", {}, search_id=sid)
    # a resume finds the parent again, not one of the trial runs that carry the search id too
    assert tracking.parent_run(p.uri, exp, "cut", {}, search_id=sid) == parent
    # another search of the same name in the same experiment (a colleague's, or a folder made again) has its own
    # parent and trial runs, even with the same Ray trial id, and the first one's Ctrl-C leaves them alone
    other = tracking.parent_run(p.uri, exp, "cut", {}, search_id="another-search")
    theirs = tracking.trial_run(p.uri, exp, other, "cut", "t3", "t3", {}, search_id="another-search")
    assert other != parent and theirs != running
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("driver bug")
        except BaseException as exc:
            runner.stop_search(p, exp, parent, exc)
            raise
    err = capsys.readouterr().err
    assert f"python tune/search.py --resume {tmp_path / 'searches' / 'cut'}" in err
    assert "RuntimeError: driver bug" in err and "1 unfinished trial run(s)" in err
    status = {r.data.tags["pdcbdm.trial_id"]: r.info.status for r in trial_runs(p.uri, "cut")
              if r.data.tags["pdcbdm.search_id"] == sid}
    assert status == {"t1": "FINISHED", "t2": "FAILED", "t3": "KILLED"}
    client = MlflowClient(p.uri)
    assert client.get_run(parent).info.status == "KILLED" and client.get_run(running).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING" and client.get_run(theirs).info.status == "RUNNING"
    # a resume continues the same runs: RUNNING again
    assert tracking.trial_run(p.uri, exp, parent, "cut", "t3", "t3", {}, search_id=sid) == running
    assert client.get_run(running).info.status == "RUNNING"

    runner.stop_search(p, exp, parent, SearchInterrupted("interrupted"))
    assert "was interrupted" in capsys.readouterr().err


def test_sigint_watch_tells_whether_tune_caught_the_signal():
    import signal

    before = signal.getsignal(signal.SIGINT)
    with runner.SigintWatch() as watch:
        # Tune's run installs its handler and, when the signal comes, puts back the one it found
        found = signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGINT, found)
    assert watch.fired and signal.getsignal(signal.SIGINT) is before
    with runner.SigintWatch() as watch:
        signal.signal(signal.SIGINT, lambda *_: None)  # a run that ended normally leaves Tune's handler
    assert not watch.fired and signal.getsignal(signal.SIGINT) is before


# -- concurrency ------------------------------------------------------------------------------------------

def _ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"workers_per_trial": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
                                 "concurrency": None, **kw})


@pytest.mark.parametrize("kw, cpus, gpus, fit", [
    ({"gpus_per_worker": 1.0, "cpus_per_worker": 4.0}, 8, 8, 2),  # the CPUs hold 2 trials, not the GPUs' 8
    ({"gpus_per_worker": 1.0}, 8, 8, 8),
    ({"gpus_per_worker": 1.0, "workers_per_trial": 2}, 64, 8, 4),
    ({"gpus_per_worker": 0.5}, 16, 2, 4),
    ({"cpus_per_worker": 1.0, "workers_per_trial": 2}, 5, 0, 2),
    ({"cpus_per_worker": 0.5}, 2, 0, 4),
    ({"gpus_per_worker": 1.0, "concurrency": 3}, 64, 8, 3),
])
def test_concurrency_is_the_fewest_the_cpus_and_gpus_hold(kw, cpus, gpus, fit):
    assert fits(_ns(**kw), cpus, gpus) == fit


@pytest.mark.parametrize("address, gpus_per_worker, cpus, gpus, expected", [
    ("local", 1.0, 16, 1, 16.0),  # a lent H100 machine: its 16 cores go to the one GPU worker's evaluation
    ("local", 1.0, 64, 8, 8.0),
    ("local", 2.0, 64, 8, 16.0),
    ("local", 0.5, 16, 2, 4.0),
    ("local", 0.0, 16, 0, 1.0),  # CPU workers: one thread each, as before
    ("auto", 1.0, 16, 1, 1.0),  # a remote cluster's nodes are not counted here
])
def test_gpu_workers_get_the_cpus_per_gpu_by_default(address, gpus_per_worker, cpus, gpus, expected):
    from tune.runner import default_cpus_per_worker

    assert default_cpus_per_worker(address, gpus_per_worker, cpus, gpus) == expected


def test_concurrency_refuses_what_does_not_fit():
    with pytest.raises(SearchError, match="CPU"):
        fits(_ns(gpus_per_worker=1.0, cpus_per_worker=4.0, workers_per_trial=2), 4, 8)
    with pytest.raises(SearchError, match="GPU"):
        fits(_ns(gpus_per_worker=1.0, workers_per_trial=2), 8, 1)


def test_usable_cpus_follow_the_affinity_mask():
    import os

    assert runner.usable_cpus() == len(os.sched_getaffinity(0))


def test_fractional_gpu_with_several_workers_is_refused(tmp_path, capsys):
    code = main(["--preset", "smoke", "--out", str(tmp_path), "--name", "frac", "--gpus-per-worker", "0.5",
                 "--workers-per-trial", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "two NCCL ranks of one trial on one GPU" in err, err
    # one worker: fine (on a cluster's GPUs: this machine may have none, which a local search refuses)
    assert search.check_args(parse_args(["--preset", "smoke", "--gpus-per-worker", "0.5", "--address", "auto"]))


# -- MLflow gets the EMA network for sampling, not the training state --------------------------------------

def test_sampling_checkpoint_holds_the_ema_network_only(tmp_path):
    import torch

    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer, load_model, save_checkpoint

    cfg = apply_overrides(preset("smoke"), ["train.batch_size=4", "loss.pd_weight=0"])
    trainer = Trainer(cfg, load_data(cfg))
    trainer.train_step()
    small = save_checkpoint(tmp_path / "model.pt", trainer.sampling_payload())
    full = trainer.save(tmp_path / "full.pt")
    assert small.stat().st_size < 0.4 * full.stat().st_size  # one network, not net + EMA + Adam's two moments
    data = torch.load(small, weights_only=True)
    assert data["weights"] == "ema" and "optimizer" not in data and data["step"] == 1
    net, loaded_cfg, _ = load_model(small)  # what pipelines/evaluate.py loads
    ema = trainer.ema.module.state_dict()
    assert loaded_cfg == cfg and all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())


# -- multi-node traps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["sqlite:////shared/mlflow.db", "file:///shared/mlruns", "/shared/mlruns"])
def test_a_file_tracking_store_is_refused_on_a_cluster(uri):
    from tune.cluster import ClusterError, check_tracking_for_cluster

    with pytest.raises(ClusterError, match="would open a different database"):
        check_tracking_for_cluster(uri, "auto")
    check_tracking_for_cluster(uri, "local")  # one machine: every trial opens the same file
    check_tracking_for_cluster("http://head:5000", "10.0.0.1:6379")


def test_sqlite_tracking_with_a_cluster_address_fails_before_any_run(tmp_path, capsys):
    """The refusal comes before Ray is joined (the address here answers TCP: a listening socket)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = main(["--preset", "smoke", "--out", str(tmp_path), "--name", "c", "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "would open a different database" in err, err
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_probe_tells_a_shared_folder_from_a_node_local_one(tmp_path):
    """The per-node part of the shared-storage check (Ray runs ``probe_node`` on each node): a node that sees
    another disk at the same path fails to read the driver's marker."""
    from tune.cluster import check_storage_for_cluster, probe_node, unshared

    shared, other_disk = tmp_path / "shared", tmp_path / "node-b-disk"
    shared.mkdir()
    other_disk.mkdir()
    (shared / ".pdcbdm-shared-tok").write_text("tok")
    replies = {"node-a": probe_node(str(shared), "tok", "node-a"),
               "node-b": probe_node(str(other_disk), "tok", "node-b")}
    assert replies["node-a"] == "ok" and "cannot read" in replies["node-b"]
    assert set(unshared(shared, "tok", replies)) == {"node-b"}
    # a node whose probe wrote on its own disk: its marker never shows on the driver's
    (other_disk / ".pdcbdm-shared-tok").write_text("tok")
    assert probe_node(str(other_disk), "tok", "node-c") == "ok"
    assert unshared(shared, "tok", {"node-c": "ok"}) == {
        "node-c": "the marker it wrote is not visible on the driver's node"}
    check_storage_for_cluster("s3://bucket/prefix", "auto")  # URIs need no probe
    check_storage_for_cluster(str(tmp_path / "any"), "local")



def test_asset_probe_tells_a_node_with_its_own_digits_network_apart(tmp_path, digits_network):
    """The per-node part of the asset check (Ray runs ``node_assets`` on each node): the driver's digits network
    is installed where a node lacks it; a node that trained its own (same file name, other weights) or cannot
    load the data is named."""
    import io

    import torch

    from pdcbdm.assets import cache_payload
    from pdcbdm.config import apply_overrides
    from pdcbdm.metrics._io import atomic_torch_save
    from pdcbdm.presets import preset
    from tune.cluster import asset_differences, node_assets

    cfg = preset("smoke")
    seed_cache(tmp_path / "driver", digits_network)  # the session's digits network, trained in the driver's cache
    payload = cache_payload(cfg, tmp_path / "driver" / "cache")
    ((name, data),) = payload.items()
    blob = torch.load(io.BytesIO(data), weights_only=True)
    blob["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    atomic_torch_save(blob, tmp_path / "c" / name)
    replies = {node: node_assets(cfg.to_dict(), str(tmp_path / node), payload) for node in ("a", "b", "c")}
    assert (tmp_path / "a" / name).read_bytes() == data  # shipped
    assert replies["a"] == replies["b"] and replies["a"]["feature extractor"].startswith("digits-cnn/sha256:")
    assert replies["c"]["feature extractor"] != replies["a"]["feature extractor"]  # its own file was kept
    assert replies["a"]["training data"].startswith("data/sha256:")
    problems = asset_differences(replies)
    assert set(problems) == {"c"} and "its feature extractor is digits-cnn/sha256:" in problems["c"]
    no_data = apply_overrides(cfg, ["data.dataset=cifar10-lt", f"data.root={tmp_path / 'nothing'}"])
    missing = node_assets(no_data.to_dict(), str(tmp_path / "a"), {})
    assert set(missing) == {"error"}
    assert "cannot load the data" in asset_differences({**replies, "d": missing})["d"]


def test_the_confirm_hint_needs_two_completed_trials(tmp_path):
    from tune.summary import confirm_hint

    assert "no confirm command: 1 completed trial(s)" in confirm_hint(tmp_path, 1)
    assert confirm_hint(tmp_path, 2).endswith(f"--search {tmp_path} --top 2 --seeds 3")
    assert confirm_hint(tmp_path, 7).endswith("--top 3 --seeds 3")


def test_the_train_controller_imports_no_evaluation_stack():
    """Ray unpickles a trial's training function in the Train controller too: its module must stay light, and the
    trainer the trainable builds must use it (not tune.worker's loop directly)."""
    import subprocess
    import sys

    code = ("import sys, tune.entry\n"
            "heavy = [m for m in ('tune.worker', 'torch', 'mlflow', 'sklearn', 'pandas') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import pdcbdm.metrics\n"
            "assert 'sklearn' not in sys.modules, 'pdcbdm.metrics imports scikit-learn before it clusters'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import tune.trainable

    assert tune.trainable.train_loop.__module__ == "tune.entry"


def test_every_run_preset_has_a_default_number_of_trials():
    from pdcbdm.presets import PRESETS
    from tune.search import DEFAULT_TRIALS

    assert set(PRESETS) <= set(DEFAULT_TRIALS)

"""pipelines/confirm.py: the new seeds, the top configurations of a trials table, the lead test, the table and plot,
bad input, and one end-to-end confirmation (2 configurations x 2 seeds, 10 smoke steps) of a search folder written
here (search.json and trials.parquet as tune/search.py writes them), checked through its files and MLflow runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from pipelines import confirm as cf

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the smoke preset's 40 evaluation samples (4 a class): the floors of that count are in the smoke search's cache
# (``search_cache``), which the end-to-end confirmation copies; at 20 each of its four runs computed them again
TINY = ["train.steps=10", "train.eval_every=10", "train.log_every=5", "eval.noise_error_images=0", "train.device=cpu"]


def write_search(folder: Path, completed: int = 2) -> Path:
    """A finished search's folder: search.json (smoke config, tiny budget, a sqlite store beside it) and a ranked
    trials.parquet with ``completed`` completed trials and one stopped trial."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(preset("smoke"), TINY)
    meta = {"args": {"experiment": "pdcbdm", "preset": "smoke"}, "config": cfg.to_dict(), "name": "fake",
            "tracking_uri": f"sqlite:///{folder.parent / 'mlflow.db'}"}
    (folder / "search.json").write_text(json.dumps(meta))
    params = [(0.05, "cbdm", ""), (0.2, "inverted", "8"), (0.1, "uniform", "4")]
    rows = [{"trial_id": f"t{i + 1}", "status": "completed", "loss.pd_weight": pd_w, "loss.label_dist": dist,
             "model.tsa_resolutions": tsa, "fid": 900.0 + 50 * i}
            for i, (pd_w, dist, tsa) in enumerate(params[:completed])]
    rows.append({"trial_id": "t9", "status": "stopped", "loss.pd_weight": 0.3, "loss.label_dist": "cbdm",
                 "model.tsa_resolutions": "", "fid": None})
    table = pd.DataFrame(rows)
    table.insert(0, "rank", range(1, len(table) + 1))
    table.to_parquet(folder / "trials.parquet")
    return folder


# -- pure parts -------------------------------------------------------------------------------------------------------
def test_new_seeds_start_at_1000_and_skip_the_searchs_seed():
    assert cf.new_seeds(3, 0) == [1000, 1001, 1002]
    assert cf.new_seeds(3, 1001) == [1000, 1002, 1003]


def test_top_configs_take_completed_trials_in_rank_order_with_their_searched_values(tmp_path):
    trials = pd.read_parquet(write_search(tmp_path / "s", completed=3) / "trials.parquet")
    configs = cf.top_configs(trials, 2)
    assert [c["config_rank"] for c in configs] == [1, 2] and [c["trial_id"] for c in configs] == ["t1", "t2"]
    assert configs[1]["params"] == {"loss.pd_weight": 0.2, "loss.label_dist": "inverted", "model.tsa_resolutions": "8"}
    assert type(configs[0]["params"]["loss.pd_weight"]) is float  # a plain value, not numpy's
    cells = cf.cells(configs, [1000, 1001])
    assert [c.name for c in cells] == ["rank1-s1000", "rank1-s1001", "rank2-s1000", "rank2-s1001"]
    assert cells[3].overrides["train.seed"] == 1001 and cells[3].labels["config_rank"] == 2


def test_top_configs_take_the_knobs_of_the_searchs_space_file(tmp_path):
    """A search over its own --space varies other fields: confirm re-trains those, read from search.json."""
    trials = pd.read_parquet(write_search(tmp_path / "s", completed=3) / "trials.parquet")
    trials["train.lr"] = [3e-4, 1e-3, 2e-3][: len(trials)] + [None] * max(0, len(trials) - 3)
    knobs = cf.searched_knobs({"space": {"file": "my.yaml", "knobs": {"train.lr": {}, "loss.pd_weight": {}}}})
    assert knobs == ("train.lr", "loss.pd_weight")
    configs = cf.top_configs(trials, 2, knobs)
    assert configs[1]["params"] == {"train.lr": 1e-3, "loss.pd_weight": 0.2}
    assert "loss.pd_weight" in cf.searched_knobs({}) and "train.lr" not in cf.searched_knobs({})  # an older search


def test_top_configs_refuse_too_few_completed_trials(tmp_path):
    trials = pd.read_parquet(write_search(tmp_path / "s", completed=1) / "trials.parquet")
    with pytest.raises(cf.ConfirmError, match="1 completed trial"):
        cf.top_configs(trials, 2)
    trials = pd.read_parquet(write_search(tmp_path / "t", completed=2) / "trials.parquet")
    with pytest.raises(cf.ConfirmError, match="--top 3"):
        cf.top_configs(trials, 3)


def test_lead_test_is_a_one_sided_welch_test():
    clear = cf.lead_test([10.0, 10.5, 9.8], [20.0, 21.0, 19.5])
    assert clear["p_value"] < 0.01 and clear["lead"] == pytest.approx(10.0666, rel=1e-3)
    assert clear["verdict"].startswith("rank 1 leads beyond seed noise") and "Welch" in clear["test"]
    noisy = cf.lead_test([10.0, 14.0, 6.0], [11.0, 15.0, 7.0])
    assert 0.05 < noisy["p_value"] < 0.5 and "within seed noise" in noisy["verdict"]
    reversed_ = cf.lead_test([20.0, 21.0], [10.0, 11.0])
    assert reversed_["p_value"] > 0.5 and "no lead" in reversed_["verdict"]
    few = cf.lead_test([10.0], [11.0, float("nan"), 12.0])
    assert math.isnan(few["p_value"]) and few["n1"] == 1 and few["n2"] == 2 and few["verdict"].startswith("not tested")


def _runs() -> pd.DataFrame:
    rows = [{"config_rank": r, "seed": s, "status": "finished", "fid": f, "fid_tail": 2 * f}
            for r, fids in ((1, [10.0, 12.0]), (2, [20.0, 24.0])) for s, f in zip((1000, 1001), fids)]
    rows.append({"config_rank": 2, "seed": 1002, "status": "failed", "fid": None, "fid_tail": None})
    return pd.DataFrame(rows)


def test_summarise_table_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [{"config_rank": 1, "trial_id": "a", "search_fid": 9.0, "params": {"loss.pd_weight": 0.1}},
               {"config_rank": 2, "trial_id": "b", "search_fid": 9.5, "params": {"loss.pd_weight": 0.2}}]
    s = cf.summarise(_runs(), configs)
    assert list(s["n"]) == [2, 2]  # the failed run is left out
    assert s.loc[0, "fid_mean"] == pytest.approx(11.0) and s.loc[1, "fid_std"] == pytest.approx(2 ** 1.5)
    assert s.loc[1, "fid_tail_mean"] == pytest.approx(44.0) and list(s["pd_weight"]) == [0.1, 0.2]
    text = cf.format_table(s)
    assert "11 ± 1.4" in text and "search FID" in text and "tail FID (new seeds)" in text
    plt.close(cf.plot(s, _runs(), tmp_path / "c.png", "t"))
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC and [p.name for p in tmp_path.iterdir()] == ["c.png"]


@pytest.mark.parametrize("case, argv, message", [
    ("no-search", ["--search", "{tmp}/nope"], "no search.json"),
    ("unfinished", ["--search", "{tmp}/s"], "no trials.parquet"),
    ("one", ["--search", "{tmp}/s"], "1 completed trial"),
    ("top", ["--search", "{tmp}/s", "--top", "1"], "--top must be >= 2"),
    ("seeds", ["--search", "{tmp}/s", "--seeds", "1"], "--seeds must be >= 2"),
    ("resume", ["--resume", "{tmp}"], "no confirm.json"),
])
def test_bad_input_exits_2_before_ray_naming_the_problem(tmp_path, capsys, case, argv, message):
    write_search(tmp_path / "s", completed=1 if case == "one" else 2)
    if case == "unfinished":
        (tmp_path / "s" / "trials.parquet").unlink()
    assert cf.main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "confirm").exists()


# -- end to end -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def confirmed(tmp_path_factory, search_cache):
    """One confirmation on Ray: the top 2 configurations x 2 new seeds of a written search folder (on a copy of the
    smoke search's feature cache)."""
    from tests.searchutil import seed_cache

    base = tmp_path_factory.mktemp("confirm")
    seed_cache(base, search_cache)
    folder = write_search(base / "searches" / "fake")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(base / "cache")}
    cmd = [sys.executable, "-m", "pipelines.confirm", "--search", str(folder), "--top", "2", "--seeds", "2",
           "--cpus-per-worker", "0.5"]  # the four runs at once: their Ray start-up and evaluation waits overlap
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    return folder, proc


@pytest.mark.slow
def test_confirm_trains_each_configuration_with_new_seeds_and_tests_the_lead(confirmed):
    folder, proc = confirmed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = folder / "confirm"
    runs = pd.read_parquet(out / "confirm_runs.parquet")
    assert len(runs) == 4 and set(runs["seed"]) == {1000, 1001} and (runs["status"] == "finished").all()
    summary = pd.read_parquet(out / "confirm.parquet")
    assert list(summary["config_rank"]) == [1, 2] and list(summary["n"]) == [2, 2]
    for rank, row in summary.set_index("config_rank").iterrows():
        fids = runs.loc[runs["config_rank"] == rank, "fid"]
        assert row["fid_mean"] == pytest.approx(fids.mean()) and row["fid_std"] == pytest.approx(fids.std())
    assert (out / "confirm.png").read_bytes()[:8] == PNG_MAGIC
    assert "one-sided Welch t-test" in proc.stdout and "FID (new seeds)" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pdcbdm")  # the search's store and experiment
    parent = client.search_runs([exp.experiment_id], "tags.`pdcbdm.kind` = 'confirm'")
    assert len(parent) == 1 and parent[0].info.run_name == "confirm-fake" and parent[0].info.status == "FINISHED"
    assert "Welch" in parent[0].data.tags["pdcbdm.lead_test"] and "lead_p_value" in parent[0].data.metrics
    assert {"confirm.parquet", "confirm_runs.parquet", "confirm.png"} <= {
        a.path for a in client.list_artifacts(parent[0].info.run_id)}
    children = client.search_runs([exp.experiment_id], "tags.`pdcbdm.kind` = 'trial'")
    assert sorted(c.info.run_name for c in children) == ["rank1-s1000", "rank1-s1001", "rank2-s1000", "rank2-s1001"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent[0].info.run_id and child.info.status == "FINISHED"
        rank2 = child.info.run_name.startswith("rank2")
        assert child.data.params["loss.label_dist"] == ("inverted" if rank2 else "cbdm")
        assert child.data.params["train.seed"] == child.info.run_name.rsplit("-s", 1)[1]
        assert child.data.params["train.steps"] == "10"

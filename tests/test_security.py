"""Secure by default: Ray's token authentication on, a private cluster on loopback only, a resume folder others
can write named, and a cluster upload that leaves data and secrets behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.netprobe import is_loopback
from tune import ray_access
from tune.search_folder import warn_if_writable_by_others, writable_by_others
from tune.working_dir import MAX_FILE_BYTES, plan_upload

OFF = "disabled"  # the mode a user might have in their environment


@pytest.mark.slow
def test_a_running_search_listens_on_loopback_only_and_its_job_api_wants_a_token(smoke_search):
    out, _, proc = smoke_search
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads((out / "listeners.json").read_text())
    print("\n".join(f"{r['ip']}:{r['port']} {r['process']}: {r['answer']}" for r in found))
    assert len(found) >= 5  # GCS, raylet, dashboard, its agents, workers: the probe saw the cluster running
    beyond = [r for r in found if not is_loopback(r["ip"])]
    assert not beyond, f"listening beyond loopback: {beyond}"
    # the dashboard's job API and its agent's refused a request without the token (their other ports are
    # Prometheus exporters, on loopback like everything else)
    for process in ("dashboard.py", "DashboardAgent"):
        answers = {r["answer"] for r in found if process in r["process"]}
        assert "401" in answers, (process, answers)


def test_a_private_cluster_turns_authentication_on_even_when_the_environment_turns_it_off(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", OFF)
    ray_access.require_token_auth("local")
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert "ignored" in capsys.readouterr().out


def test_joining_a_cluster_with_authentication_off_is_refused_with_the_recipe(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", OFF)
    with pytest.raises(ray_access.AccessError, match=r"ray get-auth-token --generate.*RAY_AUTH_MODE=token"):
        ray_access.require_token_auth("10.0.0.1:6379")
    monkeypatch.delenv("RAY_AUTH_MODE")
    ray_access.require_token_auth("10.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_search_refuses_to_join_a_cluster_with_authentication_off_before_connecting(tmp_path, monkeypatch):
    from tune import runner, search

    monkeypatch.setenv("RAY_AUTH_MODE", OFF)
    p = search.plan(search.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--address", "127.0.0.1:9"]))
    with pytest.raises(runner.SearchError, match="token authentication only"):
        runner.connect_ray(p)


def test_a_resume_folder_that_every_user_may_write_is_named_in_a_warning(tmp_path, capsys):
    folder = tmp_path / "searches" / "s"
    (folder / "tune").mkdir(parents=True)
    state = folder / "tune" / "experiment_state.pkl"
    state.write_bytes(b"x")
    warn_if_writable_by_others(folder, "--resume")
    assert capsys.readouterr().err == ""
    state.chmod(state.stat().st_mode | stat.S_IWOTH)
    assert writable_by_others(folder) == [state]
    warn_if_writable_by_others(folder, "--resume")
    err = capsys.readouterr().err
    assert f"--resume {folder}: writable by every user" in err and str(state) in err and "chmod -R o-w" in err


def test_search_help_says_a_resume_unpickles_state(capsys):
    from tune import search

    with pytest.raises(SystemExit):
        search.parse_args(["--help"])
    assert "resume only folders that only you and people you trust can write" in \
        " ".join(capsys.readouterr().out.split())


def test_the_cluster_upload_leaves_data_secrets_arrays_and_big_files_behind(tmp_path):
    root = tmp_path / "repo"
    for rel, size in {"pkg/model.py": 10, "data/train/a.png": 10, ".env": 10, "conf/.env": 10, "x.npy": 10,
                      "t/table.parquet": 10, "pdcbdm/data/loader.py": 10, "big.bin": MAX_FILE_BYTES + 1,
                      "ok.bin": MAX_FILE_BYTES}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"0" * size)
    up = plan_upload(root)
    assert up.files == 3 and up.size == 20 + MAX_FILE_BYTES  # model.py, the package's data/ module, ok.bin
    assert up.too_big == ["big.bin"] and "/big.bin" in up.excludes
    assert "3 files" in up.summary() and "big.bin" in up.summary()

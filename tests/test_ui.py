"""The smoke search as a user sees it: `mlflow server` on its store, pages rendered by headless Chromium.

Reuses the session's smoke search. The pages: the one a new user lands on (the experiment's training runs, at the
URL the search prints), the experiment's runs, the best trial's run page and its final sample grid in the artifact
view, the comparison of the trials, and the registered winner. Screenshots go into the test's tmp folder (and, with
PDCBDM_UI_SCREENSHOTS=DIR, the comparison and landing pages into DIR: how docs/mlflow_compare.png and
docs/mlflow_landing.png are made). Without a
`chromium` the test skips, unless PDCBDM_REQUIRE_CHROMIUM=1 (CI and `make ui-check` set it: there it fails).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.searchutil import free_port, trial_runs, wait_http
from tune import registry, tracking
from tune.space_file import default_knobs
from tune.tags import EXPERIMENT_KIND_TAG

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE_BUDGET_MS = 15000  # Chromium's virtual time for the app's requests and rendering


@pytest.fixture(scope="module")
def mlflow_server(smoke_search, tmp_path_factory):
    """`mlflow server` on the smoke search's store, on 127.0.0.1, without its job runners; stopped afterwards."""
    if CHROMIUM is None:
        if os.environ.get("PDCBDM_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (apt-get install -y chromium) and PDCBDM_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, name, proc = smoke_search
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 265 MB instead of 1.8 GB
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
           f"sqlite:///{out / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"{url}/health", server)
        yield url, out, name
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
           f"--virtual-time-budget={PAGE_BUDGET_MS}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _render(url: str, screenshot: Path) -> str:
    """The page's DOM after the app rendered it, and a screenshot of the same rendering into ``screenshot`` (one
    Chromium run does both: headless=new writes the screenshot and prints the DOM). Each render has a new browser
    profile: the UI keeps the user's last GenAI / Model training choice in the browser, and a new user has none."""
    profile = screenshot.with_suffix(".profile")
    page = _chromium(f"--user-data-dir={profile}", "--dump-dom", f"--screenshot={screenshot}", url)
    assert page.returncode == 0 and "<body" in page.stdout, page.stderr[-2000:]
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, page.stderr[-2000:]
    return page.stdout


def _text(dom: str) -> str:
    """The visible text of a DOM: scripts, styles and tags removed, entities decoded, spaces collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def test_the_search_in_the_mlflow_ui(mlflow_server, tmp_path):
    url, out, name = mlflow_server
    runs = trial_runs(f"sqlite:///{out / 'mlflow.db'}", name)
    experiment = runs[0].info.experiment_id
    table = pd.read_parquet(out / "searches" / name / "trials.parquet").set_index("trial_id")
    best = next(r for r in runs if r.data.tags["pdcbdm.trial_id"] == table.index[0])
    shots = {}

    # the page a new user lands on (the URL the search prints): the training runs, not the GenAI views (traces,
    # "Evaluation runs"); the experiment says it holds model training
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    shots["landing"] = tmp_path / "landing.png"
    page = _text(_render(tracking.landing_url(url, experiment), shots["landing"]))
    assert name in page and f"{len(runs) + 1} matching runs" in page, page[:2000]
    assert " Runs " in page and "Model registry" in page, page[:2000]
    assert "Evaluation runs" not in page and "Token Usage" not in page, page[:2000]

    # the search's winner in the model registry: its version with the alias best
    page = _text(_render(f"{url}/#/models/{registry.registered_name(name)}", tmp_path / "registry.png"))
    assert re.search(r"Version 1 .*@ best", page), page[:2000]

    # the experiment's training runs: the search (its trials nest under it, collapsed) and the run count
    page = _text(_render(f"{url}/#/experiments/{experiment}/runs", tmp_path / "runs.png"))
    assert name in page and f"{len(runs) + 1} matching runs" in page, page[:2000]

    # the best trial's page: its name, the searched params, the FID among its metrics, how it ended
    page = _text(_render(f"{url}/#/experiments/{experiment}/runs/{best.info.run_id}", tmp_path / "trial.png"))
    assert best.info.run_name in page
    for key in default_knobs():
        assert key in page, key
    assert re.search(r"\bfid [0-9.]+", page), page[:3000]

    # its final sample grid at its best w, shown by the artifact view
    w = f"{table.iloc[0]['best_guidance']:g}"
    artifact = f"samples/final/samples_w{w}.png"
    dom = _render(f"{url}/#/experiments/{experiment}/runs/{best.info.run_id}/artifacts/{artifact}",
                  tmp_path / "grid.png")
    assert re.search(rf'<img alt="{re.escape(artifact)}" src="blob:', dom), _text(dom)[:2000]

    # the comparison of the trials: every trial's name, the searched params, the FID row
    query = urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in runs]),
                                    "experiments": json.dumps([experiment])}, quote_via=urllib.parse.quote)
    shots["compare"] = tmp_path / "compare.png"
    page = _text(_render(f"{url}/#/compare-runs?{query}", shots["compare"]))
    assert f"Comparing {len(runs)} Runs" in page
    for run in runs:
        assert run.info.run_name in page
    for key in default_knobs():
        assert key in page, key
    metrics = page[page.index(" Metrics "):]
    assert " fid " in metrics and any(f"{run.data.metrics['fid']:.4g}" in metrics for run in runs
                                      if "fid" in run.data.metrics), metrics[:3000]
    keep = os.environ.get("PDCBDM_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for page, shot in shots.items():
            shutil.copy(shot, Path(keep) / f"mlflow_{page}.png")

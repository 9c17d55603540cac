"""The analysis notebooks: committed without outputs, parameter cell first, and executed end to end with nbclient
against a smoke search's folder and a tiny ablation's folder; plus tune/analysis.py's loaders."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"analyse_best_trials": "SEARCH_DIR", "ablation": "ABLATION_DIR"}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def _parameter_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("name, variable", NOTEBOOKS.items())
def test_first_code_cell_is_the_tagged_parameter_cell(name, variable):
    cell = _parameter_cell(_read(name))
    assert "parameters" in cell.metadata.get("tags", [])
    assert f"{variable} = " in cell.source and f"PDCBDM_{variable}" in cell.source


def _execute(name: str, **params: str) -> nbformat.NotebookNode:
    """Run a notebook from notebooks/ with ``params`` injected in a cell after the parameter cell (as papermill
    does), so that the other defaults of the parameter cell stay."""
    from nbclient import NotebookClient

    nb = _read(name)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(nb.cells.index(_parameter_cell(nb)) + 1, injected)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int, list[str]]:
    """(all printed text, number of images, error names)."""
    text, images, errors = [], 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                errors.append(f"{out.ename}: {out.evalue}")
            else:
                images += "image/png" in out.get("data", {})
                text.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(text), images, errors


def _search_dir(smoke_search) -> Path:
    out, name, proc = smoke_search
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "searches" / name


@pytest.mark.slow
def test_analysis_notebook_runs_on_a_smoke_search(smoke_search):
    from tune import analysis

    folder = _search_dir(smoke_search)
    trials = analysis.load_search(folder).trials
    nb = _execute("analyse_best_trials", SEARCH_DIR=str(folder))
    text, images, errors = _outputs(nb)
    assert not errors, errors
    assert f"search e2e: {len(trials)} trial(s)" in text
    assert "rank" in text and "trial_id" in text and "status" in text  # the ranked table's header
    for trial_id in trials["trial_id"]:
        assert str(trial_id) in text
    assert "importance" in text  # the importances, or why they could not be computed
    # params plot, head/tail plot, at least: more when trials completed (guidance curves, samples, per-class)
    assert images >= 2
    if (trials["status"] == "completed").any():
        assert images >= 5 and "best trial" in text


@pytest.mark.slow
def test_ablation_notebook_runs_on_a_tiny_ablation(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = _execute("ablation", ABLATION_DIR=str(out))
    text, images, errors = _outputs(nb)
    assert not errors, errors
    assert "CBDM" in text and "PD-CBDM (all three)" in text and "FID ↓" in text  # the summary table
    assert "fid_head_mean" in text  # the head/tail table
    assert images == 3  # bar chart, head/tail, per-class


def test_ablation_table_opens_with_pandas_and_pyarrow(tiny_ablation):
    """ablation.parquet is a plain Parquet file: both readers see the same rows."""
    import pandas as pd
    import pyarrow.dataset as pads

    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_parquet(out / "ablation.parquet")
    assert len(rows) == 2 and pads.dataset(out / "ablation.parquet").to_table().num_rows == len(rows)


@pytest.mark.slow
def test_search_loads_the_same_trials_from_mlflow_and_from_parquet(smoke_search):
    from tune import analysis

    folder = _search_dir(smoke_search)
    from_parquet = analysis.load_search(folder, source="parquet")
    from_mlflow = analysis.load_search(folder, source="mlflow")
    assert from_parquet.source == "parquet" and from_mlflow.source == "mlflow"
    a = from_parquet.trials.set_index("trial_id")
    b = from_mlflow.trials.set_index("trial_id")
    assert sorted(a.index) == sorted(b.index)
    for trial_id in a.index:
        assert a.loc[trial_id, "status"] == b.loc[trial_id, "status"]
        for param in analysis.searched_columns(from_parquet.trials):
            assert str(a.loc[trial_id, param]) == str(b.loc[trial_id, param])
        fa, fb = a.loc[trial_id, "proxy_fid"], b.loc[trial_id, "proxy_fid"]
        assert (math.isnan(fa) and math.isnan(fb)) or fa == pytest.approx(fb)
    # the auto mode adds every MLflow metric, e.g. the guidance grid of completed trials
    done = from_mlflow.trials[from_mlflow.trials["status"] == "completed"]
    if not done.empty:
        assert not analysis.guidance_curves(done).empty


def test_missing_folders_raise_naming_the_path(tmp_path):
    from tune import analysis

    with pytest.raises(FileNotFoundError, match="search.json"):
        analysis.load_search(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="ablation.parquet"):
        analysis.load_ablation(tmp_path)
    with pytest.raises(ValueError, match="source"):
        analysis.load_search(tmp_path, source="csv")


def _study(folder: Path, name: str, points: list[dict]) -> None:
    import optuna

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    dists = {"loss.pd_weight": optuna.distributions.FloatDistribution(1e-4, 0.3, log=True),
             "loss.label_dist": optuna.distributions.CategoricalDistribution(["cbdm", "inverted"])}
    for params in points:
        value = 10 * params["loss.pd_weight"] + (params["loss.label_dist"] == "cbdm")
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))


def test_param_importance_explains_when_it_cannot_be_computed(tmp_path):
    from tune.analysis import SearchResults, param_importance

    import pandas as pd

    results = SearchResults(tmp_path, "s", {}, None, pd.DataFrame(), "parquet")
    with pytest.raises(FileNotFoundError, match="optuna.db"):
        param_importance(results)
    _study(tmp_path, "s", [{"loss.pd_weight": 0.01, "loss.label_dist": "cbdm"}])
    with pytest.raises(ValueError, match="too few to rank"):
        param_importance(results)
    # two varying parameters need 4 completed trials: 3 are refused, not ranked
    _study(tmp_path, "v", [{"loss.pd_weight": w, "loss.label_dist": d} for w, d in
                           ((0.001, "cbdm"), (0.01, "inverted"), (0.1, "cbdm"))])
    with pytest.raises(ValueError, match=r"3 completed trial\(s\): too few to rank 2 .* >= 4"):
        param_importance(SearchResults(tmp_path, "v", {}, None, pd.DataFrame(), "parquet"))
    _study(tmp_path, "t", [{"loss.pd_weight": 0.01, "loss.label_dist": "cbdm"}] * 4)
    with pytest.raises(ValueError, match="share every parameter"):
        param_importance(SearchResults(tmp_path, "t", {}, None, pd.DataFrame(), "parquet"))
    points = [{"loss.pd_weight": w, "loss.label_dist": d} for w in (0.001, 0.01, 0.1, 0.2) for d in ("cbdm", "inverted")]
    _study(tmp_path, "u", points)
    importance = param_importance(SearchResults(tmp_path, "u", {}, None, pd.DataFrame(), "parquet"))
    assert set(importance["param"]) == {"loss.pd_weight", "loss.label_dist"}
    assert importance["importance"].sum() == pytest.approx(1.0)
    assert list(importance["importance"]) == sorted(importance["importance"], reverse=True)
    # the bootstrap interval: within [0, 1], from resampled trials
    assert ((0 <= importance["low"]) & (importance["low"] <= importance["high"]) & (importance["high"] <= 1)).all()
    assert (importance["resamples"] > 0).all() and importance.attrs["n_trials"] == 8


def test_trials_scored_differently_are_named_not_ranked_together():
    import pandas as pd

    from tune import analysis

    same = pd.DataFrame({"reference_kind": ["balanced-train"] * 2,
                         "judge": ["domain-cnn (4 of 4 classes, held-out accuracy 0.900)",
                                   "domain-cnn (3 of 4 classes, held-out accuracy 0.850)"]})
    assert analysis.scoring_note(same) is None  # coverage and accuracy vary by run; the network is what counts
    mixed = same.assign(reference_kind=["balanced-train", "heldout"],
                        judge=["domain-cnn (4 of 4 classes)", "linear probe on inception-v3-compat (4 of 4 classes)"])
    note = analysis.scoring_note(mixed)
    assert "do not rank" in note and "balanced-train, heldout" in note and "linear probe on inception" in note
    assert analysis.scoring_note(pd.DataFrame({"fid": [1.0]})) is None  # a table without the tags: nothing to say

"""Credentials never reach a file, a tag or a message: URLs with their secrets masked (tune/redact.py) in search.json,
Tune's pickled state, messages and MLflow records; a --resume (and ``confirm --search``) takes the real URL again from
the flag or environment variable the user gives; no MLflow credentials for a server only search.json names; what the
workers need travels through Ray's object store. tests/test_cluster_nodes.py greps every file a real search on a
cluster writes."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from pdcbdm.io import write_json_atomic
from tune import redact, tracking
from tune.redact import has_secret, is_redacted, redact_text, redact_url
from tune.runner import SearchError
from tune.search import main, parse_args, plan

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_TRACKING_CLIENT_CERT_PATH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No tracking URI, Optuna storage or credentials from the machine's environment, none left behind, and an
    empty record of real URLs (``redact.remember``)."""
    for key in (*CREDENTIALS, "MLFLOW_TRACKING_URI", "PDCBDM_OPTUNA_STORAGE"):
        monkeypatch.setenv(key, "")  # recorded, so that what the code under test sets is undone too
        monkeypatch.delenv(key)
    monkeypatch.setattr(redact, "_KNOWN", {})


# -- tune/redact.py ---------------------------------------------------------------------------------------------------
MASKED = [
    ("postgresql://user:pw@db.example:5432/optuna", "postgresql://***@db.example:5432/optuna"),
    ("http://u:SECRET@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("https://alice@mlflow.example/prefix", "https://***@mlflow.example/prefix"),
    ("mysql+pymysql://u:p%40ss@h/db?charset=utf8", "mysql+pymysql://***@h/db?charset=utf8"),
    ("postgresql://u:p@ss@host/db", "postgresql://***@host/db"),  # an unencoded '@' in the password
    ("postgresql://u:pa/ss@host/db", "postgresql://***@host/db"),  # an unencoded '/' (SQLAlchemy reads it so)
    ("sqlite:////tmp/o.db?password=S&timeout=3", "sqlite:////tmp/o.db?password=***&timeout=3"),
    ("postgresql://h/db?sslmode=require&sslpassword=k#x", "postgresql://h/db?sslmode=require&sslpassword=***#x"),
    ("https://h/x?token=abc&Access_Token=q;api-key=z", "https://h/x?token=***&Access_Token=***;api-key=***"),
]
PLAIN = ["http://127.0.0.1:5000", "sqlite:////abs/mlflow.db", "sqlite:///rel.db", "/abs/journal.log",
         "s3://bucket/prefix", "http://host/path@v2", "http://host:80/?email=a@b", "postgresql://host/db?sslmode=x"]


@pytest.mark.parametrize("url, masked", MASKED)
def test_user_info_and_password_parameters_are_masked(url, masked):
    assert redact_url(url) == masked and has_secret(url)
    assert redact_url(masked) == masked and is_redacted(masked)  # masking again changes nothing


@pytest.mark.parametrize("url", PLAIN)
def test_a_url_without_secrets_is_left_as_it_is(url):
    assert redact_url(url) == url and not has_secret(url) and not is_redacted(url)


def test_every_url_in_a_text_is_masked():
    text = ("MLflow tracking server 'http://u:SECRET@127.0.0.1:1' is unreachable; study at "
            "postgresql://o:SECRET@db/optuna, see http://docs.example/a.")
    assert redact_text(text) == ("MLflow tracking server 'http://***@127.0.0.1:1' is unreachable; study at "
                                 "postgresql://***@db/optuna, see http://docs.example/a.")


def test_a_masked_url_is_revealed_from_this_process_or_the_named_variable(monkeypatch):
    real = "postgresql://o:SECRET@db/optuna"
    assert redact.reveal(redact_url(real), ("PDCBDM_OPTUNA_STORAGE",)) == redact_url(real)  # nothing knows it
    monkeypatch.setenv("PDCBDM_OPTUNA_STORAGE", "postgresql://o:OTHER@elsewhere/optuna")  # another database
    assert redact.reveal(redact_url(real), ("PDCBDM_OPTUNA_STORAGE",)) == redact_url(real)
    monkeypatch.setenv("PDCBDM_OPTUNA_STORAGE", real)
    assert redact.reveal(redact_url(real), ("PDCBDM_OPTUNA_STORAGE",)) == real
    monkeypatch.delenv("PDCBDM_OPTUNA_STORAGE")
    redact.remember(real)
    assert redact.reveal(redact_url(real)) == real


# -- tune/tracking.py -------------------------------------------------------------------------------------------------
def test_env_for_workers_carries_every_tracking_and_aws_credential(monkeypatch):
    wanted = {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "t",
              "MLFLOW_TRACKING_INSECURE_TLS": "false", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem",
              "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/client.pem", "AWS_ACCESS_KEY_ID": "k",
              "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "st", "AWS_DEFAULT_REGION": "eu-west-1",
              "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000", "REQUESTS_CA_BUNDLE": "/bundle.pem"}
    for key, value in {**wanted, "PDCBDM_UNRELATED": "x", "MY_AWS_THING": "y"}.items():
        monkeypatch.setenv(key, value)
    got = tracking.env_for_workers()
    assert {k: got.get(k) for k in wanted} == wanted
    assert "PDCBDM_UNRELATED" not in got and "MY_AWS_THING" not in got


def test_an_http_uri_leaves_its_user_info_in_the_environment_not_in_the_uri():
    os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
    assert tracking.use_uri("http://al%40ice:p%2Fw@127.0.0.1:5000/base") == "http://127.0.0.1:5000/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "al@ice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p/w"
    # credentials already in the environment win, as MLflow would have it
    assert tracking.use_uri("http://x:y@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p/w"
    # a database's URI keeps its password (its driver needs it), remembered for what Tune unpickles
    db = "postgresql://u:SECRET@db/mlflow"
    assert tracking.use_uri(db) == db and redact.reveal(redact_url(db)) == db


def test_the_preflight_error_of_an_unreachable_server_shows_no_password(tmp_path, capsys):
    code = main(["--preset", "smoke", "--out", str(tmp_path), "--name", "bad",
                 "--tracking-uri", "http://u:SECRET@127.0.0.1:1"])
    out, err = capsys.readouterr()
    assert code == 2 and "MLflow tracking server http://***@127.0.0.1:1 is unreachable" in err, err
    assert "SECRET" not in out + err
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # a failed check leaves the environment alone
    with pytest.raises(tracking.TrackingError) as info:
        tracking.check_tracking_uri("sqlite:////no/such/folder/mlflow.db?password=SECRET")
    assert "SECRET" not in str(info.value) and "/no/such/folder" in str(info.value)


def test_a_record_naming_a_masked_uri_needs_it_again(monkeypatch):
    real, saved = "http://u:SECRET@127.0.0.1:5000", "http://***@127.0.0.1:5000"
    with pytest.raises(tracking.TrackingError) as info:
        tracking.recorded_uri(saved, None, "the search")
    assert "--tracking-uri" in str(info.value) and "MLFLOW_TRACKING_URI" in str(info.value)
    assert "SECRET" not in str(info.value)
    with pytest.raises(tracking.TrackingError, match="is not the MLflow store"):
        tracking.recorded_uri(saved, "http://u:SECRET@127.0.0.1:6000", "the search")
    assert tracking.recorded_uri(saved, real, "the search") == (real, [])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    assert tracking.recorded_uri(saved, None, "the search") == (real, [])
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok"  # the user named this server: its credentials go


def test_no_credentials_for_a_server_only_the_record_names(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:SECRET@mine.example:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "SECRET")
    uri, warnings = tracking.recorded_uri("http://theirs.example:5000", None, "the search in /s")
    assert uri == "http://theirs.example:5000" and len(warnings) == 2
    assert "not to MLFLOW_TRACKING_URI=http://***@mine.example:5000" in warnings[0]
    assert "not sending MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD to the MLflow server theirs.example:5000" \
        in warnings[1]
    assert not any(k in os.environ for k in CREDENTIALS) and "SECRET" not in " ".join(warnings)
    # a sqlite store gets no credentials anyway: nothing is dropped
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "SECRET")
    uri, warnings = tracking.recorded_uri("sqlite:////s/mlflow.db", None, "the search")
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "SECRET" and len(warnings) == 1


# -- what Tune pickles ------------------------------------------------------------------------------------------------
def test_the_searcher_state_and_the_status_callback_pickle_without_the_password(tmp_path, monkeypatch):
    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset
    from tune.search import build_searcher
    from tune.study import optuna_storage
    from tune.trainable import MlflowStatusCallback

    real = f"sqlite:///{tmp_path / 'optuna.db'}?password=SECRET"
    redact.remember(real)
    args = parse_args(["--preset", "smoke", "--trials", "2"])
    cfg = apply_overrides(preset("smoke"), ["train.steps=40", "train.eval_every=20"])
    searcher = build_searcher(args, cfg, "s", real, 2)
    assert searcher.suggest("a")
    (tmp_path / "state").mkdir()
    searcher.save_to_dir(str(tmp_path / "state"), session_str="x")  # what Tune writes for --resume
    callback = MlflowStatusCallback("postgresql://u:SECRET@db/mlflow", "0", 40)
    for blob in [*(p.read_bytes() for p in (tmp_path / "state").iterdir()), pickle.dumps(callback),
                 pickle.dumps(optuna_storage(real))]:
        assert b"SECRET" not in blob
    # unpickled by the driver of a --resume, which was given the URL again
    monkeypatch.setattr(redact, "_KNOWN", {})
    monkeypatch.setenv("PDCBDM_OPTUNA_STORAGE", real)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:SECRET@db/mlflow")
    assert pickle.loads(pickle.dumps(callback)).uri == "postgresql://u:SECRET@db/mlflow"
    assert pickle.loads(pickle.dumps(optuna_storage(real))).url == real
    restored = type(searcher)(space=lambda t: None, metric="objective", mode="min", max_steps=1)
    restored.restore_from_dir(str(tmp_path / "state"))
    assert restored._storage.url == real and len(restored._ot_study.trials) >= 1
    monkeypatch.delenv("PDCBDM_OPTUNA_STORAGE")
    with pytest.raises(SearchError, match="PDCBDM_OPTUNA_STORAGE"):
        optuna_storage(redact_url(real))  # a --warm-start from a search.json that keeps it masked


# -- search.json and --resume -----------------------------------------------------------------------------------------
def _record(p) -> None:
    """What the driver writes before its first trial: search.json and Tune's restorable state."""
    from ray import tune as ray_tune

    p.search_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p.search_dir / "search.json", p.meta())
    ray_tune.Tuner(lambda config: None, run_config=ray_tune.RunConfig(name="tune", storage_path=p.storage))


def test_search_json_keeps_urls_masked_and_a_resume_needs_them_again(tmp_path, monkeypatch, capsys):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}?password=SECRET_T"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}?password=SECRET_O"
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "s", "--tracking-uri", tracking_uri,
                         "--optuna-storage", storage]))
    assert (p.uri, p.optuna_storage) == (tracking_uri, storage)  # this process uses the real ones
    _record(p)
    text = (p.search_dir / "search.json").read_text()
    assert "SECRET" not in text
    saved = json.loads(text)
    assert saved["redacted"] == ["optuna_storage", "tracking_uri"]
    assert saved["tracking_uri"] == saved["args"]["tracking_uri"] == redact_url(tracking_uri)
    assert saved["optuna_storage"] == saved["args"]["optuna_storage"] == redact_url(storage)

    folder = str(p.search_dir)
    assert main(["--resume", folder]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri URL or the MLFLOW_TRACKING_URI environment variable" in err and "SECRET" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    assert main(["--resume", folder]) == 2
    err = capsys.readouterr().err
    assert "--optuna-storage URL or the PDCBDM_OPTUNA_STORAGE environment variable" in err and "SECRET" not in err
    with pytest.raises(SearchError, match="is not the Optuna storage"):
        plan(parse_args(["--resume", folder, "--optuna-storage", f"sqlite:///{tmp_path / 'other.db'}?password=x"]))
    resumed = plan(parse_args(["--resume", folder, "--optuna-storage", storage]))
    assert (resumed.uri, resumed.optuna_storage) == (tracking_uri, storage)
    monkeypatch.setenv("PDCBDM_OPTUNA_STORAGE", storage)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    resumed = plan(parse_args(["--resume", folder, "--tracking-uri", tracking_uri]))
    assert (resumed.uri, resumed.optuna_storage) == (tracking_uri, storage)
    assert "SECRET" not in capsys.readouterr().err


def test_a_search_without_secrets_records_none_and_resumes_as_before(tmp_path, capsys, monkeypatch):
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "s"]))
    _record(p)
    saved = json.loads((p.search_dir / "search.json").read_text())
    assert saved["redacted"] == [] and saved["tracking_uri"] == p.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere.example:5000")
    resumed = plan(parse_args(["--resume", str(p.search_dir)]))
    assert resumed.uri == p.uri and resumed.optuna_storage == p.optuna_storage
    assert "not to MLFLOW_TRACKING_URI=http://elsewhere.example:5000" in capsys.readouterr().err


def test_confirm_takes_a_masked_store_of_the_search_from_the_environment(tmp_path, monkeypatch, capsys):
    from pipelines import confirm as cf
    from tests.test_confirm import write_search

    folder = write_search(tmp_path / "s")
    real = f"sqlite:///{tmp_path / 'mlflow.db'}?password=SECRET"
    meta = json.loads((folder / "search.json").read_text())
    (folder / "search.json").write_text(json.dumps({**meta, "tracking_uri": redact_url(real),
                                                    "redacted": ["tracking_uri"]}))
    assert cf.main(["--search", str(folder), "--top", "2"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri URL or the MLFLOW_TRACKING_URI environment variable" in err and "SECRET" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    assert cf.search_store(json.loads((folder / "search.json").read_text()), folder) == real


# -- end to end: a real search on a real MLflow server, then its resume -----------------------------------------------

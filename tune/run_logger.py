"""One trial's MLflow records, written by its rank 0: asynchronous training metrics, records held in order
through a tracking-server outage, system metrics, and the trial's end waiting out the server's patience."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from pdcbdm.config import Config
from pdcbdm.data import PREPARED, prepared_summary
from pdcbdm.training import Trainer
from tune import tracking
from tune.mlflow_model import log_ema_model
from tune.redact import redact_text
from tune.tags import DATA_DIGEST_TAG, DATA_IMAGE_SHAPE_TAG, DATA_NUM_CLASSES_TAG, DATA_NUM_IMAGES_TAG, DATA_RHO_TAG

__all__ = ["RankZeroLogger", "TrackingUnavailable"]


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable for the patience at the trial's end: its records could not be
    written, and the trial fails (the driver reads the run when it ends)."""


class RankZeroLogger:
    """MLflow logging of one trial's run, done by rank 0 only (other ranks get a no-op instance).

    Training metrics go through MLflow's asynchronous queue (``metrics(..., wait=False)``), so that a training step
    never waits on the store; ``flush`` waits for them, which every evaluation does before it reports (the
    driver reads the runs when a trial ends).

    A tracking-server outage does not stop training: a record that cannot be written (``tracking.is_outage``) is
    held, in order, and written at the next record or flush once the server answers again (one line says so when
    the holding starts); the files a held record names are copied into a folder of the logger's own at once, since
    their writer (an evaluation's temporary folder) removes them before the server is back. The final flush of the
    trial waits up to ``patience_s`` (``PDCBDM_TRACKING_PATIENCE_S``, default 300) for the server, then fails the
    trial (``TrackingUnavailable``). MLflow's own retries are cut to a few seconds here
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT`` unless set), so that an outage costs a training step seconds,
    not minutes."""

    def __init__(self, uri: str | None, run_id: str | None, patience_s: float | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._pending: list[tuple[Any, dict[str, Any], int]] = []
        self._held: list[tuple[Callable[..., Any], tuple]] = []
        self._held_files: Path | None = None  # copies of the files held records name, removed once written
        self._monitor: Any = None
        self._said = False  # the outage line is printed once per outage
        self.patience_s = float(os.environ.get("PDCBDM_TRACKING_PATIENCE_S", 300) if patience_s is None
                                else patience_s)
        if self.active:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    @property
    def active(self) -> bool:
        return bool(self.uri and self.run_id)

    @property
    def held(self) -> int:
        """Records waiting for the tracking server."""
        return len(self._held)

    def _record(self, fn: Callable[..., Any], *args: Any) -> None:
        """Write one record now, or hold it (after the ones already held) while the server is unreachable."""
        if self.active:
            entry = (fn, args)
            self._held.append(entry)
            self._drain(0.0)
            if self._held and self._held[-1] is entry:
                self._held[-1] = (fn, tuple(self._keep(a) for a in args))

    def _keep(self, value: Any) -> Any:
        """``value`` with every path it names (a Path, or a list of them) copied into the held files' folder."""
        if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            return [self._keep(v) for v in value]
        if not isinstance(value, Path) or not value.exists():
            return value
        if self._held_files is None:
            self._held_files = Path(tempfile.mkdtemp(prefix="pdcbdm-held-"))
        target = self._held_files / str(len(list(self._held_files.iterdir()))) / value.name
        target.parent.mkdir()
        if value.is_dir():
            shutil.copytree(value, target)
        else:
            shutil.copy2(value, target)
        return target

    def _drain(self, patience_s: float) -> None:
        """Write the held records in order, retrying for up to ``patience_s``; what is left stays held."""
        deadline = time.monotonic() + patience_s
        while self._held:
            fn, args = self._held[0]
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - only an outage is held; anything else is raised
                if not tracking.is_outage(exc):
                    raise
                if time.monotonic() >= deadline:
                    self._say_held(exc)
                    return
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                continue
            self._held.pop(0)
        self._said = False
        if self._held_files is not None:
            shutil.rmtree(self._held_files, ignore_errors=True)
            self._held_files = None

    def _say_held(self, exc: BaseException) -> None:
        if not self._said:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"MLflow is unreachable ({redact_text(first)[:200]}): holding this trial's records and training "
                  f"on; they are written when it answers again", file=sys.stderr, flush=True)
            self._said = True

    def metrics(self, values: dict[str, Any], step: int, wait: bool = True) -> None:
        if not self.active:
            return
        if wait or self._held:  # behind held records: in order, synchronously
            self._record(tracking.log_metrics, self.uri, self.run_id, values, step, True)
        else:
            self._pending += [(op, values, step) for op in
                              tracking.log_metrics(self.uri, self.run_id, values, step, synchronous=False)]

    def flush(self, final: bool = False) -> None:
        """Wait until every asynchronous metric batch is in the store and write the held records; ``final`` (the
        trial's last report) waits up to the patience for the server, then raises ``TrackingUnavailable``."""
        pending, self._pending = self._pending, []
        for op, values, step in pending:
            try:
                op.wait()
            except Exception as exc:  # noqa: BLE001 - an outage: the batch is held and written again
                if not tracking.is_outage(exc):
                    raise
                self._held.append((tracking.log_metrics, (self.uri, self.run_id, values, step, True)))
        self._drain(self.patience_s if final else 0.0)
        if final and self._held:
            raise TrackingUnavailable(f"the MLflow tracking server stayed unreachable for {self.patience_s:g} s at "
                                      f"the trial's end: {len(self._held)} record(s) of run {self.run_id} not written")

    def tags(self, values: dict[str, Any]) -> None:
        self._record(tracking.set_tags, self.uri, self.run_id, values)

    def files(self, paths: list[Path], artifact_path: str | None = None) -> None:
        self._record(tracking.log_artifacts, self.uri, self.run_id, paths, artifact_path)

    def image(self, path: Path, key: str, step: int) -> None:
        self._record(tracking.log_image, self.uri, self.run_id, path, key, step)

    def image_file(self, path: Path, artifact_file: str) -> None:
        self._record(tracking.log_image_file, self.uri, self.run_id, path, artifact_file)

    def table(self, table: pd.DataFrame, artifact_file: str) -> None:
        self._record(tracking.log_table, self.uri, self.run_id, table, artifact_file)

    def json_file(self, data: Any, artifact_file: str) -> None:
        self._record(tracking.log_dict, self.uri, self.run_id, data, artifact_file)

    def model(self, trainer: Trainer) -> None:
        """The EMA network as the run's MLflow model (``tune.mlflow_model``)."""
        self._record(log_ema_model, self.uri, self.run_id, trainer.ema.module, trainer.sampling_payload())

    def training_data(self, cfg: Config, data: Any) -> None:
        """The training set as the run's record. A prepared set (data.dataset=parquet): from its _meta.json alone
        (no image is read or hashed), tags ``pdcbdm.data.*`` (training images, classes, rho, digest, image shape),
        with data/summary.json (class names and counts), data/_meta.json and
        data/_report.json as artifacts. A built-in set: the run's dataset input (a digest, no upload)."""
        if self.active and cfg.data.dataset == PREPARED:
            self._prepared_data(cfg.data.root)
        elif self.active:
            source = {"builder": "pdcbdm.data.build_dataset", "dataset": cfg.data.dataset,
                      "imbalance": str(cfg.data.imbalance), "seed": str(cfg.data.seed),
                      "image_size": str(cfg.data.image_size)}
            self._record(tracking.log_training_data, self.uri, self.run_id, data.images.numpy(),
                         data.labels.numpy(), cfg.data.dataset, source)

    def _prepared_data(self, root: str) -> None:
        summary = prepared_summary(root)
        self.tags({DATA_NUM_IMAGES_TAG: summary["num_images"], DATA_NUM_CLASSES_TAG: summary["num_classes"],
                   DATA_RHO_TAG: summary["rho"], DATA_DIGEST_TAG: summary["digest"],
                   DATA_IMAGE_SHAPE_TAG: "x".join(map(str, summary["image_shape"]))})
        self.json_file(summary, "data/summary.json")
        self.files([p for p in (Path(root) / "_meta.json", Path(root) / "_report.json") if p.is_file()], "data")

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        """CPU, memory, disk, network (and GPU) use of this node: one point now, then a thread's every
        ``interval_s`` (MLflow's monitor logs its first after one interval: a trial ASHA stops sooner, its worker
        ended by Ray, would have none)."""
        if self.active and self._monitor is None:
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri,
                                                 resume_logging=True)
            try:
                self._monitor.collect_metrics()
                self._monitor.publish_metrics(self._monitor.aggregate_metrics())
                self._monitor.mlflow_logger.flush()
            except Exception:  # noqa: BLE001 - the store may be out; the thread's points follow
                pass
            self._monitor.start()

    def close(self) -> None:
        """Stop the system-metrics thread (publishing the samples it took since its last point: MLflow's monitor
        drops them, and a trial shorter than its interval would have none) and wait for the asynchronous metrics."""
        if self._monitor is not None:
            try:
                last = self._monitor.aggregate_metrics()
                if not last:  # stopped before the thread's first sample
                    self._monitor.collect_metrics()
                    last = self._monitor.aggregate_metrics()
                if last:
                    self._monitor.publish_metrics(last)
            except Exception:  # noqa: BLE001 - a last system sample is not worth failing a finished trial for
                pass
            self._monitor.finish()
            self._monitor = None
        self.flush()

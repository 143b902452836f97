"""MLflow tracking: one MLflow run per pipeline run, shared by its stages.

The server comes from MLFLOW_TRACKING_URI (set by `sftpipe run` locally, by a ConfigMap or
Secret on a cluster). Each stage finds the MLflow run tagged with the pipeline's run id, or
creates it, and logs into it, so a pipeline run reads as one MLflow run: params of every stage,
step metrics of finetune, evaluation metrics and the reports.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from sftpipe.errors import SftpipeError

PIPELINE_RUN_TAG = "sftpipe.pipeline_run_id"
# The key of the pipeline run's MLflow run. clean and tokenize take it from the environment, not
# as an input, so that their cache keys stay the same from run to run: on a cluster the pod's
# `pipeline/runid` label is mapped to it, `sftpipe run` sets it for every step.
RUN_ID_ENV = "SFTPIPE_PIPELINE_RUN_ID"


class Tracker:
    """Logs to the MLflow run of a pipeline run."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, timestamp_ms: int | None = None
    ) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, uri: str, digest: str, context: str) -> None:
        """Record a dataset as an input of the run, with its digest and where it lives."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        try:
            source = resolve_dataset_source(uri)
        except Exception:  # a scheme MLflow has no source type for (minio://, gs://...)
            source = HTTPDatasetSource(uri)
        dataset = MetaDataset(source, name=name, digest=digest[:36] or None)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.log_input(dataset, context=context)

    @contextlib.contextmanager
    def system_metrics(self) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU) utilization sampled into the run meanwhile."""
        import mlflow

        with mlflow.start_run(run_id=self.run_id, log_system_metrics=True):
            yield


class BufferedTracker:
    """A Tracker for a training loop that MLflow cannot stop: `log_params` and `log_metrics`
    queue the call and return; a background thread sends the calls in order. When MLflow fails
    (down, restarting, timing out after its own HTTP retries), the thread keeps every call,
    prints one warning line and retries with backoff until MLflow answers, so a GPU job never
    dies or stalls on its tracking server. `close` waits (bounded) for the queue to drain."""

    def __init__(self, tracker: Tracker, retry_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.tracker, self.run_id = tracker, getattr(tracker, "run_id", "")
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self._pending: deque[Callable[[], None]] = deque()
        self._changed = threading.Condition()
        self._retry_now = threading.Event()
        self._closing = False
        self._failures = 0  # failed attempts of the current outage
        self._thread = threading.Thread(target=self._send_all, name="mlflow-sender", daemon=True)
        self._thread.start()

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(partial(self.tracker.log_params, dict(params)))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Stamped now: metrics sent after an outage keep the time they were measured at.
        now = int(time.time() * 1000)
        self._put(partial(self.tracker.log_metrics, dict(metrics), step, now))

    def _put(self, call: Callable[[], None]) -> None:
        with self._changed:
            self._pending.append(call)
            self._changed.notify_all()

    def _send_all(self) -> None:
        delay = self.retry_s
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                call = self._pending[0]
            try:
                call()
            except Exception as exc:  # MlflowException, requests and OS errors alike
                if _refused(exc):  # retrying cannot help: drop the call, say so, go on
                    print(f"[mlflow] WARNING: MLflow refused a call ({exc}); skipped", flush=True)
                    with self._changed:
                        self._pending.popleft()
                        self._changed.notify_all()
                    continue
                self._failed(exc)
                if self._retry_now.wait(delay):
                    self._retry_now.clear()
                delay = min(2 * delay, self.retry_max_s)
                continue
            delay = self.retry_s
            with self._changed:
                self._pending.popleft()
                self._changed.notify_all()
                waiting = len(self._pending)
            if self._failures:
                print(
                    f"[mlflow] reachable again after {self._failures} failed attempts; "
                    f"sending the {waiting + 1} buffered calls",
                    flush=True,
                )
                self._failures = 0

    def _failed(self, exc: Exception) -> None:
        if not self._failures:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(
                f"[mlflow] WARNING: logging to run {self.run_id} failed ({reason[:200]}); "
                "training goes on, metrics are kept and sent when MLflow answers",
                flush=True,
            )
        self._failures += 1

    def close(self, timeout_s: float = 60.0) -> int:
        """Send what is queued, waiting up to `timeout_s`; returns how many calls were not
        sent (0: all arrived)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._retry_now.set()  # one immediate retry instead of the rest of a backoff
        with self._changed:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            unsent = len(self._pending)
        if unsent:
            print(
                f"[mlflow] WARNING: {unsent} tracking calls to run {self.run_id} were not sent "
                f"(MLflow unreachable for {timeout_s:.0f} s at the end); the training history "
                "is in the model's sftpipe_training.json",
                flush=True,
            )
        return unsent


def _refused(exc: Exception) -> bool:
    """Whether MLflow answered and rejected the request (HTTP 4xx other than 429), as opposed
    to not answering (connection refused, timeouts, 5xx), which is worth retrying."""
    status = getattr(exc, "get_http_status_code", None)
    code = status() if callable(status) else 500
    return 400 <= code < 500 and code != 429


def open_run(experiment: str, pipeline_run_id: str, run_name: str = "") -> Tracker:
    """The MLflow run of this pipeline run (created on first use)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SftpipeError(
            "MLFLOW_TRACKING_URI",
            "not set",
            "point it at the MLflow server, e.g. http://mlflow:5000",
        )
    client = MlflowClient()
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        runs = client.search_runs(
            [experiment_id], f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", max_results=1
        )
        if runs:
            return Tracker(client, runs[0].info.run_id, experiment_id)
        run = client.create_run(
            experiment_id, run_name=run_name or None, tags={PIPELINE_RUN_TAG: pipeline_run_id}
        )
    except Exception as exc:  # MLflow raises MlflowException, requests and OS errors alike
        raise SftpipeError(
            uri,
            f"MLflow is unreachable or refused the request ({exc})",
            "check MLFLOW_TRACKING_URI and that the server is up",
        ) from None
    return Tracker(client, run.info.run_id, experiment_id)


def model_version_url(name: str, version: str) -> str:
    """Where a person browses a model version: the server's UI, or how to start one."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    page = f"#/models/{name}/versions/{version}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}` then http://127.0.0.1:5000/{page}"

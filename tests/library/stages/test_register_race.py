"""Two register steps at once for the same model (issue #17.1): the champion decision is
serialized, so exactly one champion remains, the best of {old, A, B} under the gate.

Real servers: PostgreSQL, an MLflow server on it with two worker processes (so the two steps'
requests meet in the database, as in the cluster), SeaweedFS behind the artifacts. The two
steps run in two threads of this process, each with its own MLflow run; only the MLflow server
is shared between them, as between two pods.

The race is forced, not hoped for: whichever step re-scores the champion first waits inside
its re-scoring until the other step is contending, i.e. is either waiting for the champion
lock or re-scoring too (which is what happened before the lock: both read the old champion,
both took champion, the last alias write won). Events, not sleeps, order the two.

SFTPIPE_RACE_REPEATS=20 repeats it (each repetition registers a new model).
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from fixtures.postgres import mlflow_on_postgres, postgres_cluster
from fixtures.servers import _FOREIGN_ENV

from sftpipe.config import EvalConfig, RegisterConfig, TrainConfig
from sftpipe.stages import register
from sftpipe.tasks import chat
from sftpipe.tracking import registry
from sftpipe.tracking.runs import open_run

EVAL = EvalConfig(eval_prompts=0, eval_batch_size=8)
REPEATS = int(os.environ.get("SFTPIPE_RACE_REPEATS", "1"))
CONTENDED_TIMEOUT_S = 300.0  # a step that never contends means the test itself is broken


@pytest.fixture(scope="module")
def pg_mlflow(seaweedfs, tmp_path_factory):
    bucket = seaweedfs.create_bucket("mlflow-pg")
    with (
        postgres_cluster() as pg,
        mlflow_on_postgres(tmp_path_factory.mktemp("mlflow-pg"), pg, seaweedfs, bucket) as server,
    ):
        yield server


@pytest.fixture
def pg_mlflow_env(pg_mlflow, monkeypatch):
    import mlflow

    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in pg_mlflow.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(registry.POLL_ENV, "0.2")
    yield pg_mlflow
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def contenders(tiny_model_dir, tokenized, tmp_path_factory):
    """The old champion (the untrained tiny model), A (trained longer) and B (trained a
    little), with their real validation losses (what register's re-score finds)."""
    from sftpipe.modeling import lm, models
    from sftpipe.stages import finetune

    tmp = tmp_path_factory.mktemp("race")
    folders = {"old": tiny_model_dir}
    for name, steps in (("A", 30), ("B", 4)):
        config = TrainConfig(max_steps=steps, learning_rate=3e-3, eval_every=steps)
        finetune.run(config, str(tiny_model_dir), *tokenized, tmp / name)
        folders[name] = tmp / name
    eval_set = chat.load_eval_set(tokenized[1], 0)
    losses = {}
    for name, folder in folders.items():
        tokenizer = models.load_tokenizer(folder)
        model = models.load_causal_lm(folder)
        device = lm.default_device()
        scores = chat.score(model, tokenizer, eval_set, EVAL, device, None, name, False)
        losses[name] = scores.metrics["validation_loss"]
    assert losses["A"] < losses["B"] < losses["old"], losses  # a race with a known winner
    return folders, losses


def claimed(loss: float, base: float) -> dict[str, float]:
    """Evaluation metrics as evaluate reports them (what the gate reads)."""
    return {"base_validation_loss": base, "tuned_validation_loss": loss}


def register_as(name, folder, validation, metrics, run_id):
    tracker = open_run("register-race", run_id)
    lineage = {"sftpipe.pipeline_run_id": run_id}
    config = RegisterConfig(model_name=name, gate_guards="none")
    return register.run(config, EVAL, folder, validation, metrics, lineage, tracker)


class Contention:
    """Who is contending for the champion decision: re-scoring it, or waiting for the lock."""

    def __init__(self) -> None:
        self.state = threading.Condition()
        self.contending: set[str] = set()
        self.done: set[str] = set()

    def mark(self, what: set[str]) -> None:
        with self.state:
            what.add(threading.current_thread().name)
            self.state.notify_all()

    def wait_for_other(self) -> None:
        me = threading.current_thread().name
        with self.state:
            arrived = self.state.wait_for(
                lambda: (self.contending | self.done) - {me}, CONTENDED_TIMEOUT_S
            )
        assert arrived, f"{me}: the other register step never contended"


@pytest.mark.parametrize("repetition", range(REPEATS))
def test_concurrent_registers_leave_one_champion_the_best(
    repetition, contenders, tokenized, pg_mlflow_env, monkeypatch
):
    import mlflow

    folders, losses = contenders
    validation = tokenized[1]
    name = f"race-{repetition}-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient()
    old = register_as(
        name, folders["old"], validation, claimed(losses["old"], losses["old"] + 1), "run-old"
    )
    assert old.champion and old.version == "1"

    contention = Contention()
    original_rescore = chat.ChatTask.rescore
    original_waiting = registry.ChampionLock.waiting

    def slow_rescore(self, *args, **kwargs):
        contention.mark(contention.contending)
        contention.wait_for_other()
        return original_rescore(self, *args, **kwargs)

    def observed_waiting(self, holder):
        contention.mark(contention.contending)
        original_waiting(self, holder)

    monkeypatch.setattr(chat.ChatTask, "rescore", slow_rescore)
    monkeypatch.setattr(registry.ChampionLock, "waiting", observed_waiting)
    # Two pods load their models in two processes; two threads of one process must not load
    # at once (transformers' loading contexts are process-wide: "Cannot copy out of meta
    # tensor"). Logging the model comes before the champion decision, so this changes nothing
    # of the race under test.
    loading = threading.Lock()
    original_log_model = register._log_model

    def log_model_alone(*args, **kwargs):
        with loading:
            return original_log_model(*args, **kwargs)

    monkeypatch.setattr(register, "_log_model", log_model_alone)

    results, errors = {}, {}

    def step(who: str) -> None:
        try:
            metrics = claimed(losses[who], losses["old"])
            results[who] = register_as(name, folders[who], validation, metrics, f"run-{who}")
        except BaseException as exc:  # reported below, with the other step's outcome
            errors[who] = exc
        finally:
            contention.mark(contention.done)

    threads = [threading.Thread(target=step, args=(who,), name=who) for who in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    # Both versions exist, exactly once each.
    versions = client.search_model_versions(f"name='{name}'")
    runs = sorted(v.tags["sftpipe.pipeline_run_id"] for v in versions)
    assert runs == ["run-A", "run-B", "run-old"]
    version_of = {v.tags["sftpipe.pipeline_run_id"].removeprefix("run-"): v for v in versions}
    assert {results[w].version for w in ("A", "B")} == {
        version_of["A"].version,
        version_of["B"].version,
    }

    # Exactly one champion, the best under the gate (lowest validation loss: A).
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    assert champion.version == version_of["A"].version

    # Every version's champion tag agrees with the registry.
    for who, version in version_of.items():
        tag = client.get_model_version(name, version.version).tags[register.CHAMPION_TAG]
        holds = tag.startswith(register.HOLDS_CHAMPION)
        assert holds == (version.version == champion.version), (who, tag)

    # The lock is gone, and `sftpipe models` would not list it anyway.
    assert not client.search_registered_models(f"name='{name}.sftpipe-champion-lock'")

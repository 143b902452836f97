import io
import shutil
import uuid

import pytest
from fixtures.data import tokenize_chats

from sftpipe.apps import cli
from sftpipe.config import EvalConfig, RegisterConfig
from sftpipe.errors import SftpipeError
from sftpipe.stages import register
from sftpipe.tracking import registry
from sftpipe.tracking.runs import open_run

EVAL = EvalConfig(eval_prompts=3, max_new_tokens=4, eval_batch_size=4)


def scores(tuned_loss, base_loss=7.0, tuned_eos=0.5, base_eos=0.5):
    """Evaluation metrics as evaluate reports them (only what the gate and tags need)."""
    return {
        "base_validation_loss": base_loss,
        "tuned_validation_loss": tuned_loss,
        "base_perplexity": 2.0**base_loss,
        "tuned_perplexity": 2.0**tuned_loss,
        "base_eos_rate": base_eos,
        "tuned_eos_rate": tuned_eos,
        "base_chrf": 10.0,
        "tuned_chrf": 20.0,
    }


@pytest.fixture(scope="module")
def validation(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("register")
    exchanges = [(f"What is {i} plus {i}?", f"{2 * i}.") for i in range(20)]
    return tokenize_chats(tiny_model_dir, tmp, exchanges, max_length=32, validation_fraction=0.3)[1]


def registered(name, model_dir, validation, metrics, run_id=None, **config):
    run_id = run_id or f"run-{uuid.uuid4().hex}"
    tracker = open_run("register-tests", run_id)
    lineage = {"sftpipe.pipeline_run_id": run_id, "sftpipe.data.cleaned_digest": "d1g3st"}
    result = register.run(
        RegisterConfig(model_name=name, **config),
        EVAL,
        model_dir,
        validation,
        metrics,
        lineage,
        tracker,
    )
    return result, tracker


def test_gate_refuses_a_model_that_is_not_better(tiny_model_dir, validation, mlflow_env):
    name = f"refused-{uuid.uuid4().hex[:8]}"
    result, tracker = registered(name, tiny_model_dir, validation, scores(6.5), min_improvement=0.6)
    assert not result.registered
    assert "validation_loss 7 -> 6.5: improvement 0.5 <= margin 0.6" in result.reason
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags[register.GATE_TAG].startswith("rejected (tuned vs base): ")
    assert tracker.client.search_model_versions(f"name='{name}'") == []

    # A guard regression refuses a model with a better loss: it stopped ending its answers.
    result, _ = registered(name, tiny_model_dir, validation, scores(5.0, tuned_eos=0.2))
    assert not result.registered and "eos_rate 0.5 -> 0.2: regressed by 0.3" in result.reason


def test_register_champion_challenger_and_retry(tiny_model_dir, validation, mlflow_env, capsys):
    import mlflow

    name = f"chat-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient()

    # v1: the first passing model becomes champion as well as challenger.
    first, tracker = registered(name, tiny_model_dir, validation, scores(2.5), run_id="run-1")
    assert first.registered and first.model_uri == f"models:/{name}/1"
    assert first.champion and first.champion_reason.startswith("first champion")
    version = client.get_model_version(name, "1")
    assert set(version.aliases) == {"challenger", "champion"}
    assert version.run_id == tracker.run_id
    assert version.tags["sftpipe.pipeline_run_id"] == "run-1"
    assert version.tags["sftpipe.data.cleaned_digest"] == "d1g3st"
    assert float(version.tags["tuned_validation_loss"]) == 2.5
    assert version.tags[register.GATE_TAG].startswith("passed (tuned vs base)")
    assert "| validation_loss | 7 | 2.5 |" in version.description

    # The artifacts went to the S3 bucket behind the server, and the chat model answers.
    keys = [
        o["Key"]
        for o in mlflow_env.s3.client()
        .list_objects_v2(Bucket=mlflow_env.bucket)
        .get("Contents", [])
    ]
    assert any(k.endswith("model.safetensors") for k in keys)
    model = mlflow.pyfunc.load_model(first.model_uri)
    (reply,) = model.predict({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
    assert reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str)

    # Retrying the step of the same pipeline run reuses v1: no duplicate version.
    again, _ = registered(name, tiny_model_dir, validation, scores(2.5), run_id="run-1")
    assert again.version == "1" and len(client.search_model_versions(f"name='{name}'")) == 1

    # v2 claims a loss of 3.0, worse than the 2.5 on v1's tags; but v1 re-scored on this
    # evaluation set has the untrained tiny model's real loss (~7): v2 takes champion.
    second, _ = registered(name, tiny_model_dir, validation, scores(3.0))
    assert second.version == "2" and second.champion, second.champion_reason
    assert second.champion_reason.startswith("took champion: passed (challenger v2 vs champion v1)")
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    # v3 is worse than v2 re-scored: it becomes the challenger, the champion stays v2.
    third, _ = registered(name, tiny_model_dir, validation, scores(6.9, base_loss=9.0))
    assert third.registered and not third.champion
    assert third.champion_reason.startswith("champion stays v2: rejected")
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version_by_alias(name, "challenger").version == "3"
    assert (
        client.get_model_version(name, "3")
        .tags[register.CHAMPION_TAG]
        .startswith("champion stays v2")
    )

    # `sftpipe models` lists the versions with aliases and metrics.
    capsys.readouterr()
    assert cli.main(["models", name]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["model", "version", "aliases", "created"]
    rows = {line.split()[1]: line for line in listing[1:]}
    assert set(rows) == {"1", "2", "3"}
    assert "champion" in rows["2"] and "challenger" in rows["3"] and " 6.9 " in rows["3"]

    # `sftpipe chat` on the champion, scripted through stdin.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "sys.stdin", io.StringIO("Hello\n/reset\nWhat is 2 plus 2?\n/exit\nnot read\n")
        )
        code = cli.main(["chat", "--model", f"models:/{name}@champion", "--max-new-tokens", "3"])
    assert code == 0
    assert (
        f"[chat] downloading models:/{name}@champion (models:/{name}/2)" in capsys.readouterr().err
    )


def test_refusals_and_faults_are_one_line_errors(tiny_model_dir, validation, mlflow_env, tmp_path):
    # A model name MLflow refuses fails before anything is uploaded.
    with pytest.raises(SftpipeError, match="MLflow refused to create registered model 'bad/name'"):
        registered("bad/name", tiny_model_dir, validation, scores(2.5))
    # A model folder without its tokenizer.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for file in bare.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(SftpipeError, match="no tokenizer files"):
        registered(f"m-{uuid.uuid4().hex[:8]}", bare, validation, scores(2.5))
    # An alias that does not exist, and one MLflow refuses.
    client = __import__("mlflow").MlflowClient()
    with pytest.raises(SftpipeError, match="has no version with alias 'nope'"):
        registry.resolve(client, "models:/whatever@nope")
    with pytest.raises(SftpipeError, match="not a registered model URI"):
        registry.ModelRef.parse("models:/just-a-name")


def test_unreachable_mlflow_is_retried_then_one_clear_error(monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv(registry.ATTEMPTS_ENV, "3")
    monkeypatch.setenv(registry.DELAY_ENV, "0.01")
    with pytest.raises(SftpipeError, match="could not look up m@champion after 3 attempts") as err:
        registry.version_by_alias(MlflowClient(), "m", "champion")
    assert "\n" not in str(err.value)
    assert capsys.readouterr().out.count("retrying in") == 2
    with pytest.raises(SftpipeError, match="MLflow is unreachable"):
        open_run("x", "y")


@pytest.mark.slow
def test_mlflow_models_serve_answers_chat_requests(
    tiny_model_dir, validation, mlflow_env, tmp_path
):
    """`mlflow models serve -m models:/NAME@champion` serves the logged chat model."""
    from fixtures.servers import post_json, scoring_server

    name = f"served-{uuid.uuid4().hex[:8]}"
    result, _ = registered(name, tiny_model_dir, validation, scores(2.5))
    assert result.champion
    with scoring_server(f"models:/{name}@champion", tmp_path / "serve.log") as url:
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5}
        (reply,) = post_json(f"{url}/invocations", body)  # one chat completion per request
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 5
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)


def test_champion_lock_waits_breaks_expired_leases_and_notices_a_lost_one(mlflow_env, monkeypatch):
    """The lease of registry.ChampionLock on the MLflow server: a live lock is waited for (and
    given up on in one line), an expired one is broken, a holder that lost it is told."""
    import time

    import mlflow

    client = mlflow.MlflowClient()
    name = f"locked-{uuid.uuid4().hex[:8]}"
    lock_name = f"{name}.sftpipe-champion-lock"
    monkeypatch.setenv(registry.POLL_ENV, "0.05")
    monkeypatch.setenv(registry.WAIT_ENV, "0.3")

    def held_by(owner, expires):
        client.create_registered_model(
            lock_name,
            tags={
                registry.LOCK_TAG: "champion",
                registry.LOCK_OWNER_TAG: owner,
                registry.LOCK_EXPIRES_TAG: str(expires),
            },
        )

    held_by("run-1 v1", time.time() + 3600)
    with pytest.raises(SftpipeError, match="waited 0.3 s for 'run-1 v1' to decide the champion"):
        registry.ChampionLock(client, name, "run-2 v2").acquire()

    client.delete_registered_model(lock_name)
    held_by("crashed v1", time.time() - 1)  # its holder died: the lease ran out
    with registry.ChampionLock(client, name, "run-3 v3") as lock:
        assert lock.holder().owner == "run-3 v3"
        lock.check()
        # `sftpipe models` does not list the lock.
        assert name not in {r["model"] for r in registry.version_rows(client)}
        client.set_registered_model_tag(lock_name, registry.LOCK_OWNER_TAG, "thief v4")
        with pytest.raises(SftpipeError, match="lost the champion lock to thief v4"):
            lock.check()
    # Not ours any more: released without deleting the thief's lock.
    assert lock.holder().owner == "thief v4"
    client.delete_registered_model(lock_name)
    assert lock.holder() is None

    # A retried step finds the lock its killed first attempt left: it takes it at once.
    held_by("run-5 v5", time.time() + 3600)
    with registry.ChampionLock(client, name, "run-5 v5") as again:
        again.check()
    assert again.holder() is None

"""register for classification: the classifier is logged as a text-classification model whose
pyfunc returns labels and scores, and a champion is re-scored with the classification gate."""

import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from sftpipe import cli
from sftpipe.config import EvalConfig, RegisterConfig, TrainConfig
from sftpipe.stages import finetune, register
from sftpipe.tracking import open_run

EVAL = EvalConfig(eval_batch_size=8)
TEXTS = ["I love this, it is great.", "I hate this, it is awful.", "I 喜欢 this, it is happy."]


def scores(tuned_f1, base_f1=0.4, tuned_recall=0.8, base_recall=0.2):
    return {
        "base_macro_f1": base_f1,
        "tuned_macro_f1": tuned_f1,
        "base_min_class_recall": base_recall,
        "tuned_min_class_recall": tuned_recall,
        "tuned_accuracy": 0.9,
    }


@pytest.fixture(scope="module")
def classifier(encoder, splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "model"
    config = TrainConfig(
        max_steps=40, learning_rate=1e-2, micro_batch_size=16, eval_every=10, precision="fp32"
    )
    finetune.run(config, str(encoder), *splits, out)
    return out


def registered(name, model_dir, validation, metrics):
    run_id = f"run-{uuid.uuid4().hex}"
    tracker = open_run("register-classifier-tests", run_id)
    lineage = {"sftpipe.pipeline_run_id": run_id}
    config = RegisterConfig(model_name=name)
    return register.run(config, EVAL, model_dir, validation, metrics, lineage, tracker)


def test_classifier_registers_predicts_labels_and_keeps_a_better_champion(
    classifier, splits, mlflow_env, capsys
):
    import mlflow

    name = f"sentiment-{uuid.uuid4().hex[:8]}"
    validation = splits[1]
    refused = registered(name, classifier, validation, scores(0.4))
    assert not refused.registered and "macro_f1 0.4 -> 0.4" in refused.reason

    first = registered(name, classifier, validation, scores(0.95))
    assert first.registered and first.champion

    # pyfunc on a DataFrame of texts: one label name and score per text.
    model = mlflow.pyfunc.load_model(first.model_uri)
    predicted = model.predict(pd.DataFrame({"text": TEXTS}))
    assert list(predicted["label"]) == ["positive", "negative", "positive"]
    assert all(0.5 < score <= 1.0 for score in predicted["score"])

    # v2 claims a macro F1 of 0.6; v1 re-scored on this validation set is far better.
    second = registered(name, classifier, validation, scores(0.6))
    assert second.registered and not second.champion
    assert second.champion_reason.startswith("champion stays v1: rejected"), second.champion_reason
    assert "macro_f1 1 -> 0.6" in second.champion_reason

    # `sftpipe chat` on a classifier says so in one line.
    capsys.readouterr()
    assert cli.main(["chat", "--model", f"models:/{name}@champion"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a text classifier, not a chat model" in err


@pytest.mark.slow
def test_mlflow_models_serve_classifies_a_batch_of_texts(classifier, splits, mlflow_env, tmp_path):
    """`mlflow models serve` on the registered classifier answers a batch of texts."""
    from fixtures.servers import ServerProcess, free_port

    name = f"served-cls-{uuid.uuid4().hex[:8]}"
    assert registered(name, classifier, splits[1], scores(0.95)).champion
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion"]
    argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = ServerProcess("mlflow models serve", argv, tmp_path / "serve.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready():
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        start = time.monotonic()
        server.wait_until(ready, 50, "GET /ping returns 200")
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": TEXTS}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        assert time.monotonic() - start < 60
    finally:
        server.stop()
    assert [p["label"] for p in predictions] == ["positive", "negative", "positive"]
    assert all(0.5 < p["score"] <= 1.0 for p in predictions)

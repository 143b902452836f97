"""register for classification: the classifier is logged as a text-classification model whose
pyfunc returns labels and scores, and a champion is re-scored with the classification gate."""

import uuid

import pandas as pd
import pytest

from sftpipe.apps import cli
from sftpipe.config import EvalConfig, RegisterConfig
from sftpipe.stages import register
from sftpipe.tracking.runs import open_run

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


def registered(name, model_dir, validation, metrics):
    run_id = f"run-{uuid.uuid4().hex}"
    tracker = open_run("register-classifier-tests", run_id)
    lineage = {"sftpipe.pipeline_run_id": run_id}
    config = RegisterConfig(model_name=name)
    return register.run(config, EVAL, model_dir, validation, metrics, lineage, tracker)


def test_classifier_registers_predicts_labels_and_keeps_a_better_champion(
    tuned_classifier, splits, mlflow_env, capsys
):
    import mlflow

    name = f"sentiment-{uuid.uuid4().hex[:8]}"
    validation = splits[1]
    refused = registered(name, tuned_classifier, validation, scores(0.4))
    assert not refused.registered and "macro_f1 0.4 -> 0.4" in refused.reason

    first = registered(name, tuned_classifier, validation, scores(0.95))
    assert first.registered and first.champion

    # pyfunc on a DataFrame of texts: one label name and score per text.
    model = mlflow.pyfunc.load_model(first.model_uri)
    predicted = model.predict(pd.DataFrame({"text": TEXTS}))
    assert list(predicted["label"]) == ["positive", "negative", "positive"]
    assert all(0.5 < score <= 1.0 for score in predicted["score"])

    # v2 claims a macro F1 of 0.6; v1 re-scored on this validation set is far better.
    second = registered(name, tuned_classifier, validation, scores(0.6))
    assert second.registered and not second.champion
    assert second.champion_reason.startswith("champion stays v1: rejected"), second.champion_reason
    assert "macro_f1 1 -> 0.6" in second.champion_reason

    # `sftpipe chat` on a classifier says so in one line.
    capsys.readouterr()
    assert cli.main(["chat", "--model", f"models:/{name}@champion"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a text classifier, not a chat model" in err


@pytest.mark.slow
def test_mlflow_models_serve_classifies_a_batch_of_texts(
    tuned_classifier, splits, mlflow_env, tmp_path
):
    """`mlflow models serve` on the registered classifier answers a batch of texts."""
    from fixtures.servers import post_json, scoring_server

    name = f"served-cls-{uuid.uuid4().hex[:8]}"
    assert registered(name, tuned_classifier, splits[1], scores(0.95)).champion
    with scoring_server(f"models:/{name}@champion", tmp_path / "serve.log") as url:
        predictions = post_json(f"{url}/invocations", {"inputs": TEXTS})["predictions"]
    assert [p["label"] for p in predictions] == ["positive", "negative", "positive"]
    assert all(0.5 < p["score"] <= 1.0 for p in predictions)

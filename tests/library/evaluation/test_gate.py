import pytest

from sftpipe.config import RegisterConfig
from sftpipe.errors import SftpipeError
from sftpipe.evaluation import gate
from sftpipe.tasks import chat, classification

BASE = {"validation_loss": 3.0, "chrf": 20.0, "eos_rate": 0.9}


def test_chat_defaults_primary_loss_and_eos_guard():
    spec = RegisterConfig().gate_spec(chat.TASK.default_gate)
    assert spec.primary == "validation_loss" and spec.margin == 0.0
    assert spec.guards == (gate.Guard("eos_rate", 0.05),) and spec.needs_generation
    assert not RegisterConfig(gate_guards="none").gate_spec(chat.TASK.default_gate).needs_generation


def test_primary_margin_follows_the_metric_direction():
    lower = gate.GateSpec("validation_loss", 0.1, ())
    assert gate.decide(lower, BASE, BASE | {"validation_loss": 2.8}).passed
    refused = gate.decide(lower, BASE, BASE | {"validation_loss": 2.95})
    assert not refused.passed
    assert refused.reasons() == ["validation_loss 3 -> 2.95: improvement 0.05 <= margin 0.1"]
    higher = gate.GateSpec("chrf", 1.0, ())
    assert gate.decide(higher, BASE, BASE | {"chrf": 21.5}).passed
    assert not gate.decide(higher, BASE, BASE | {"chrf": 20.5}).passed


def test_guards_allow_a_bounded_regression():
    spec = gate.GateSpec("validation_loss", 0.0, gate.parse_guards("eos_rate:0.05, chrf:2"))
    better = BASE | {"validation_loss": 2.0}
    assert gate.decide(spec, BASE, better | {"eos_rate": 0.86, "chrf": 18.0}).passed
    decision = gate.decide(spec, BASE, better | {"eos_rate": 0.5})
    assert not decision.passed
    assert decision.summary() == (
        "rejected (tuned vs base): eos_rate 0.9 -> 0.5: regressed by 0.4 > allowed 0.05"
    )
    assert decision.metrics() == {"gate_passed": 0.0, "gate_primary_improvement": 1.0}


def test_missing_metric_and_bad_settings_are_clear():
    with pytest.raises(SftpipeError, match="base has no 'chrf' metric.*eval-prompts"):
        gate.decide(gate.GateSpec("chrf", 0, ()), {"validation_loss": 1.0}, BASE)
    for bad, message in (
        ({"gate_metric": "f1"}, "unknown gate metric 'f1'"),
        ({"gate_guards": "eos_rate"}, "not metric:allowed_regression"),
        ({"gate_guards": "eos_rate:-1"}, "must be >= 0"),
        ({"gate_guards": "eos_rate:x"}, "is not a number"),
    ):
        with pytest.raises(SftpipeError, match=message):
            RegisterConfig.from_values(bad)


def test_prefixed():
    metrics = {"base_chrf": 1.0, "tuned_chrf": 2.0, "tuned_eos_rate": 1.0, "gate_passed": 1.0}
    assert gate.prefixed(metrics, "tuned") == {"chrf": 2.0, "eos_rate": 1.0}


def test_task_defaults():
    chat_gate, class_gate = (
        RegisterConfig().gate_spec(task.default_gate) for task in (chat.TASK, classification.TASK)
    )
    assert chat_gate.metrics == ("validation_loss", "eos_rate") and chat_gate.needs_generation
    assert class_gate.metrics == ("macro_f1", "min_class_recall")
    assert not class_gate.needs_generation
    # A classifier that wins on average by giving up its rare class is refused.
    decision = gate.decide(
        class_gate,
        {"macro_f1": 0.50, "min_class_recall": 0.40},
        {"macro_f1": 0.60, "min_class_recall": 0.30},
    )
    assert not decision.passed and "min_class_recall 0.4 -> 0.3" in decision.summary()

import html

import pytest
from fixtures.data import tokenize_chats

from sftpipe.config import EvalConfig, RegisterConfig, TrainConfig
from sftpipe.evaluation.text_metrics import text_metrics
from sftpipe.modeling.generation import generate
from sftpipe.stages import evaluate, finetune
from sftpipe.tasks import chat

GATE = RegisterConfig().gate_spec(chat.TASK.default_gate)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A validation set and a model fine-tuned on its siblings (shared by this module)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    exchanges = [(f"Say {i}", f"{i} <b>{i}</b>") for i in range(30)]
    train, val = tokenize_chats(
        tiny_model_dir, tmp, exchanges, max_length=32, validation_fraction=0.2
    )
    paths = [train, val]
    finetune.run(
        TrainConfig(max_steps=15, learning_rate=3e-3, eval_every=5),
        str(tiny_model_dir),
        paths[0],
        paths[1],
        tmp / "tuned",
    )
    return tmp / "tuned", paths[1]


def test_base_vs_tuned_metrics_gate_and_report(tiny_model_dir, trained, tmp_path):
    tuned, validation = trained
    config = EvalConfig(num_samples=2, eval_prompts=3, max_new_tokens=6, eval_batch_size=2)
    result = evaluate.run(
        config, GATE, str(tiny_model_dir), tuned, validation, tmp_path / "report.html"
    )
    m = result.metrics
    assert m["tuned_validation_loss"] < m["base_validation_loss"]
    assert (
        m["validation_loss_improvement"] == m["base_validation_loss"] - m["tuned_validation_loss"]
    )
    assert m["tuned_perplexity"] < m["base_perplexity"]
    for model in ("base", "tuned"):
        for name in ("rouge_l", "chrf", "bleu"):
            assert 0.0 <= m[f"{model}_{name}"] <= 100.0
        assert 0.0 <= m[f"{model}_eos_rate"] <= 1.0
        assert 0.0 <= m[f"{model}_mean_response_tokens"] <= 6
        assert m[f"{model}_generation_tokens_per_s"] > 0
    assert m["eval_prompts"] == 3 and m["evaluation_seconds"] > 0
    # The gate is decided here: loss improved, and the EOS rate guard is checked.
    assert [c.metric for c in result.decision.checks] == ["validation_loss", "eos_rate"]
    assert m["gate_passed"] == float(result.decision.passed)
    assert len(result.samples) == 3
    for sample in result.samples:
        assert sample.prompt.startswith("Say ") and set(sample.answers) == {"base", "tuned"}
        assert set(sample.ended) == {"base", "tuned"}
    assert set(result.plots) == {"generation_metrics.png", "response_lengths.png"}
    assert all(png.startswith(b"\x89PNG") for png in result.plots.values())
    assert len(result.base_model_digest) == 64

    page = (tmp_path / "report.html").read_text()
    assert "Base vs tuned" in page and "Quality gate" in page
    assert page.count("data:image/png;base64,") == 3  # loss curve and the two plots
    assert "chrF" in page and "EOS rate" in page
    # Model output and data are escaped, never injected as markup.
    assert html.escape(result.samples[0].reference) in page and "<b>" not in page


def test_no_prompts_means_loss_only(tiny_model_dir, trained, tmp_path):
    tuned, validation = trained
    spec = RegisterConfig(gate_guards="none").gate_spec(chat.TASK.default_gate)
    config = EvalConfig(eval_prompts=0, num_samples=0)
    result = evaluate.run(config, spec, str(tiny_model_dir), tuned, validation, tmp_path / "r.html")
    assert "tuned_chrf" not in result.metrics and result.samples == [] and result.plots == {}
    assert result.decision.passed


def test_generation_is_batched_deterministic_and_stops_at_eos(tiny_model_dir):
    from sftpipe.modeling import lm, models

    tokenizer = models.load_tokenizer(tiny_model_dir)
    model = models.load_causal_lm(tiny_model_dir)
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "你好，你是谁？", "a b c d")]
    device = lm.default_device()
    batched = generate(model, tokenizer, prompts, 12, 3, device, None)
    one_by_one = generate(model, tokenizer, prompts, 12, 1, device, None)
    assert [g.text for g in batched.generations] == [g.text for g in one_by_one.generations]
    assert all(g.tokens <= 12 for g in batched.generations)
    # A model whose every answer is the end-of-turn token: all ended, none empty-looking.
    eos = tokenizer.eos_token_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.generation_config, "eos_token_id", eos)
        bias = model.lm_head.weight.detach().clone()
        with __import__("torch").no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[eos] = 1.0
        try:
            stopped = generate(model, tokenizer, prompts, 12, 2, device, None)
        finally:
            with __import__("torch").no_grad():
                model.lm_head.weight.copy_(bias)
    assert [(g.tokens, g.ended) for g in stopped.generations] == [(0, True)] * 3


def test_text_metrics():
    perfect = text_metrics(["the cat sat"], ["the cat sat"])
    assert perfect["rouge_l"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    # Chinese is scored character by character, not as empty text.
    zh = text_metrics(["今天天气很好"], ["今天天气很好。"])
    assert zh["rouge_l"] > 90 and zh["bleu"] > 0
    assert text_metrics([""], ["something"])["rouge_l"] == 0.0


def test_eval_set_follows_another_tokenizer(tiny_model_dir, trained, tmp_path):
    """A champion with another tokenizer is scored on the same conversations, re-tokenized."""
    from fixtures.tiny_model import build_tiny_chat_model, default_corpus

    from sftpipe.modeling import models

    _, validation = trained
    eval_set = chat.load_eval_set(validation, 2)
    same = models.load_tokenizer(tiny_model_dir)
    assert chat.for_tokenizer(eval_set, same) is eval_set
    other_dir = build_tiny_chat_model(tmp_path / "other", corpus=default_corpus()[::3])
    other = models.load_tokenizer(other_dir)
    again = chat.for_tokenizer(eval_set, other)
    assert again.prompts == eval_set.prompts and len(again.rows) == len(eval_set.rows)
    assert [r["input_ids"] for r in again.rows] != [r["input_ids"] for r in eval_set.rows]
    for row in again.rows:
        assert len(row["input_ids"]) == len(row["labels"])
        assert other.decode(row["input_ids"]).startswith("<|im_start|>user\nSay ")

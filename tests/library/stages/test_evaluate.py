import html
import json

from sftpipe.config import EvalConfig, TokenizeConfig, TrainConfig
from sftpipe.stages import evaluate, finetune, tokenize
from sftpipe.stages.clean import conversation_id


def test_base_vs_tuned_report(tiny_model_dir, tmp_path):
    with (tmp_path / "cleaned.jsonl").open("w") as handle:
        for i in range(30):
            messages = [
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i} <b>{i}</b>"},
            ]
            row = {"id": conversation_id(messages), "messages": messages, "source": f"x:{i}"}
            handle.write(json.dumps(row) + "\n")
    paths = [tmp_path / name for name in ("train.parquet", "val.parquet", "q.jsonl")]
    tokenize.run(
        TokenizeConfig(max_length=32, validation_fraction=0.2),
        str(tiny_model_dir),
        tmp_path / "cleaned.jsonl",
        *paths,
    )
    finetune.run(
        TrainConfig(max_steps=15, learning_rate=3e-3, eval_every=5),
        str(tiny_model_dir),
        paths[0],
        paths[1],
        tmp_path / "tuned",
    )

    config = EvalConfig(num_samples=3, max_new_tokens=6, eval_batch_size=2)
    result = evaluate.run(
        config, str(tiny_model_dir), tmp_path / "tuned", paths[1], tmp_path / "report.html"
    )
    m = result.metrics
    assert m["tuned_validation_loss"] < m["base_validation_loss"]
    assert (
        m["validation_loss_improvement"] == m["base_validation_loss"] - m["tuned_validation_loss"]
    )
    assert m["tuned_perplexity"] < m["base_perplexity"]
    assert len(result.samples) == 3
    for sample in result.samples:
        assert sample.prompt.startswith("Say ") and set(sample.answers) == {"base", "tuned"}

    page = (tmp_path / "report.html").read_text()
    assert "Base vs tuned" in page and "data:image/png;base64," in page
    # Model output and data are escaped, never injected as markup.
    assert html.escape(result.samples[0].reference) in page and "<b>" not in page

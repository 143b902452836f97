"""evaluate: the base model against the tuned model on the same validation set.

Both models get the token-weighted validation loss (assistant tokens only) and its perplexity,
and answer the first `num_samples` validation prompts with greedy decoding, batched and left-
padded. The result is a metrics dict and an HTML report (metrics, loss curve, answers side by
side).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftpipe import lm, models, report
from sftpipe.config import EvalConfig
from sftpipe.progress import Progress
from sftpipe.stages.finetune import TRAINING_LOG
from sftpipe.stages.tokenize import read_parquet, render


@dataclass
class Sample:
    prompt: str
    reference: str
    answers: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[Sample]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding and the KV cache."""
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    progress = Progress("generate", len(prompts), "prompts")
    for start in range(0, len(prompts), batch_size):
        texts = [
            render(tokenizer, p, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(
            device
        )
        with lm.autocast(device, dtype):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        progress.update(len(answers))
    return [answer.strip() for answer in answers]


def run(
    config: EvalConfig,
    base_model: str,
    tuned_model_dir: str | Path,
    validation_path: str | Path,
    report_path: str | Path,
) -> EvalResult:
    device = lm.default_device()
    dtype = lm.autocast_dtype("auto", device)
    rows = read_parquet(validation_path)
    conversations = [json.loads(row["messages"]) for row in rows[: config.num_samples]]
    samples = [Sample(prompt=c[-2]["content"], reference=c[-1]["content"]) for c in conversations]
    prompts = [c[:-1] for c in conversations]

    metrics: dict[str, float] = {}
    tuned_dir = Path(tuned_model_dir)
    for name, model_dir, uri in (
        ("base", models.fetch(base_model), base_model),
        ("tuned", tuned_dir, str(tuned_dir)),
    ):
        tokenizer = models.load_tokenizer(model_dir, uri)
        model = models.load_causal_lm(model_dir, uri).to(device)
        loss = lm.mean_loss(
            model, rows, tokenizer.pad_token_id, config.eval_batch_size, device, dtype
        )
        metrics[f"{name}_validation_loss"] = loss
        metrics[f"{name}_perplexity"] = lm.perplexity(loss)
        print(
            f"[evaluate] {name}: validation loss {loss:.4f}, perplexity {lm.perplexity(loss):.2f}",
            flush=True,
        )
        if prompts:
            answers = generate(
                model,
                tokenizer,
                prompts,
                config.max_new_tokens,
                config.eval_batch_size,
                device,
                dtype,
            )
            for sample, answer in zip(samples, answers, strict=True):
                sample.answers[name] = answer
        del model

    metrics["validation_loss_improvement"] = (
        metrics["base_validation_loss"] - metrics["tuned_validation_loss"]
    )
    metrics["validation_rows"] = float(len(rows))
    history_file = tuned_dir / TRAINING_LOG
    history = json.loads(history_file.read_text())["history"] if history_file.exists() else []
    report.write_eval_report(report_path, metrics, history, samples)
    return EvalResult(metrics, samples)

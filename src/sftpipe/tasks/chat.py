"""The chat task: supervised fine-tuning of a causal LM on conversations (the assistant turns).

Every model is scored the same way (`score`), in evaluate for base and tuned and in register
for the current champion:

- the token-weighted validation loss over the assistant tokens and its perplexity;
- greedy answers to the first `eval_prompts` validation prompts (batched, left-padded, KV
  cache, a `max_new_tokens` budget), compared with the reference answers: ROUGE-L (F1), chrF
  and BLEU (sacrebleu), all 0-100; the EOS rate (the fraction of answers that end with the
  end-of-turn/EOS token within the budget: a model that never stops has a template or label
  bug) and the mean response length in tokens; generation speed in tokens/s.

Then the quality gate decides (tuned vs base), and an HTML report shows the metrics, the gate
decision, the loss curve, plots of the generation metrics and answers side by side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftpipe.config import EvalConfig, TrainConfig
from sftpipe.data.tokenized import read_parquet, tokenize_conversation
from sftpipe.evaluation import gate, metrics
from sftpipe.evaluation.results import EvalResult, Sample, model_digest, training_history
from sftpipe.progress import format_duration
from sftpipe.tasks.base import MlflowFlavor

INPUT_EXAMPLE_PROMPT = "Hello! What can you do?"


@dataclass(frozen=True)
class EvalSet:
    """What every model is scored on: tokenized rows (loss) and prompts with references."""

    rows: list[dict[str, Any]]
    prompts: list[list[dict[str, str]]]
    references: list[str]


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, float]
    generations: list[Any]  # sftpipe.modeling.generation.Generation


def load_eval_set(validation_path: str | Path, eval_prompts: int) -> EvalSet:
    rows = read_parquet(validation_path)
    conversations = [json.loads(row["messages"]) for row in rows[:eval_prompts]]
    return EvalSet(
        rows=rows,
        prompts=[c[:-1] for c in conversations],
        references=[c[-1]["content"] for c in conversations],
    )


def for_tokenizer(eval_set: EvalSet, tokenizer: Any, checked: int = 16) -> EvalSet:
    """The same evaluation set for a model with another tokenizer: rows re-tokenized from
    their messages (same length budget) when `tokenizer` does not reproduce them."""
    budget = max((len(row["input_ids"]) for row in eval_set.rows), default=1)

    def again(row: dict[str, Any]) -> Any:
        return tokenize_conversation(tokenizer, json.loads(row["messages"]), budget)

    if all(again(row).input_ids == list(row["input_ids"]) for row in eval_set.rows[:checked]):
        return eval_set
    print("[evaluate] another tokenizer: re-tokenizing the evaluation rows", flush=True)
    rows = []
    for row in eval_set.rows:
        tokenized = again(row)
        rows.append(row | {"input_ids": tokenized.input_ids, "labels": tokenized.labels})
    return EvalSet(rows, eval_set.prompts, eval_set.references)


def generation_metrics(run: Any, references: Sequence[str]) -> dict[str, float]:
    """The text metrics of a `GenerationRun`, its EOS rate, length and speed."""
    from sftpipe.evaluation.text_metrics import text_metrics

    gens = run.generations
    return text_metrics([g.text for g in gens], references) | {
        "eos_rate": sum(g.ended for g in gens) / len(gens),
        "mean_response_tokens": sum(g.tokens for g in gens) / len(gens),
        "generation_tokens_per_s": run.tokens / max(run.seconds, 1e-9),
    }


def score(
    model: Any,
    tokenizer: Any,
    eval_set: EvalSet,
    config: EvalConfig,
    device: Any,
    dtype: Any,
    label: str,
    with_generation: bool = True,
) -> Scores:
    """Loss and perplexity, and (with prompts) the generation metrics of one model."""
    from sftpipe.modeling import generation, lm

    model.to(device)
    loss = lm.mean_loss(
        model, eval_set.rows, tokenizer.pad_token_id, config.eval_batch_size, device, dtype
    )
    scores = {"validation_loss": loss, "perplexity": lm.perplexity(loss)}
    generations: list[Any] = []
    if with_generation and eval_set.prompts:
        run = generation.generate(
            model,
            tokenizer,
            eval_set.prompts,
            config.max_new_tokens,
            config.eval_batch_size,
            device,
            generation.generation_dtype(device, dtype),
            label=f"generate {label}",
        )
        scores |= generation_metrics(run, eval_set.references)
        generations = run.generations
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
    print(f"[evaluate] {label}: {shown}", flush=True)
    return Scores(scores, generations)


class ChatTask:
    name = metrics.CHAT
    # Validation loss is the most reliable signal of a chat fine-tune; the EOS rate guard
    # catches models that stopped ending their turns (template or label-mask bugs).
    default_gate = gate.TaskGate(primary="validation_loss", guards="eos_rate:0.05")
    chat_template = True
    token_labels = True
    can_chat = True
    peft_task_type = "CAUSAL_LM"

    def recognizes_tokenized(self, metadata: dict[str, str]) -> bool:
        return True  # the fallback: rows that carry no other task's marks are conversations

    def recognizes_cleaned(self, label: str | None) -> bool:
        return label is None

    def training_batches(self) -> Any:
        from sftpipe.modeling import lm

        return lm

    def check_training(
        self,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
        where: str,
    ) -> None:
        return None  # the labels are token ids: tokenize checked them

    def load_for_training(
        self, config: TrainConfig, model_dir: Path, base_model: str, labels: dict[str, int] | None
    ) -> Any:
        from sftpipe.modeling import models

        model = models.load_causal_lm(model_dir, base_model, quantize_4bit=config.method == "qlora")
        model.config.use_cache = False
        return model

    def loss_module(
        self,
        model: Any,
        config: TrainConfig,
        rows: list[dict[str, Any]],
        labels: dict[str, int] | None,
    ) -> Any:
        from sftpipe.modeling import lm

        return lm.TokenLoss(model)  # per assistant token

    def evaluate(
        self,
        config: EvalConfig,
        spec: gate.GateSpec,
        base_model: str,
        tuned_dir: Path,
        validation_path: Path,
        report_path: Path,
        train_path: Path | None,
    ) -> EvalResult:
        from sftpipe.evaluation import report
        from sftpipe.modeling import lm, models

        start = time.perf_counter()
        device = lm.default_device()
        dtype = lm.autocast_dtype("auto", device)
        eval_set = load_eval_set(validation_path, config.eval_prompts)
        # Both models read the same prompts, rendered by the tokenizer the data was tokenized
        # with.
        tokenizer = models.load_tokenizer(tuned_dir, str(tuned_dir))
        base_dir = models.fetch(base_model)
        base_digest = model_digest(base_dir)

        scores: dict[str, Scores] = {}
        for name, model_dir, uri in (("base", base_dir, base_model), ("tuned", tuned_dir, "")):
            model = models.load_causal_lm(model_dir, uri)
            scores[name] = score(model, tokenizer, eval_set, config, device, dtype, name)
            del model

        base, tuned = scores["base"].metrics, scores["tuned"].metrics
        decision = gate.decide(spec, base, tuned)
        result = {f"base_{k}": v for k, v in base.items()} | {
            f"tuned_{k}": v for k, v in tuned.items()
        }
        result |= {
            "validation_loss_improvement": base["validation_loss"] - tuned["validation_loss"],
            "validation_rows": float(len(eval_set.rows)),
            "eval_prompts": float(len(eval_set.prompts)),
            **decision.metrics(),
        }
        samples = [
            Sample(prompt=p[-1]["content"], reference=ref)
            for p, ref in zip(eval_set.prompts, eval_set.references, strict=True)
        ]
        for name, scored in scores.items():
            for sample, answer in zip(samples, scored.generations, strict=True):
                sample.answers[name] = answer.text
                sample.ended[name] = answer.ended
                sample.tokens[name] = answer.tokens
        result["evaluation_seconds"] = time.perf_counter() - start

        history = training_history(tuned_dir)
        plots = report.evaluation_plots(result, samples, config.max_new_tokens)
        report.write_eval_report(
            report_path,
            result,
            decision,
            spec,
            history,
            samples[: config.num_samples],
            plots,
            config.max_new_tokens,
        )
        print(
            f"[evaluate] gate {decision.summary()} | evaluated in "
            f"{format_duration(result['evaluation_seconds'])}",
            flush=True,
        )
        return EvalResult(result, samples, decision, base_digest, plots)

    def rescore(
        self,
        folder: Path,
        uri: str,
        label: str,
        config: EvalConfig,
        validation_path: Path,
        with_generation: bool,
    ) -> dict[str, float] | None:
        from sftpipe.modeling import lm, models

        device = lm.default_device()
        dtype = lm.autocast_dtype("auto", device)
        tokenizer = models.load_tokenizer(folder, uri, chat=True)
        model = models.load_causal_lm(folder, uri)
        eval_set = for_tokenizer(load_eval_set(validation_path, config.eval_prompts), tokenizer)
        return score(
            model, tokenizer, eval_set, config, device, dtype, label, with_generation
        ).metrics

    def mlflow_flavor(self, max_new_tokens: int) -> MlflowFlavor:
        return MlflowFlavor(
            "text-generation",
            {
                "task": "llm/v1/chat",
                "model_config": {"max_new_tokens": max_new_tokens, "do_sample": False},
                "input_example": {
                    "messages": [{"role": "user", "content": INPUT_EXAMPLE_PROMPT}],
                    "max_tokens": max_new_tokens,
                },
            },
        )


TASK = ChatTask()

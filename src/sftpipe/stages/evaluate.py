"""evaluate: the base model against the tuned model on the same validation set (chat data here;
classification in `evaluate_classifier`).

Every model is scored the same way (`score`), here for base and tuned and in register for the
current champion:

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

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftpipe.config import EvalConfig
from sftpipe.data.chat_templates import render
from sftpipe.data.tokenized import read_parquet, tokenize_conversation
from sftpipe.evaluation import gate, report
from sftpipe.modeling import classify, lm, models
from sftpipe.progress import Progress, format_duration
from sftpipe.stages.finetune import TRAINING_LOG

PROGRESS_EVERY_S = 5.0  # generation progress lines at most this often (and at the end)


@dataclass(frozen=True)
class Generation:
    """One greedy answer: its text, its length in tokens (EOS excluded) and whether it ended
    with an end-of-turn/EOS token within the budget."""

    text: str
    tokens: int
    ended: bool


@dataclass(frozen=True)
class GenerationRun:
    generations: list[Generation]
    seconds: float

    @property
    def tokens(self) -> int:
        """Generated tokens, EOS included (what the model computed)."""
        return sum(g.tokens + g.ended for g in self.generations)


@dataclass
class Sample:
    prompt: str
    reference: str
    answers: dict[str, str] = field(default_factory=dict)
    ended: dict[str, bool] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSet:
    """What every model is scored on: tokenized rows (loss) and prompts with references."""

    rows: list[dict[str, Any]]
    prompts: list[list[dict[str, str]]]
    references: list[str]


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, float]
    generations: list[Generation]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[Sample]
    decision: gate.Decision
    base_model_digest: str
    plots: dict[str, bytes]
    confusion: report.Confusion | None = None  # classification only


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


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generation_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """Autocast for generation on GPUs only. On CPUs fp32 decodes as fast as bf16 autocast in
    batches (SmolLM2-135M, batch 8: 95 vs 106 tokens/s), 2.3x faster one prompt at a time
    (autocast re-casts every weight at every step), and gives the same greedy answers batched
    or not (bf16: half of them differ)."""
    return dtype if device.type == "cuda" else None


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    label: str = "generate",
) -> GenerationRun:
    """Greedy answers to chat prompts: deterministic, batched (prompts of similar length
    together, left padding) with the KV cache, at most `max_new_tokens` each."""
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt keeps its latest turns
    stop_ids = eos_token_ids(model, tokenizer)
    context = context_length(model)
    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    results: dict[int, Generation] = {}
    progress = Progress(label, len(texts), "prompts")
    start, generated, shown = time.perf_counter(), 0, 0.0
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        encode: dict[str, Any] = {"add_special_tokens": False, "padding": True}
        if context:
            encode |= {"truncation": True, "max_length": max(1, context - max_new_tokens)}
        batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", **encode).to(device)
        with lm.autocast(device, dtype):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        for index, row in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
            end = next((pos for pos, token in enumerate(row) if token in stop_ids), None)
            kept = row if end is None else row[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[index] = Generation(text, len(kept), end is not None)
            generated += len(kept) + (end is not None)
        elapsed = time.perf_counter() - start
        if elapsed - shown >= PROGRESS_EVERY_S or len(results) == len(texts):
            progress.update(len(results), f"{generated / max(elapsed, 1e-9):.1f} tokens/s")
            shown = elapsed
    return GenerationRun([results[i] for i in range(len(texts))], time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Text metrics
# ---------------------------------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORDS = re.compile(rf"[{_CJK}]|[^\W_]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")


class _UnicodeWords:
    """ROUGE tokenizer for any script: lowercased words, CJK characters one by one (the
    default rouge-score tokenizer keeps only [a-z0-9] and scores Chinese as empty)."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-L F1, all on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = list(hypotheses), list(references)
    tokenize = "zh" if any(_HAS_CJK.search(r) for r in refs) else "13a"
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]
    return {
        "rouge_l": 100.0 * sum(rouge) / max(len(rouge), 1),
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score,
    }


def generation_metrics(run: GenerationRun, references: Sequence[str]) -> dict[str, float]:
    gens = run.generations
    return text_metrics([g.text for g in gens], references) | {
        "eos_rate": sum(g.ended for g in gens) / len(gens),
        "mean_response_tokens": sum(g.tokens for g in gens) / len(gens),
        "generation_tokens_per_s": run.tokens / max(run.seconds, 1e-9),
    }


# ---------------------------------------------------------------------------------------------
# Scoring one model, and the stage
# ---------------------------------------------------------------------------------------------


def score(
    model: Any,
    tokenizer: Any,
    eval_set: EvalSet,
    config: EvalConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    label: str,
    with_generation: bool = True,
) -> Scores:
    """Loss and perplexity, and (with prompts) the generation metrics of one model."""
    model.to(device)
    loss = lm.mean_loss(
        model, eval_set.rows, tokenizer.pad_token_id, config.eval_batch_size, device, dtype
    )
    metrics = {"validation_loss": loss, "perplexity": lm.perplexity(loss)}
    generations: list[Generation] = []
    if with_generation and eval_set.prompts:
        run = generate(
            model,
            tokenizer,
            eval_set.prompts,
            config.max_new_tokens,
            config.eval_batch_size,
            device,
            generation_dtype(device, dtype),
            label=f"generate {label}",
        )
        metrics |= generation_metrics(run, eval_set.references)
        generations = run.generations
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"[evaluate] {label}: {shown}", flush=True)
    return Scores(metrics, generations)


def training_history(model_dir: Path) -> list[dict[str, float]]:
    """The loss history finetune exported next to the model (empty for other models)."""
    path = model_dir / TRAINING_LOG
    return json.loads(path.read_text())["history"] if path.exists() else []


def model_digest(model_dir: Path) -> str:
    """A content digest of a model folder (every file's path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run(
    config: EvalConfig,
    spec: gate.GateSpec,
    base_model: str,
    tuned_model_dir: str | Path,
    validation_path: str | Path,
    report_path: str | Path,
    train_path: str | Path | None = None,
) -> EvalResult:
    """Base vs tuned on the validation set, then the gate; classification data (a label map in
    the Parquet metadata) goes to `evaluate_classifier`, which also trains the TF-IDF baseline
    on `train_path`."""
    if classify.label_map(validation_path) is not None:
        from sftpipe.stages import evaluate_classifier

        return evaluate_classifier.run(
            config, spec, base_model, tuned_model_dir, train_path, validation_path, report_path
        )
    start = time.perf_counter()
    device = lm.default_device()
    dtype = lm.autocast_dtype("auto", device)
    eval_set = load_eval_set(validation_path, config.eval_prompts)
    tuned_dir = Path(tuned_model_dir)
    # Both models read the same prompts, rendered by the tokenizer the data was tokenized with.
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
    metrics = {f"base_{k}": v for k, v in base.items()} | {
        f"tuned_{k}": v for k, v in tuned.items()
    }
    metrics |= {
        "validation_loss_improvement": base["validation_loss"] - tuned["validation_loss"],
        "validation_rows": float(len(eval_set.rows)),
        "eval_prompts": float(len(eval_set.prompts)),
        **decision.metrics(),
    }
    samples = [
        Sample(prompt=p[-1]["content"], reference=ref)
        for p, ref in zip(eval_set.prompts, eval_set.references, strict=True)
    ]
    for name, result in scores.items():
        for sample, generation in zip(samples, result.generations, strict=True):
            sample.answers[name] = generation.text
            sample.ended[name] = generation.ended
            sample.tokens[name] = generation.tokens
    metrics["evaluation_seconds"] = time.perf_counter() - start

    history = training_history(tuned_dir)
    plots = report.evaluation_plots(metrics, samples, config.max_new_tokens)
    report.write_eval_report(
        report_path,
        metrics,
        decision,
        spec,
        history,
        samples[: config.num_samples],
        plots,
        config.max_new_tokens,
    )
    print(
        f"[evaluate] gate {decision.summary()} | evaluated in "
        f"{format_duration(metrics['evaluation_seconds'])}",
        flush=True,
    )
    return EvalResult(metrics, samples, decision, base_digest, plots)

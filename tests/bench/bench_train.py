"""`make bench-train`: sftpipe's finetune against the trainers a user would otherwise pick.

One run, same machine, same data, max_length, batch, learning rate and threads, every tool in
its fastest precision here (bf16 autocast on CUDA, or where the CPU has AVX512_BF16). On a
machine with a GPU every tool trains on it (CUDA is used when visible); the 2048-token GPU
benchmark with its own bundle is bench_gpu.py (docs/gpu.md):

- sftpipe finetune (this repo's training loop on the tokenize stage's output),
- HF Trainer with the stock causal-LM collator (DataCollatorForLanguageModeling),
- TRL SFTTrainer with its defaults, and with packing=True.

Models: (a) a tiny GPT-2 built from config with a locally trained tokenizer, (b) the bundled
SmolLM2-135M-Instruct. Data: chatterbot-corpus exchanges combined into multi-turn
conversations whose length follows a skewed (geometric) distribution.

Each tool runs in its own process (peak RSS is per process) and reports: non-pad tokens/s,
loss-bearing tokens/s, peak memory (RSS on CPU; max_memory_allocated on CUDA), final
training loss, MFU against the measured matmul peak,
and whether end-of-turn tokens carry a loss. Results: a table on stdout and build/bench-train.md.

    python tests/bench/bench_train.py [--models tiny,smollm2] [--steps 30] [--tools ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "bench-train"
# sftpipe_checkpointing: sftpipe with gradient checkpointing, TRL's own default (at TRL's memory).
TOOLS = ("sftpipe", "sftpipe_checkpointing", "hf_trainer", "trl_default", "trl_packing")
MAX_LENGTH, BATCH, LR, SEED = 256, 8, 5e-5, 0


# --- data and models ------------------------------------------------------------------------
def skewed_conversations(count: int) -> list[dict[str, Any]]:
    """Multi-turn chats from chatterbot exchanges; exchanges per chat ~ 1 + Geometric(0.35)."""
    from sftpipe.apps import demo

    rows = [
        json.loads(line)
        for line in demo.prepare_demo_data(BUILD / "cache").read_text().splitlines()
    ]
    pairs = [
        (m[i]["content"], m[i + 1]["content"])
        for r in rows
        for m in [r["messages"][1:]]
        for i in range(0, len(m) - 1, 2)
    ]
    rng = random.Random(SEED)
    conversations = []
    for _ in range(count):
        exchanges = 1
        while exchanges < 12 and rng.random() > 0.35:
            exchanges += 1
        messages = [{"role": "system", "content": demo.SYSTEM_PROMPT}]
        for user, assistant in rng.choices(pairs, k=exchanges):
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        conversations.append({"messages": messages})
    return conversations


def build_model(name: str) -> Path:
    from sftpipe.apps import demo

    if name == "smollm2":
        return demo.prepare_demo_model(BUILD / "cache")
    target = BUILD / "tiny-gpt2"
    if not (target / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from fixtures.tiny_model import build_tiny_chat_model
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        chat = build_tiny_chat_model(BUILD / "tiny-chat")
        tokenizer = AutoTokenizer.from_pretrained(chat)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=512,
            n_embd=256,
            n_layer=4,
            n_head=4,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
        GPT2LMHeadModel(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def prepare(model_dir: Path, conversations: list[dict[str, Any]], tag: str) -> dict[str, Path]:
    """The raw JSONL, and sftpipe's own clean + tokenize outputs for it."""
    from sftpipe.config import DataConfig, TokenizeConfig
    from sftpipe.stages import clean, tokenize

    folder = BUILD / f"data-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.jsonl"
    raw.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    clean.run(DataConfig(data_uri=str(raw), dedupe=False), folder / "clean.jsonl", folder / "q")
    tokenize.run(
        TokenizeConfig(max_length=MAX_LENGTH, validation_fraction=0.05),
        str(model_dir),
        folder / "clean.jsonl",
        folder / "train.parquet",
        folder / "val.parquet",
        folder / "tq",
    )
    return {"raw": raw, "train": folder / "train.parquet", "validation": folder / "val.parquet"}


# --- one tool, in its own process -----------------------------------------------------------
def cuda_used() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize() -> None:
    """Wait for queued CUDA kernels (no-op on CPU), so a wall-clock time covers them."""
    if cuda_used():
        import torch

        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sftpipe(
    model_dir: Path,
    data: dict[str, Path],
    steps: int,
    checkpointing: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    from sftpipe.config import TrainConfig
    from sftpipe.stages import finetune

    defaults = TrainConfig(
        max_steps=steps,
        micro_batch_size=BATCH,
        learning_rate=LR,
        warmup_ratio=0.0,
        eval_every=10**6,
        early_stopping_patience=0,
        seed=SEED,
        log_every=1,
        gradient_checkpointing=checkpointing,
    )
    # Validated, so that a misspelt field fails instead of measuring the defaults.
    config = TrainConfig.model_validate(defaults.model_dump() | (overrides or {}))
    report = finetune.run(
        config, str(model_dir), data["train"], data["validation"], BUILD / "out-sftpipe"
    )
    from sftpipe.data.tokenized import read_parquet
    from sftpipe.modeling.models import load_tokenizer

    eot = load_tokenizer(model_dir).convert_tokens_to_ids("<|im_end|>")
    eot_labels = sum(label == eot for row in read_parquet(data["train"]) for label in row["labels"])
    return {
        "seconds": report.seconds,
        "tokens": report.tokens,
        "loss_tokens": report.loss_tokens,
        "final_loss": report.train_loss,
        "eot_trained": float(eot_labels > 0),
    }


def run_hf(tool: str, model_dir: Path, data: dict[str, Path], steps: int) -> dict[str, float]:
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from sftpipe.modeling import lm

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in data["raw"].read_text().splitlines()]
    counts = {"tokens": 0, "loss_tokens": 0, "eot": 0}
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def counting(collate: Any) -> Any:
        def wrapped(features: list[Any]) -> dict[str, Any]:
            batch = collate(features)
            if "attention_mask" in batch and "position_ids" not in batch:
                counts["tokens"] += int(batch["attention_mask"].sum())
            else:
                counts["tokens"] += int((batch["labels"] != -100).numel())
            supervised = batch["labels"] != -100
            counts["loss_tokens"] += int(supervised.sum())
            counts["eot"] += int((supervised & (batch["input_ids"] == eot)).sum())
            return batch

        return wrapped

    timing: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timing.setdefault("start", time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == state.max_steps:
                synchronize()  # the last step's kernels are part of the run
            timing["end"] = time.perf_counter()

    cuda = torch.cuda.is_available()
    bf16 = cuda or lm.cpu_supports_bf16()
    common = dict(
        output_dir=str(BUILD / f"out-{tool}"),
        max_steps=steps,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        warmup_steps=0,
        logging_steps=1,
        seed=SEED,
        bf16=bf16,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        lr_scheduler_type="cosine",
    )
    if tool == "hf_trainer":
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        dataset = datasets.Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(
                b["text"], truncation=True, max_length=MAX_LENGTH, add_special_tokens=False
            ),
            batched=True,
            remove_columns=["text"],
        )
        collator = counting(DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[Clock()],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=MAX_LENGTH, packing=tool == "trl_packing")
        trainer = SFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(rows),
            callbacks=[Clock()],
        )
        trainer.data_collator = counting(trainer.data_collator)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": timing["end"] - timing["start"],
        "tokens": counts["tokens"],
        "loss_tokens": counts["loss_tokens"],
        "final_loss": losses[-1] if losses else result.training_loss,
        "eot_trained": float(counts["eot"] > 0),
    }


def child(args: argparse.Namespace) -> None:
    from sftpipe.modeling import lm

    model_dir, data = Path(args.model_dir), json.loads(args.data)
    data = {k: Path(v) for k, v in data.items()}
    if args.tool.startswith("sftpipe"):
        overrides = json.loads(args.sftpipe_set)
        checkpointing = args.tool == "sftpipe_checkpointing"
        result = run_sftpipe(model_dir, data, args.steps, checkpointing, overrides)
    else:
        result = run_hf(args.tool, model_dir, data, args.steps)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = sum(
        p.numel()
        for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir)
        ).parameters()
    )
    device = lm.default_device()
    dtype = lm.autocast_dtype("auto", device)
    result |= {
        "params": params,
        "peak_flops": lm.peak_matmul_flops(device, dtype),
        # On a GPU the memory that matters is the GPU's: what the allocator held at its peak.
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda_used() else peak_rss_mb(),
    }
    Path(args.out).write_text(json.dumps(result))


# --- orchestration --------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--steps", type=int, default=0, help="0: 60 for tiny, 20 for smollm2")
    parser.add_argument("--conversations", type=int, default=1200)
    parser.add_argument(
        "--sftpipe-set",
        default="{}",
        help="JSON of TrainConfig fields for the sftpipe tools, e.g. '{\"compile\": true}'",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    BUILD.mkdir(parents=True, exist_ok=True)
    conversations = skewed_conversations(args.conversations)
    lines = [
        "| model | tool | non-pad tok/s | loss tok/s | vs HF Trainer | vs TRL packing | "
        "peak MB | final loss | MFU | end-of-turn trained |",
        "|" + "---|" * 10,
    ]
    for model_name in args.models.split(","):
        model_dir = build_model(model_name)
        data = prepare(model_dir, conversations, model_name)
        steps = args.steps or (60 if model_name == "tiny" else 20)
        results = {}
        for tool in args.tools.split(","):
            out = BUILD / f"{model_name}-{tool}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--tool",
                tool,
                "--model-dir",
                str(model_dir),
                "--data",
                json.dumps({k: str(v) for k, v in data.items()}),
                "--steps",
                str(steps),
                "--sftpipe-set",
                args.sftpipe_set,
                "--out",
                str(out),
            ]
            print(f"[bench] {model_name} / {tool}: {steps} steps", flush=True)
            subprocess.run(cmd, check=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
            results[tool] = json.loads(out.read_text())
        for tool, r in results.items():
            rate = r["tokens"] / r["seconds"]
            mfu = 6 * r["params"] * rate / r["peak_flops"]

            def ratio(other: str, rate: float = rate, results: dict = results) -> str:
                o = results.get(other)
                return f"{rate / (o['tokens'] / o['seconds']):.2f}x" if o else "-"

            lines.append(
                f"| {model_name} | {tool} | {rate:.0f} | {r['loss_tokens'] / r['seconds']:.0f} | "
                f"{ratio('hf_trainer')} | {ratio('trl_packing')} | {r['peak_mb']:.0f} | "
                f"{r['final_loss']:.3f} | {mfu:.1%} | {'yes' if r['eot_trained'] else 'NO'} |"
            )
    table = "\n".join(lines)
    print(table)
    (ROOT / "build" / "bench-train.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

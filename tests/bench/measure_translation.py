"""Base vs tuned chrF / BLEU of the translation demo from its tokenized splits, calling the
finetune and evaluate stages directly (a bounded stand-in for `make run-translation` when the
cores are shared): finetune with the demo preset (optionally fewer steps), then evaluate.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/measure_translation.py TOKENIZE_DIR \
        --max-steps 12 --eval-prompts 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sftpipe.apps import demo, demo_translation, local
from sftpipe.config import EvalConfig, RegisterConfig, TrainConfig
from sftpipe.stages import evaluate, finetune
from sftpipe.tasks.chat import ChatTask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenized", help="tokenize's output folder (train/, validation/)")
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=demo_translation.PRESET["eval_prompts"])
    parser.add_argument("--work", default="/tmp/sftpipe-measure-translation")
    args = parser.parse_args()
    folder, work = Path(args.tokenized), Path(args.work)
    train = next((folder / "train").rglob("*.parquet"), folder / "train")
    validation = next((folder / "validation").rglob("*.parquet"), folder / "validation")
    base = str(demo.prepare_demo_model(local.cache_dir()))
    preset = demo_translation.PRESET | {"max_steps": args.max_steps}
    start = time.perf_counter()
    report = finetune.run(TrainConfig.from_values(preset), base, train, validation, work / "tuned")
    trained = time.perf_counter() - start
    spec = RegisterConfig(gate_metric="chrf").gate_spec(ChatTask.default_gate)
    config = EvalConfig.from_values(preset | {"eval_prompts": args.eval_prompts})
    result = evaluate.run(config, spec, base, work / "tuned", validation, work / "report.html")
    keep = ("chrf", "bleu", "eos_rate", "validation_loss")
    line = {
        "steps": report.steps,
        "train_seconds": round(trained),
        "evaluate_seconds": round(time.perf_counter() - start - trained),
        "gate": result.decision.summary(),
    } | {k: round(v, 3) for k, v in result.metrics.items() if k.split("_", 1)[-1] in keep}
    print(json.dumps(line), flush=True)
    for sample in result.samples[:8]:
        print(
            json.dumps(
                {"prompt": sample.prompt[-12:], "reference": sample.reference} | sample.answers,
                ensure_ascii=False,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

"""finetune: fine-tune the base model on tokenize's output and export the best checkpoint.

Tasks: chat SFT of a causal LM on the assistant tokens (plain or packed rows), and sequence
classification when the data carries a label map.

Supports:
- AdamW (no weight decay on biases and norms), linear warmup then cosine decay to 10% of peak;
- gradient accumulation with the loss normalized by the loss-bearing tokens of the whole
  accumulation window (N micro-batches of 1 give the gradient of one batch of N);
- gradient clipping, a fixed seed and a deterministic data order;
- bf16/fp16 autocast (bf16 on CPUs with AVX512_BF16, where it is ~4x fp32 matmul);
- validation loss every `eval_every` steps, early stopping with patience; the best model (by
  validation loss) is the one exported, with its tokenizer, as a save_pretrained directory;
- LoRA / DoRA adapters (peft), gradient checkpointing;
- checkpoints every `checkpoint_every` steps and on SIGTERM, automatic resume;
- data parallelism under torchrun (DDP; gloo on CPU, NCCL on GPU): a global window of
  micro_batch_size x gradient_accumulation_steps x processes conversations per step, so the
  result matches one process with the same global batch;
- FSDP2 instead of DDP (`distributed_strategy=fsdp`): parameters, gradients and optimizer state
  sharded per transformer block, bf16/fp16 parameter gathering on CUDA, full or LoRA; not with
  qlora or compile;
- `launch`: the same entry point under torchrun with one process per GPU of this machine.

setup -> train -> export, in one readable loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftpipe import storage
from sftpipe.config import TrainConfig
from sftpipe.data.schemas import CHAT_TEMPLATE_KEY
from sftpipe.data.tokenized import read_parquet, schema_metadata
from sftpipe.errors import SftpipeError
from sftpipe.modeling import classify, distributed, dropout_attention, lean_layers, lm, lora, models
from sftpipe.modeling.checkpoint import CheckpointStore
from sftpipe.progress import Progress, format_duration

TRAINING_LOG = "sftpipe_training.json"  # history and summary, saved beside the weights
BEST_FILE = "best.pt"  # the best weights so far (scratch space and checkpoints)


@dataclass
class TrainReport:
    steps: int = 0
    epochs: float = 0.0
    train_loss: float = float("nan")
    best_validation_loss: float = float("inf")
    best_step: int = 0
    stopped_early: bool = False
    tokens: int = 0
    loss_tokens: int = 0
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    seconds: float = 0.0
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        skip = {"history", "precision"}
        return {k: float(v) for k, v in asdict(self).items() if k not in skip}


@dataclass
class EarlyStopping:
    """Tracks the best validation loss; `stop` turns true after `patience` validations in a
    row without improvement (never when patience is 0)."""

    patience: int
    best: float = float("inf")
    best_step: int = 0
    stale: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record a validation loss; returns whether it is a new best."""
        if loss < self.best:
            self.best, self.best_step, self.stale = loss, step, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm weights (1-D tensors) keep their scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def lr_factor(
    step: int, total: int, warmup: int, floor: float = 0.1, shape: str = "cosine"
) -> float:
    """Linear warmup to 1, then cosine (or linear) decay to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    decay = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * decay


def shuffled_windows(
    rows: Sequence[dict[str, Any]], size: int, seed: int
) -> Iterator[list[dict[str, Any]]]:
    """Endless windows of `size` rows (one optimizer step's data), drawn from consecutive epochs
    in seed-determined orders. Every window is full, so every process gets its share."""
    epoch, pending = 0, []
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        pending += torch.randperm(len(rows), generator=generator).tolist()
        while len(pending) >= size:
            yield [rows[i] for i in pending[:size]]
            pending = pending[size:]
        epoch += 1


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` for processes other than the main one."""


class _SigtermFlag:
    """Kubernetes sends SIGTERM before it kills a pod: note it, and let the loop checkpoint and
    stop at the end of the current step."""

    def __init__(self) -> None:
        self.set = False
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        print("[finetune] SIGTERM: stopping after this step", flush=True)
        self.set = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def restore(
    folder: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    best_file: Path,
    main: bool = True,
) -> tuple[int, EarlyStopping, TrainReport]:
    """Load a checkpoint written by `run` (with any strategy and number of processes) into the
    model and optimizer, and its best weights into `best_file` on the main process; returns the
    step, the early-stopping state and the report so far. Every process calls it."""
    weights = torch.load(folder / "model.pt", weights_only=True, mmap=True)
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    distributed.load_state(model, weights, optimizer, trainer["optimizer"])
    if main:
        if (folder / BEST_FILE).exists():
            shutil.copyfile(folder / BEST_FILE, best_file)
        else:  # the checkpoint's own weights were the best
            torch.save(weights, best_file)
    del weights
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    torch.set_rng_state(trainer["rng"])
    state = json.loads((folder / "trainer_state.json").read_text())
    return state["step"], EarlyStopping(**state["early_stopping"]), TrainReport(**state["report"])


def _core(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_model(
    config: TrainConfig,
    model_dir: Path,
    base_model: str,
    labels: dict[str, int] | None,
    device: torch.device,
) -> Any:
    """The model to train (or to export into): the base model for the task on `device`, with
    gradient checkpointing and adapters as configured."""
    if labels is None:
        model = models.load_causal_lm(model_dir, base_model, quantize_4bit=config.method == "qlora")
        model.config.use_cache = False
    else:
        model = classify.load_model(model_dir, labels, base_model)
    model = model.to(device) if config.method != "qlora" else model
    if config.lean_layers:
        lean_layers.apply(model)
        dropout_attention.use(model)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=config.gradient_checkpointing_every
        )
    if config.method in ("lora", "qlora"):
        model = lora.apply(model, config, "CAUSAL_LM" if labels is None else "SEQ_CLS")
    return model


def check_data_fits_model(rows: Sequence[dict[str, Any]], model: Any, where: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    largest = max(max(row["input_ids"]) for row in rows)
    if largest >= vocab:
        raise SftpipeError(
            where,
            f"token id {largest} is outside the model's vocabulary ({vocab})",
            "tokenize with the same base model you fine-tune",
        )


def run(
    config: TrainConfig,
    base_model: str,
    train_path: str | Path,
    validation_path: str | Path,
    output_dir: str | Path,
    tracker: Any = None,
    checkpoint_uri: str = "",
) -> TrainReport:
    """Fine-tune and export the best model to `output_dir`. With `checkpoint_uri`, checkpoint
    every `checkpoint_every` steps and on SIGTERM, and resume from the newest checkpoint there."""
    # --- setup ---------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    world = distributed.init()
    device = distributed.device(world)
    dtype = lm.autocast_dtype(config.precision, device)
    train_rows, validation_rows = read_parquet(train_path), read_parquet(validation_path)
    if not train_rows or not validation_rows:
        raise SftpipeError(
            str(train_path),
            "empty training or validation split",
            "check the tokenize step's metrics",
        )
    labels = classify.label_map(train_path)  # None: chat SFT of a causal LM
    model_dir = models.fetch(base_model)
    # The template tokenize rendered with (an override included) goes out with the model.
    template = schema_metadata(train_path).get(CHAT_TEMPLATE_KEY, "")
    tokenizer = models.load_tokenizer(model_dir, base_model, template, chat=labels is None)
    lora.check_method(config, device)
    fsdp = config.distributed_strategy == "fsdp" and world.size > 1
    if fsdp and (config.method == "qlora" or config.compile):
        raise SftpipeError(
            "distributed_strategy",
            "fsdp is not supported with qlora or compile",
            "use --distributed-strategy ddp, or --method lora without --compile",
        )
    if labels is not None:
        if config.method == "qlora":
            raise SftpipeError("method", "qlora is for causal LMs", "use lora or full to classify")
        classify.check_labels(train_rows + validation_rows, labels, str(train_path))
    # FSDP: load on the CPU; sharding moves each rank's shards to the GPU, so the model never
    # has to fit one GPU whole.
    model = load_model(
        config, model_dir, base_model, labels, torch.device("cpu") if fsdp else device
    )
    if fsdp:
        distributed.shard(_core(model), device, dtype)
    if config.compile:
        # In place, so state_dict keys (checkpoints, export) stay those of the plain model;
        # dynamic shapes, since every micro-batch has its own width.
        _core(model).base_model.compile(dynamic=True)
    check_data_fits_model(train_rows + validation_rows, model, str(train_path))
    if "position_ids" in train_rows[0] and not lm.isolates_packed_samples(model, device):
        raise SftpipeError(
            str(train_path),
            f"{type(model).__name__} lets packed samples attend to each other",
            "tokenize with --no-packing for this model",
        )

    window = config.micro_batch_size * config.gradient_accumulation_steps * world.size
    steps_per_epoch = math.ceil(len(train_rows) / window)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    warmup = int(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        param_groups(distributed.sharded(model) if fsdp else model, config.weight_decay),
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
        # The fused kernel (CPU and CUDA) updates each tensor in one pass: 5.6x faster than
        # foreach on this CPU for SmolLM2-sized weights and no temporaries (0.4 GB less peak).
        # FSDP's sharded DTensor parameters keep the default implementation.
        fused=not fsdp,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, shape=config.lr_schedule)
    )
    # MFU: ~6 FLOPs per parameter per token for a full fine-tune (forward 2, backward 4); ~4
    # with frozen base weights (no weight gradients), against this device's measured peak.
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token = (6 if config.method == "full" else 4) * lm.matmul_parameters(model)
    peak_flops = lm.peak_matmul_flops(device, dtype)
    # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    windows = shuffled_windows(train_rows, window, config.seed)
    pad_id = tokenizer.pad_token_id
    # What differs between the tasks: batching, the loss, validation, and what one unit of
    # loss is (an assistant token for chat SFT, an example for classification).
    task: Any = lm if labels is None else classify
    weights = (
        classify.class_weights(train_rows, len(labels)) if labels and config.class_weights else None
    )
    loss_module: Any = lm.TokenLoss(model) if labels is None else classify.ClassLoss(model, weights)
    loss_module.to(device)
    if world.size > 1 and not fsdp:
        loss_module = torch.nn.parallel.DistributedDataParallel(loss_module)

    report = TrainReport(precision=str(dtype).removeprefix("torch.") if dtype else "fp32")
    tracker = tracker if world.is_main else None
    if tracker:
        tracker.log_params(
            {f"train.{k}": v for k, v in config.model_dump().items()}
            | {
                "train.device": device.type,
                "train.autocast": report.precision,
                "train.total_steps": total_steps,
                "train.train_rows": len(train_rows),
                "train.parameters": parameters,
                "train.peak_matmul_tflops": round(peak_flops / 1e12, 3),
            }
        )

    def validate(step: int) -> float:
        loss = task.mean_loss(
            model, validation_rows, pad_id, config.micro_batch_size, device, dtype, world
        )
        report.history.append({"step": step, "validation_loss": loss})
        if tracker:
            tracker.log_metrics({"validation_loss": loss}, step)
        return loss

    # --- train -----------------------------------------------------------------------------
    log = print if world.is_main else _quiet
    log(
        f"[finetune] {total_steps} steps ({steps_per_epoch}/epoch) on {world.size}x{device.type}, "
        f"autocast {report.precision}, {len(train_rows)} train / {len(validation_rows)} "
        "validation rows",
        flush=True,
    )
    store = CheckpointStore(checkpoint_uri, config.keep_checkpoints) if checkpoint_uri else None
    early_stopping = EarlyStopping(config.early_stopping_patience)
    # The best weights so far live in a file, not in a second copy in memory (for a large model
    # that copy alone would need as much RAM as the model).
    # Removed at the end, and also when the run fails (the object's finalizer): a model-sized
    # file must not pile up in /tmp with every NaN or SIGTERM.
    scratch_dir = tempfile.TemporaryDirectory(prefix="sftpipe-finetune-")
    scratch = Path(scratch_dir.name)
    best_file = scratch / BEST_FILE

    def save_best() -> None:
        full = distributed.model_state(model)  # every process gathers (FSDP)
        if world.is_main:
            torch.save(full, best_file)

    resume_dir = scratch / "resume"
    checkpoint = store.latest(resume_dir) if store else None
    if checkpoint:
        start_step, early_stopping, report = restore(
            checkpoint, model, optimizer, scheduler, scaler, best_file, world.is_main
        )
        for _ in range(start_step):
            next(windows)  # the data position: the order is a function of the seed
        log(f"[finetune] resumed from {checkpoint_uri} at step {start_step}", flush=True)
    else:
        start_step = 0
        early_stopping.update(validate(0), step=0)
        save_best()
    shutil.rmtree(resume_dir, ignore_errors=True)
    sigterm = _SigtermFlag()

    def save_checkpoint(step: int) -> None:
        # Gathered by every process (FSDP), written by the main one.
        full = distributed.model_state(model)
        optimizer_state = distributed.optimizer_state(model, optimizer)

        def write(folder: Path) -> None:
            torch.save(full, folder / "model.pt")
            if early_stopping.best_step != step:
                shutil.copyfile(best_file, folder / BEST_FILE)
            torch.save(
                {
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                folder / "trainer.pt",
            )
            state = {
                "step": step,
                "early_stopping": asdict(early_stopping),
                "report": asdict(report),
            }
            (folder / "trainer_state.json").write_text(json.dumps(state))

        if world.is_main:
            store.save(step, write)  # type: ignore[union-attr]
            print(f"[finetune] checkpoint at step {step} -> {checkpoint_uri}", flush=True)
        world.barrier()

    progress = Progress("finetune", total_steps - start_step, "steps")
    window_seconds, window_tokens = 0.0, 0
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        step_start = time.perf_counter()
        rows_of_step = next(windows)
        # Normalize by the loss-bearing tokens of the whole global window; DDP averages
        # gradients over processes, so scale by their number to keep the sum.
        window_loss_tokens = sum(row.get("num_loss_tokens", 1) for row in rows_of_step)
        step_tokens = sum(row["num_tokens"] for row in rows_of_step)
        micro_batches = list(lm.batches(rows_of_step, config.micro_batch_size))[
            world.rank :: world.size
        ]
        loss_total = 0.0
        for index, rows in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in task.collate(rows, pad_id).items()}
            last = index == len(micro_batches) - 1
            # DDP: all-reduce on the last micro-batch only. FSDP reduce-scatters every one:
            # skipping it would keep whole unsharded gradients, which is what FSDP avoids.
            sync = (
                contextlib.nullcontext()
                if last or world.size == 1 or fsdp
                else loss_module.no_sync()
            )
            with sync, lm.autocast(device, dtype):
                loss = loss_module(batch)
            with sync:
                scaler.scale(loss * world.size / window_loss_tokens).backward()
            loss_total += float(loss.detach())
        loss_value = world.sum(loss_total)[0] / window_loss_tokens
        window_tokens += step_tokens
        report.tokens += step_tokens
        if not math.isfinite(loss_value):
            raise SftpipeError(
                "finetune",
                f"loss is {loss_value} at step {step}",
                "lower --learning-rate or use --precision fp32",
            )
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), config.max_grad_norm or float("inf")
        )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        report.steps, report.train_loss = step, loss_value
        report.loss_tokens += window_loss_tokens
        window_seconds += time.perf_counter() - step_start

        if step % config.log_every == 0 or step == total_steps:
            tokens_per_second = window_tokens / window_seconds
            report.seconds += window_seconds
            metrics = {
                "train_loss": loss_value,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_second": tokens_per_second,
                "mfu": flops_per_token * tokens_per_second / peak_flops,
            }
            report.history.append({"step": step} | metrics)
            if tracker:
                tracker.log_metrics(metrics, step)
            if world.is_main:
                progress.update(
                    step - start_step,
                    f"loss {loss_value:.4f} | lr {metrics['learning_rate']:.2e} | "
                    f"{tokens_per_second:.0f} tok/s | MFU {metrics['mfu']:.1%}",
                )
            window_seconds, window_tokens = 0.0, 0

        if step % config.eval_every == 0 or step == total_steps:
            validation_loss = validate(step)
            if early_stopping.update(validation_loss, step):
                save_best()
            log(
                f"[finetune] step {step}: validation loss {validation_loss:.4f} (best "
                f"{early_stopping.best:.4f} at step {early_stopping.best_step})",
                flush=True,
            )
            if early_stopping.stop:
                report.stopped_early = True
                log(
                    f"[finetune] early stop: no improvement in {early_stopping.stale} validations",
                    flush=True,
                )
                break

        stop_requested = world.any(sigterm.set)
        if store and step < total_steps and (step % config.checkpoint_every == 0 or stop_requested):
            save_checkpoint(step)
        if stop_requested:
            saved = "checkpoint saved" if store else "no checkpoint (no --checkpoint-uri)"
            raise SftpipeError(
                "finetune",
                f"stopped by SIGTERM at step {step}; {saved}",
                "run the step again to resume",
            )
    sigterm.restore()

    report.seconds += window_seconds  # training time only; validation is not counted
    report.best_validation_loss, report.best_step = early_stopping.best, early_stopping.best_step
    report.tokens_per_second = report.tokens / report.seconds if report.seconds else 0.0
    report.mfu = flops_per_token * report.tokens_per_second / peak_flops
    report.epochs = report.steps * window / len(train_rows)
    log(
        f"[finetune] done: {report.steps} steps in {format_duration(progress.elapsed())}, "
        f"{report.tokens_per_second:.0f} tok/s (MFU {report.mfu:.1%}), best validation loss "
        f"{report.best_validation_loss:.4f} (step {report.best_step})",
        flush=True,
    )

    # --- export ----------------------------------------------------------------------------
    # The optimizer state (twice the model) is done with; free it before the best weights
    # are read back, so exporting never needs more memory than training did.
    optimizer.state.clear()
    if world.is_main:
        # An FSDP model is sharded across the processes: export from a plain copy on the CPU.
        final = (
            load_model(config, model_dir, base_model, labels, torch.device("cpu"))
            if fsdp
            else model
        )
        final.load_state_dict(torch.load(best_file, weights_only=True, mmap=True))
        with storage.atomic_dir(output_dir) as tmp:
            lora.save(final, tokenizer, tmp)
            (tmp / TRAINING_LOG).write_text(json.dumps(asdict(report), indent=1))
    scratch_dir.cleanup()
    world.barrier()
    if tracker:
        tracker.log_metrics(
            {
                "best_validation_loss": report.best_validation_loss,
                "train_tokens_per_second": report.tokens_per_second,
            }
        )
    return report


def read_report(output_dir: str | Path) -> TrainReport:
    """The report `run` exported beside the weights."""
    return TrainReport(**json.loads((Path(output_dir) / TRAINING_LOG).read_text()))


def processes_per_node(config: TrainConfig) -> int:
    """Training processes for this machine: `nproc_per_node`, else one per visible GPU."""
    return config.nproc_per_node or max(1, torch.cuda.device_count())


def entry_args(
    config: TrainConfig,
    base_model: str,
    train: str | Path,
    validation: str | Path,
    output: str | Path,
    checkpoint_uri: str = "",
    mlflow_run_id: str = "",
) -> list[str]:
    """The arguments of `python -m sftpipe.stages.finetune` for one training run."""
    args = [
        f"--base-model={base_model}",
        f"--train={train}",
        f"--validation={validation}",
        f"--output={output}",
        f"--config={config.model_dump_json()}",
    ]
    if checkpoint_uri:
        args.append(f"--checkpoint-uri={checkpoint_uri}")
    if mlflow_run_id:
        args.append(f"--mlflow-run-id={mlflow_run_id}")
    return args


def launch(nproc: int, args: list[str]) -> None:
    """Run the entry point with `args` in `nproc` processes on this machine (torchrun: NCCL on
    GPUs, gloo on CPU). Their output streams into ours; SIGTERM is passed on, so they checkpoint
    and stop; a failure is raised as the workers' own one-line error."""
    import subprocess
    import sys

    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc-per-node={nproc}",
        *("-m", "sftpipe.stages.finetune", *args),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread
        previous = None
    error = ""
    try:
        for line in process.stdout or ():
            print(line, end="", flush=True)
            if not error and line.startswith(ERROR_PREFIX):
                error = line.removeprefix(ERROR_PREFIX).strip()
        code = process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        raise SftpipeError(
            f"torchrun ({nproc} processes)", error or f"exited with code {code}", "see the log"
        )


ERROR_PREFIX = "ERROR [finetune] "


def _local_file(uri: str, path: Path) -> Path:
    """`uri` itself, or for s3:// a local copy at `path` (a Trainer job's nodes read the
    Parquet splits from the object store)."""
    if not storage.is_s3(uri):
        return Path(uri)
    with storage.open_binary(uri) as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m sftpipe.stages.finetune`: the training entry point outside KFP (a restarted
    pod, torchrun processes, a Trainer job's nodes, the preemption tests). The data and the
    output may be s3:// URIs (a Trainer job's nodes share no disk with the pipeline)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m sftpipe.stages.finetune")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint-uri", default="")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--mlflow-run-id", default="", help="log into this MLflow run")
    args = parser.parse_args(argv)
    local = Path(tempfile.mkdtemp(prefix="sftpipe-entry-"))
    try:
        config = TrainConfig.from_values(json.loads(args.config), where="--config")
        tracker = None
        if args.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            from sftpipe.tracking.runs import Tracker

            tracker = Tracker(MlflowClient(), args.mlflow_run_id, "")
        output = local / "model" if storage.is_s3(args.output) else Path(args.output)
        run(
            config,
            args.base_model,
            _local_file(args.train, local / "train.parquet"),
            _local_file(args.validation, local / "validation.parquet"),
            output,
            tracker,
            checkpoint_uri=args.checkpoint_uri,
        )
        if output.exists() and output != Path(args.output):  # the main process exported it
            storage.upload_dir(output, args.output)
    except SftpipeError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

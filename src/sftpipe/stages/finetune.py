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
  qlora or compile.
The torchrun launcher and the command-line entry point live in `sftpipe.kfp_glue.finetune_launch`.

It reads top to bottom as three phases around one `Training` object:
    setup(...) -> Training    data, model, optimizer and schedule; resume from a checkpoint
    train(training)           the loop: one optimizer step, log, validate, checkpoint
    export(training, output)  the best weights with the tokenizer and the report
The pieces they use live in sftpipe.modeling: optim (AdamW, schedule, data order),
training_model (load, place, check the model), training_report (report, early stopping) and
training_resume (SIGTERM, restore a checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sftpipe import storage, tasks
from sftpipe.config import TrainConfig
from sftpipe.data import vocabulary
from sftpipe.data.schemas import CHAT_TEMPLATE_KEY
from sftpipe.data.tokenized import read_parquet, schema_metadata
from sftpipe.errors import SftpipeError
from sftpipe.modeling import checkpoint as checkpoints
from sftpipe.modeling import classify, distributed, lm, lora, models
from sftpipe.modeling import device as placement
from sftpipe.modeling.checkpoint import CheckpointStore
from sftpipe.modeling.distributed import World
from sftpipe.modeling.optim import build_optimizer, shuffled_windows
from sftpipe.modeling.peak_flops import Peak, peak
from sftpipe.modeling.training_model import Data, build_model, load_model
from sftpipe.modeling.training_report import (
    BEST_FILE,
    TRAINING_LOG,
    EarlyStopping,
    StepResult,
    Throughput,
    TrainReport,
)
from sftpipe.modeling.training_resume import SigtermFlag, restore
from sftpipe.progress import Progress, format_duration
from sftpipe.tracking.runs import BufferedTracker


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` for processes other than the main one."""


@dataclass
class Training:
    """Everything the loop reads and updates: built by `setup`, advanced by `train`, written
    out by `export`."""

    config: TrainConfig
    world: World
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    fsdp: bool
    data: Data
    model_dir: Path
    base_model: str
    tokenizer: Any
    model: Any
    loss_module: Any  # the task's loss around the model (DDP-wrapped with several processes)
    task: Any  # lm or classify: batching, validation loss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    windows: Iterator[list[dict[str, Any]]]
    window: int  # conversations per optimizer step, over all processes
    steps_per_epoch: int
    total_steps: int
    flops_per_token: float
    peak: Peak  # the denominator of MFU, and where it comes from
    report: TrainReport
    tracker: BufferedTracker | None  # on the main process only
    log: Callable[..., None]
    store: CheckpointStore | None
    checkpoint_uri: str
    scratch: tempfile.TemporaryDirectory
    early_stopping: EarlyStopping
    start_step: int = 0
    sigterm: SigtermFlag | None = None

    @property
    def best_file(self) -> Path:
        return Path(self.scratch.name) / BEST_FILE

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


# === setup ======================================================================================


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
    training = setup(config, base_model, train_path, validation_path, tracker, checkpoint_uri)
    # The best weights so far live in a scratch file: removed at the end, and also when the run
    # fails, so a model-sized file never piles up in /tmp with every NaN or SIGTERM.
    try:
        with training.scratch:
            train(training)
            export(training, output_dir)
    finally:
        if training.tracker:  # what an MLflow outage held back is sent now (bounded wait)
            training.tracker.close()
    return training.report


def setup(
    config: TrainConfig,
    base_model: str,
    train_path: str | Path,
    validation_path: str | Path,
    tracker: Any = None,
    checkpoint_uri: str = "",
) -> Training:
    """Read the data, build the model, optimizer and schedule, then resume from the newest
    checkpoint under `checkpoint_uri` or validate the base model (step 0)."""
    torch.manual_seed(config.seed)
    world = distributed.init()
    device = distributed.device(world)
    dtype = lm.autocast_dtype(config.precision, device)
    data = read_data(train_path, validation_path)
    model_dir = models.fetch(base_model)
    tokenizer = models.load_tokenizer(
        model_dir, base_model, data.template, chat=data.task.chat_template
    )
    tokenizer.add_tokens(data.added_tokens)  # tokenize's ids, same order
    fsdp = check_options(config, world, device, data)
    model = build_model(
        config, model_dir, base_model, data, device, dtype, fsdp, _vocab_size(tokenizer, data)
    )

    window = config.micro_batch_size * config.gradient_accumulation_steps * world.size
    steps_per_epoch = math.ceil(len(data.train_rows) / window)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    optimizer, scheduler = build_optimizer(config, model, fsdp, total_steps)
    # MFU: ~6 FLOPs per parameter per token for a full fine-tune (forward 2, backward 4); ~4
    # with frozen base weights (no weight gradients), against the device's datasheet peak
    # (known GPUs) or its measured one.
    flops_per_token = (6 if config.method == "full" else 4) * lm.matmul_parameters(model)
    peak_flops = peak(device, dtype)
    task: Any = data.task.training_batches()
    report = TrainReport(precision=str(dtype).removeprefix("torch.") if dtype else "fp32")
    training = Training(
        config=config,
        world=world,
        device=device,
        dtype=dtype,
        fsdp=fsdp,
        data=data,
        model_dir=model_dir,
        base_model=base_model,
        tokenizer=tokenizer,
        model=model,
        loss_module=None,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        windows=shuffled_windows(data.train_rows, window, config.seed),
        window=window,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        flops_per_token=flops_per_token,
        peak=peak_flops,
        report=report,
        # MLflow is kept off the critical path: calls are queued and sent by a thread that
        # rides out outages, so training never fails or stalls on its tracking server.
        tracker=BufferedTracker(tracker) if tracker and world.is_main else None,
        log=print if world.is_main else _quiet,
        store=CheckpointStore(checkpoint_uri, config.keep_checkpoints) if checkpoint_uri else None,
        checkpoint_uri=checkpoint_uri,
        scratch=tempfile.TemporaryDirectory(prefix="sftpipe-finetune-"),
        early_stopping=EarlyStopping(config.early_stopping_patience),
    )
    training.loss_module = build_loss(training)
    log_setup(training)
    resume_or_start(training)
    return training


def read_data(train_path: str | Path, validation_path: str | Path) -> Data:
    train_rows, validation_rows = read_parquet(train_path), read_parquet(validation_path)
    if not train_rows or not validation_rows:
        raise SftpipeError(
            str(train_path),
            "empty training or validation split",
            "check the tokenize step's metrics",
        )
    return Data(
        train_rows,
        validation_rows,
        classify.label_map(train_path),
        schema_metadata(train_path).get(CHAT_TEMPLATE_KEY, ""),
        str(train_path),
        tasks.of_tokenized(train_path),
        vocabulary.added_tokens(schema_metadata(train_path)),
    )


def _vocab_size(tokenizer: Any, data: Data) -> int:
    """The embedding rows the model needs for tokenize's added tokens (0: none added)."""
    return len(tokenizer) if data.added_tokens else 0


def check_options(config: TrainConfig, world: World, device: torch.device, data: Data) -> bool:
    """Refuse combinations that cannot work, before the model is loaded; returns whether the
    model is sharded with FSDP."""
    lora.check_method(config, device)
    fsdp = config.distributed_strategy == "fsdp" and world.size > 1
    if fsdp and (config.method == "qlora" or config.compile):
        raise SftpipeError(
            "distributed_strategy",
            "fsdp is not supported with qlora or compile",
            "use --distributed-strategy ddp, or --method lora without --compile",
        )
    data.task.check_training(
        config, data.train_rows + data.validation_rows, data.labels, data.where
    )
    return fsdp


def build_loss(t: Training) -> Any:
    """The task's loss as a module (DDP wraps it: its gradient hooks run through `forward`).
    What one unit of loss is differs: an assistant token for chat SFT, an example for
    classification."""
    loss_module = t.data.task.loss_module(t.model, t.config, t.data.train_rows, t.data.labels)
    loss_module.to(t.device)
    if t.world.size > 1 and not t.fsdp:
        loss_module = torch.nn.parallel.DistributedDataParallel(loss_module)
    return loss_module


def log_setup(t: Training) -> None:
    if t.tracker:
        t.tracker.log_params(
            {f"train.{k}": v for k, v in t.config.model_dump().items()}
            | {
                "train.device": t.device.type,
                "train.autocast": t.report.precision,
                "train.total_steps": t.total_steps,
                "train.train_rows": len(t.data.train_rows),
                "train.parameters": sum(p.numel() for p in t.model.parameters()),
                "train.peak_matmul_tflops": round(t.peak.flops / 1e12, 3),
                "train.peak_flops_source": t.peak.source,
                # CPU results depend on it: the same seed on 1 vs 2 threads gave other weights.
                "train.cpu_threads": torch.get_num_threads(),
            }
        )
    t.log(
        f"[finetune] {t.total_steps} steps ({t.steps_per_epoch}/epoch) on "
        f"{t.world.size}x{t.device.type}, autocast {t.report.precision}, "
        f"{len(t.data.train_rows)} train / {len(t.data.validation_rows)} validation rows; "
        f"MFU against {t.peak.describe()}",
        flush=True,
    )


def resume_or_start(t: Training) -> None:
    """Continue from the newest complete checkpoint, or record the base model's validation
    loss as step 0 (and its weights as the best so far)."""
    resume_dir = Path(t.scratch.name) / "resume"
    checkpoint = t.store.latest(resume_dir) if t.store else None
    if checkpoint:
        t.start_step, t.early_stopping, t.report = restore(
            checkpoint, t.model, t.optimizer, t.scheduler, t.scaler, t.best_file, t.world
        )
        for _ in range(t.start_step):
            next(t.windows)  # the data position: the order is a function of the seed
        t.log(f"[finetune] resumed from {t.checkpoint_uri} at step {t.start_step}", flush=True)
    else:
        t.early_stopping.update(validate(t, 0), step=0)
        save_best(t)
    shutil.rmtree(resume_dir, ignore_errors=True)


def train(t: Training) -> None:
    """The loop: one optimizer step over a window of conversations, then, when due, a log
    line, a validation (which may stop early) and a checkpoint (which SIGTERM also asks for)."""
    t.sigterm = SigtermFlag()
    progress = Progress("finetune", t.total_steps - t.start_step, "steps")
    since_log = Throughput()
    t.model.train()
    for step in range(t.start_step + 1, t.total_steps + 1):
        result = optimizer_step(t, step)
        t.report.tokens += result.tokens
        t.report.steps = step
        if not math.isnan(result.loss):  # read on logging and validation steps only
            t.report.train_loss = result.loss
        t.report.loss_tokens += result.loss_tokens
        since_log.add(result)
        if step % t.config.log_every == 0 or step == t.total_steps:
            log_step(t, step, result, since_log, progress)
            since_log = Throughput()
        if (step % t.config.eval_every == 0 or step == t.total_steps) and validate_or_stop(t, step):
            break
        checkpoint_or_stop(t, step)
    t.sigterm.restore()
    t.report.seconds += since_log.seconds  # training time only; validation is not counted
    if not t.config.export_best:
        save_best(t)  # the last step's weights are the ones exported
    finish_report(t, progress)


def optimizer_step(t: Training, step: int) -> StepResult:
    """Forward and backward over this process's micro-batches of the step's window, then clip
    and update. The loss and gradient norm are read back (a wait for the device) only on
    logging and validation steps; they are NaN in the result otherwise."""
    try:
        return _optimizer_step(t, step)
    except torch.cuda.OutOfMemoryError as error:
        raise placement.out_of_memory(error, step, t.device, _checkpoint_kept(t)) from None


def _checkpoint_kept(t: Training) -> str:
    """What a failed run leaves to resume from, for its error line."""
    if not t.store:
        return "no checkpoint (no --checkpoint-uri)"
    steps = t.store.complete_steps()
    if not steps:
        return "no checkpoint yet"
    return f"the checkpoint of step {steps[-1]} is kept (a new run resumes from it)"


def _optimizer_step(t: Training, step: int) -> StepResult:
    start = time.perf_counter()
    rows_of_step = next(t.windows)
    world, config = t.world, t.config
    # Normalize by the loss-bearing tokens of the whole global window; DDP averages
    # gradients over processes, so scale by their number to keep the sum.
    window_loss_tokens = sum(row.get("num_loss_tokens", 1) for row in rows_of_step)
    step_tokens = sum(row["num_tokens"] for row in rows_of_step)
    micro_batches = list(lm.batches(rows_of_step, config.micro_batch_size))[
        world.rank :: world.size
    ]
    loss_total = placement.DeviceSum()
    for index, rows in enumerate(micro_batches):
        batch = placement.to_device(t.task.collate(rows, t.pad_id), t.device)
        last = index == len(micro_batches) - 1
        # DDP: all-reduce on the last micro-batch only. FSDP reduce-scatters every one:
        # skipping it would keep whole unsharded gradients, which is what FSDP avoids.
        sync = (
            contextlib.nullcontext()
            if last or world.size == 1 or t.fsdp
            else t.loss_module.no_sync()
        )
        # One `with` for forward and backward: no_sync() is a one-shot context manager (entering
        # it twice raised AttributeError with DDP and gradient accumulation).
        with sync:
            with lm.autocast(t.device, t.dtype):
                loss = t.loss_module(batch)
            t.scaler.scale(loss * world.size / window_loss_tokens).backward()
        loss_total.add(loss)
    reads = step % config.log_every == 0 or step % config.eval_every == 0 or step == t.total_steps
    loss_value = world.sum(loss_total.value())[0] / window_loss_tokens if reads else math.nan
    if reads and not math.isfinite(loss_value):
        raise SftpipeError(
            "finetune",
            f"loss is {loss_value} at step {step}",
            "lower --learning-rate or use --precision fp32",
        )
    t.scaler.unscale_(t.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        t.model.parameters(), config.max_grad_norm or float("inf")
    )
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss_value,
        float(grad_norm) if reads else math.nan,
        step_tokens,
        window_loss_tokens,
        time.perf_counter() - start,
    )


def log_step(
    t: Training, step: int, result: StepResult, since_log: Throughput, progress: Progress
) -> None:
    tokens_per_second = since_log.tokens / since_log.seconds
    t.report.seconds += since_log.seconds
    metrics = {
        "train_loss": result.loss,
        "learning_rate": t.scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm,
        "tokens_per_second": tokens_per_second,
        "mfu": t.flops_per_token * tokens_per_second / t.peak.flops,
    }
    t.report.history.append({"step": step} | metrics)
    if t.tracker:
        t.tracker.log_metrics(metrics, step)
    if t.world.is_main:
        progress.update(
            step - t.start_step,
            f"loss {result.loss:.4f} | lr {metrics['learning_rate']:.2e} | "
            f"{tokens_per_second:.0f} tok/s | MFU {metrics['mfu']:.1%}",
        )


def validate(t: Training, step: int) -> float:
    loss = t.task.mean_loss(
        t.model,
        t.data.validation_rows,
        t.pad_id,
        t.config.micro_batch_size,
        t.device,
        t.dtype,
        t.world,
    )
    t.report.history.append({"step": step, "validation_loss": loss})
    if t.tracker:
        t.tracker.log_metrics({"validation_loss": loss}, step)
    return loss


def validate_or_stop(t: Training, step: int) -> bool:
    """Validate, keep the weights if they are the best so far; returns whether to stop early."""
    validation_loss = validate(t, step)
    stopping = t.early_stopping
    if stopping.update(validation_loss, step):
        save_best(t)
    t.log(
        f"[finetune] step {step}: validation loss {validation_loss:.4f} (best "
        f"{stopping.best:.4f} at step {stopping.best_step})",
        flush=True,
    )
    if stopping.stop:
        t.report.stopped_early = True
        t.log(f"[finetune] early stop: no improvement in {stopping.stale} validations", flush=True)
    return stopping.stop


def save_best(t: Training) -> None:
    # The best weights so far live in a file, not in a second copy in memory (for a large
    # model that copy alone would need as much RAM as the model).
    full = distributed.model_state(t.model)  # every process gathers (FSDP)
    if t.world.is_main:
        torch.save(full, t.best_file)


def checkpoint_or_stop(t: Training, step: int) -> None:
    """Checkpoint when due or when SIGTERM came; after SIGTERM, stop with one line."""
    stop_requested = t.world.any(t.sigterm.set if t.sigterm else False)
    due = step % t.config.checkpoint_every == 0 or stop_requested
    if t.store and step < t.total_steps and due:
        save_checkpoint(t, step)
    if stop_requested:
        saved = "checkpoint saved" if t.store else "no checkpoint (no --checkpoint-uri)"
        raise SftpipeError(
            "finetune",
            f"stopped by SIGTERM at step {step}; {saved}",
            "run the step again to resume",
        )


def save_checkpoint(t: Training, step: int) -> None:
    # Gathered by every process (FSDP), written by the main one.
    full = distributed.model_state(t.model)
    optimizer_state = distributed.optimizer_state(t.model, t.optimizer)
    rng = t.world.gather(checkpoints.rng_state())  # every rank's own generators

    def write(folder: Path) -> None:
        torch.save(full, folder / "model.pt")
        if t.early_stopping.best_step != step:
            shutil.copyfile(t.best_file, folder / BEST_FILE)
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": t.scheduler.state_dict(),
                "scaler": t.scaler.state_dict(),
                "rng": rng,
            },
            folder / "trainer.pt",
        )
        state = {
            "step": step,
            "early_stopping": asdict(t.early_stopping),
            "report": asdict(t.report),
        }
        (folder / "trainer_state.json").write_text(json.dumps(state))

    if t.world.is_main and t.store:
        t.store.save(step, write)
        print(f"[finetune] checkpoint at step {step} -> {t.checkpoint_uri}", flush=True)
    t.world.barrier()


def finish_report(t: Training, progress: Progress) -> None:
    report = t.report
    report.best_validation_loss = t.early_stopping.best
    report.best_step = t.early_stopping.best_step
    report.exported_step = report.best_step if t.config.export_best else report.steps
    report.tokens_per_second = report.tokens / report.seconds if report.seconds else 0.0
    report.mfu = t.flops_per_token * report.tokens_per_second / t.peak.flops
    report.epochs = report.steps * t.window / len(t.data.train_rows)
    t.log(
        f"[finetune] done: {report.steps} steps in {format_duration(progress.elapsed())}, "
        f"{report.tokens_per_second:.0f} tok/s (MFU {report.mfu:.1%}), best validation loss "
        f"{report.best_validation_loss:.4f} (step {report.best_step}); exporting the weights of "
        f"step {report.exported_step}",
        flush=True,
    )


# === export =====================================================================================


def export(t: Training, output_dir: str | Path) -> None:
    """Publish the best weights, the tokenizer and the report to `output_dir` (atomically)."""
    # The optimizer state (twice the model) is done with; free it before the best weights
    # are read back, so exporting never needs more memory than training did.
    t.optimizer.state.clear()
    if t.world.is_main:
        # An FSDP model is sharded across the processes: export from a plain copy on the CPU.
        final = (
            load_model(
                t.config,
                t.model_dir,
                t.base_model,
                t.data.labels,
                torch.device("cpu"),
                t.data.task,
                _vocab_size(t.tokenizer, t.data),
            )
            if t.fsdp
            else t.model
        )
        final.load_state_dict(torch.load(t.best_file, weights_only=True, mmap=True))
        with storage.atomic_dir(output_dir) as tmp:
            lora.save(final, t.tokenizer, tmp)
            (tmp / TRAINING_LOG).write_text(json.dumps(asdict(t.report), indent=1))
    t.world.barrier()
    if t.tracker:
        t.tracker.log_metrics(
            {
                "best_validation_loss": t.report.best_validation_loss,
                "train_tokens_per_second": t.report.tokens_per_second,
            }
        )

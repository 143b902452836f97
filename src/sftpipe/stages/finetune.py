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
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftpipe import storage, tasks
from sftpipe.config import TrainConfig
from sftpipe.data.schemas import CHAT_TEMPLATE_KEY
from sftpipe.data.tokenized import read_parquet, schema_metadata
from sftpipe.errors import SftpipeError
from sftpipe.modeling import (
    attention,
    classify,
    distributed,
    dropout_attention,
    lean_layers,
    lm,
    lora,
    models,
)
from sftpipe.modeling import checkpoint as checkpoints
from sftpipe.modeling import device as placement
from sftpipe.modeling.checkpoint import CheckpointStore
from sftpipe.modeling.distributed import World
from sftpipe.modeling.peak_flops import Peak, peak
from sftpipe.progress import Progress, format_duration
from sftpipe.tasks.base import Task
from sftpipe.tracking.runs import BufferedTracker

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


@dataclass
class Data:
    """The tokenized splits and what they say about the task."""

    train_rows: list[dict[str, Any]]
    validation_rows: list[dict[str, Any]]
    labels: dict[str, int] | None  # None: chat SFT of a causal LM
    template: str  # the chat template tokenize rendered with (an override included)
    where: str  # the training split's path, for error messages
    task: Task  # chosen once from the data (sftpipe.tasks)


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
    sigterm: _SigtermFlag | None = None

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
    fsdp = check_options(config, world, device, data)
    model = build_model(config, model_dir, base_model, data, device, dtype, fsdp)

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
    )


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


def _core(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_model(
    config: TrainConfig,
    model_dir: Path,
    base_model: str,
    labels: dict[str, int] | None,
    device: torch.device,
    task: Task,
) -> Any:
    """The model to train (or to export into): the base model for the task on `device`, with
    gradient checkpointing and adapters as configured."""
    model = task.load_for_training(config, model_dir, base_model, labels)
    model = place(model, device) if config.method != "qlora" else model
    if config.lean_layers:
        lean_layers.apply(model)
        dropout_attention.use(model)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=config.gradient_checkpointing_every
        )
    if config.method in ("lora", "qlora"):
        model = lora.apply(model, config, task.peft_task_type)
    return model


def place(model: Any, device: torch.device) -> Any:
    """`model` moved to `device`; weights that alone do not fit are one line, not a CUDA
    traceback (the full check, with gradients and optimizer state, follows in build_model)."""
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        raise SftpipeError(
            "finetune",
            f"the model's weights alone ({weights / placement.GIB:.1f} GiB) do not fit "
            f"{device} memory",
            placement.MEMORY_OPTIONS,
        ) from None


def build_model(
    config: TrainConfig,
    model_dir: Path,
    base_model: str,
    data: Data,
    device: torch.device,
    dtype: torch.dtype | None,
    fsdp: bool,
) -> Any:
    """The model, placed (or sharded) and checked against the data."""
    # FSDP: load on the CPU; sharding moves each rank's shards to the GPU, so the model never
    # has to fit one GPU whole.
    model = load_model(
        config,
        model_dir,
        base_model,
        data.labels,
        torch.device("cpu") if fsdp else device,
        data.task,
    )
    if fsdp:
        distributed.shard(_core(model), device, dtype)
    elif config.method != "qlora":
        placement.check_memory(model, device)  # one line before the first step, not an OOM
    if data.task.token_labels and device.type == "cuda":
        # Packed rows through the flash varlen kernel: no per-forward mask (modeling/attention)
        attention.use(_core(model))
    # In place, so state_dict keys (checkpoints, export) stay those of the plain model; dynamic
    # shapes, since every micro-batch has its own width. Block by block where the model has a
    # block list: one compiled graph serves them all.
    if config.compile and not placement.compile_blocks(model, dynamic=True):
        _core(model).base_model.compile(dynamic=True)
    check_data_fits_model(data.train_rows + data.validation_rows, model, data.where)
    if "position_ids" in data.train_rows[0] and not lm.isolates_packed_samples(model, device):
        raise SftpipeError(
            data.where,
            f"{type(model).__name__} lets packed samples attend to each other",
            "tokenize with --no-packing for this model",
        )
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


def build_optimizer(
    config: TrainConfig, model: Any, fsdp: bool, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its warmup-then-decay schedule."""
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
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, shape=config.lr_schedule)
    )
    return optimizer, scheduler


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


def restore(
    folder: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    best_file: Path,
    world: World = distributed.SINGLE,
) -> tuple[int, EarlyStopping, TrainReport]:
    """Load a checkpoint written by `run` (with any strategy and number of processes) into the
    model and optimizer, its best weights into `best_file` on the main process, and this rank's
    random generators; returns the step, the early-stopping state and the report so far. Every
    process calls it."""
    weights = torch.load(folder / "model.pt", weights_only=True, mmap=True)
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    distributed.load_state(model, weights, optimizer, trainer["optimizer"])
    if world.is_main:
        if (folder / BEST_FILE).exists():
            shutil.copyfile(folder / BEST_FILE, best_file)
        else:  # the checkpoint's own weights were the best
            torch.save(weights, best_file)
    del weights
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    rng, exact = checkpoints.rank_rng_state(trainer["rng"], world.rank, world.size)
    checkpoints.set_rng_state(rng)
    if not exact and world.is_main:
        print(
            f"[finetune] the checkpoint was written by another number of processes: random "
            f"draws (dropout) differ from an uninterrupted run on {world.size}",
            flush=True,
        )
    state = json.loads((folder / "trainer_state.json").read_text())
    return state["step"], EarlyStopping(**state["early_stopping"]), TrainReport(**state["report"])


# === train ======================================================================================


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    loss_tokens: int
    seconds: float


@dataclass
class Throughput:
    """Tokens and seconds since the last log line (validation time is not counted)."""

    seconds: float = 0.0
    tokens: int = 0

    def add(self, result: StepResult) -> None:
        self.seconds += result.seconds
        self.tokens += result.tokens


def train(t: Training) -> None:
    """The loop: one optimizer step over a window of conversations, then, when due, a log
    line, a validation (which may stop early) and a checkpoint (which SIGTERM also asks for)."""
    t.sigterm = _SigtermFlag()
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
    report.tokens_per_second = report.tokens / report.seconds if report.seconds else 0.0
    report.mfu = t.flops_per_token * report.tokens_per_second / t.peak.flops
    report.epochs = report.steps * t.window / len(t.data.train_rows)
    t.log(
        f"[finetune] done: {report.steps} steps in {format_duration(progress.elapsed())}, "
        f"{report.tokens_per_second:.0f} tok/s (MFU {report.mfu:.1%}), best validation loss "
        f"{report.best_validation_loss:.4f} (step {report.best_step})",
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
                t.config, t.model_dir, t.base_model, t.data.labels, torch.device("cpu"), t.data.task
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


def read_report(output_dir: str | Path) -> TrainReport:
    """The report `run` exported beside the weights."""
    return TrainReport(**json.loads((Path(output_dir) / TRAINING_LOG).read_text()))

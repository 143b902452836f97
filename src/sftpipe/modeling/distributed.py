"""Data-parallel training under `torchrun`: which process this is, the few collectives the
training loop needs, FSDP sharding and full state dicts. Without torchrun (WORLD_SIZE unset)
everything is a no-op, so the single-process path stays plain."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sftpipe.errors import SftpipeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum over all processes."""
        if self.size == 1:
            return list(values)
        on = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (any picklable object), in rank order, on the main process;
        [] on the others. Collective."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size if self.is_main else []
        dist.gather_object(value, gathered if self.is_main else None, dst=0)
        return gathered

    def any(self, flag: bool) -> bool:
        return bool(self.sum(float(flag))[0])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init() -> World:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on
    CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


SINGLE = World()


def device(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


# --- FSDP ------------------------------------------------------------------------------------
# Checkpoints and the best weights are full (unsharded) state dicts gathered on rank 0, in CPU
# memory, whatever the strategy: one format that a single process, DDP or FSDP with any number
# of processes can resume from (a retried step may get another number of GPUs), and that export
# needs anyway (save_pretrained). The price is that rank 0 needs CPU RAM for the whole model and
# its optimizer state; sharded torch.distributed.checkpoint files would avoid that for models
# too big for one machine's RAM, at the cost of a format tied to the sharding.
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)


def shard(core: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """FSDP2 (`fully_shard`): one unit per transformer block (the classes the model lists in
    `_no_split_modules`), then `core` as the root unit holding the rest (embeddings, final norm,
    head; tied embeddings stay in one unit). `core` must be the module whose forward every
    caller goes through, since the root's parameters are gathered in its forward. Parameters on
    the CPU are moved to `device` shard by shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = {
        name for name in getattr(core, "_no_split_modules", None) or () if "Embed" not in name
    }
    units = [module for module in core.modules() if type(module).__name__ in blocks]
    if not units:
        raise SftpipeError(
            "distributed_strategy",
            f"{type(core).__name__} names no transformer block class to shard",
            "use --distributed-strategy ddp",
        )
    # On CUDA: gather parameters in the compute dtype (half the traffic and memory) and reduce
    # gradients in fp32. On CPU, gloo and fp32 parameters: autocast already runs matmuls in bf16.
    policy = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if device.type == "cuda" and dtype is not None
        else MixedPrecisionPolicy()
    )
    for module in reversed(units):  # innermost first
        fully_shard(module, mp_policy=policy)
    fully_shard(core, mp_policy=policy)


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The full state dict on rank 0's CPU ({} on other ranks); collective under FSDP. Keys are
    those of `model.state_dict()` without FSDP."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0 (keyed by parameter names); collective under FSDP."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)


def load_state(
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full state dicts that every rank holds into a plain, DDP or FSDP model."""
    set_model_state_dict(model, state, options=FULL_EVERYWHERE)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_EVERYWHERE)


def sharded(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every FSDP unit's parameters back in their sharded form. The root unit
    keeps its parameters gathered after a forward (it expects a backward next); an optimizer
    built then would hold the gathered copies and never update the real, sharded parameters."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return module

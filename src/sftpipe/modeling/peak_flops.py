"""The denominator of MFU (model FLOPs utilization): the device's dense peak FLOP/s in the
training precision, and where that number comes from.

- Known NVIDIA GPUs: the datasheet's dense (no 2:4 sparsity) tensor-core peak, by device name,
  as large training frameworks do. A datasheet peak is an upper bound of what any kernel
  reaches, so MFU against it never exceeds 100%.
- Anything else (CPUs, unknown GPUs): measured, robust to a busy machine: a 2048 x 2048 matmul
  (1024 on CPUs) timed several times and the fastest run kept, since other work on the
  machine can only slow a run down. On CPUs also by CPU time (times the threads), which
  other processes cannot take: on a 2-core machine at load 18, the fastest wall-clock fp32 run
  read 9-16 GFLOP/s, CPU time 198-216 (the unloaded machine's peak: 215-223). The larger of
  the two is the peak, so a busy moment at start-up cannot shrink the denominator. The first
  version timed a 512 x 512 matmul for 0.3 s of wall clock at start-up and MFU read 333-991%.
The measurement draws from its own random generator: the training's random stream (dropout)
does not depend on whether or how the peak was found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Dense TFLOP/s per GPU from NVIDIA's datasheets: (bf16, fp16, tf32, fp32 without tensor
# cores). Longer names first: "H100 NVL" before "H100", "A100" before "A10", "L40S" before "L4".
DATASHEET_TFLOPS: dict[str, tuple[float, float, float, float]] = {
    "GB200": (2500.0, 2500.0, 1250.0, 80.0),
    "B200": (2250.0, 2250.0, 1100.0, 75.0),
    "H200 NVL": (835.0, 835.0, 417.0, 60.0),
    "GH200": (989.0, 989.0, 494.0, 67.0),
    "H200": (989.0, 989.0, 494.0, 67.0),
    "H100 NVL": (835.0, 835.0, 417.0, 60.0),
    "H100 PCIe": (756.0, 756.0, 378.0, 51.0),
    "H100": (989.0, 989.0, 494.0, 67.0),  # SXM5 (the device name says "H100 80GB HBM3")
    "H800": (989.0, 989.0, 494.0, 67.0),
    "A100": (312.0, 312.0, 156.0, 19.5),
    "A800": (312.0, 312.0, 156.0, 19.5),
    "L40S": (362.0, 362.0, 183.0, 91.6),
    "L40": (181.0, 181.0, 90.5, 90.5),
    "L4": (121.0, 121.0, 60.0, 30.3),
    # NVIDIA publishes no A10G sheet (an AWS variant of the A10): the A10's figures.
    "A10G": (125.0, 125.0, 62.5, 31.2),
    "A10": (125.0, 125.0, 62.5, 31.2),
    "A40": (149.7, 149.7, 74.8, 37.4),
    "V100": (0.0, 125.0, 0.0, 15.7),  # no bf16 tensor cores: bf16 is measured
    "T4": (0.0, 65.0, 0.0, 8.1),
}


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # said with every MFU: "datasheet NVIDIA H100 bf16 dense" or "measured ..."

    def describe(self) -> str:
        return f"{self.flops / 1e12:.3g} TFLOP/s ({self.source})"


def _precision_name(dtype: torch.dtype | None) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if torch.backends.cuda.matmul.allow_tf32:  # fp32 matmuls on tensor cores
        return "tf32"
    return "fp32"


def datasheet(device_name: str, dtype: torch.dtype | None) -> Peak | None:
    """The datasheet dense peak of the GPU called `device_name` (as torch.cuda reports it) in
    `dtype` (None: fp32), or None when the table does not know it."""
    precision = _precision_name(dtype)
    column = ("bf16", "fp16", "tf32", "fp32").index(precision)
    for name, row in DATASHEET_TFLOPS.items():
        if name.lower() in device_name.lower() and row[column]:
            return Peak(row[column] * 1e12, f"datasheet {name} {precision} dense")
    return None


def fastest_rate(run_once: Callable[[], None], flops: float, repeats: int, clock=None) -> float:
    """`flops` divided by the fastest of `repeats` timed calls of `run_once`: a run that other
    processes slowed down never lowers the result."""
    clock = clock or time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run_once()
        best = min(best, clock() - start)
    return flops / best


def measure(device: torch.device, dtype: torch.dtype | None, repeats: int = 5) -> Peak:
    """Dense matmul FLOP/s on `device` in `dtype`, the fastest of `repeats` timed runs."""
    size = 2048 if device.type == "cuda" else 1024
    calls = 8 if device.type == "cuda" else 1
    generator = torch.Generator(device).manual_seed(0)
    a, b = (
        torch.randn(size, size, device=device, dtype=dtype or torch.float32, generator=generator)
        for _ in range(2)
    )

    def run_once() -> None:
        for _ in range(calls):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run_once()  # warm-up: kernels, thread pool
    work = 2.0 * size**3 * calls
    flops = fastest_rate(run_once, work, repeats)
    how = "wall clock"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        by_cpu_time = fastest_rate(run_once, work, repeats, time.process_time) * threads
        if by_cpu_time > flops:
            flops, how = by_cpu_time, f"CPU time x {threads} threads"
    precision = _precision_name(dtype) if device.type == "cuda" else str(dtype or "fp32")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Peak(
        flops,
        f"measured on {where}: fastest of {repeats} runs of {calls} "
        f"{size}x{size} {precision.removeprefix('torch.')} matmuls by {how}",
    )


def peak(device: torch.device, dtype: torch.dtype | None) -> Peak:
    """The datasheet peak for a known GPU, else a measurement on `device`."""
    if device.type == "cuda":
        known = datasheet(torch.cuda.get_device_name(device), dtype)
        if known:
            return known
    return measure(device, dtype)

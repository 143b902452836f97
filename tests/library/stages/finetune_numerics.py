"""How close two fine-tunes must end that differ only in the order of their floating-point
reductions: one process against two (DDP, FSDP), one batch against micro-batches, a resume
from a checkpoint gathered by FSDP.

Element by element there is no sound tolerance: AdamW divides every gradient element by its
own running RMS, so an element whose gradient is rounding noise gets a full-size update of
random sign (up to lr per step) in any precision. That is why an elementwise atol of 1e-5 passed
on one machine and failed on another (element (101, 53): 1.78e-5), depending on which kernels
and how many threads summed the gradients.

Per tensor, the update (trained - base weights) is what the runs share. Reordering a sum of T
floating-point terms moves it by at most T * eps relative to the sum of magnitudes (the
worst case of any order and any kernel), and S optimizer steps add such errors at most
linearly; so the updates may differ by S * T * eps of their norm, with T the terms a gradient
element sums (the tokens of one optimizer step's window). Measured here (fp32, 6 steps,
T = 512, bound 3.7e-4): DDP 0 (same thread count) to 6e-6, FSDP 6.5e-6; another data order
(a real difference) moves it by more than 0.1.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file


def update_tolerance(steps: int, terms: int, dtype: torch.dtype = torch.float32) -> float:
    return steps * terms * torch.finfo(dtype).eps


def update_differences(a_dir: Path, b_dir: Path, base_dir: Path) -> dict[str, float]:
    """Per tensor: |update_b - update_a| / |update_a| (0 for tensors neither run changed)."""
    a, b = (load_file(d / "model.safetensors") for d in (a_dir, b_dir))
    base = load_file(base_dir / "model.safetensors")
    assert a.keys() == b.keys()
    differences = {}
    for name in a:
        update_a = a[name].double() - base[name].double()
        update_b = b[name].double() - base[name].double()
        scale = update_a.norm().item()
        gap = (update_b - update_a).norm().item()
        differences[name] = gap / scale if scale else gap
    return differences


def assert_same_training(
    a_dir: Path, b_dir: Path, base_dir: Path, steps: int, terms: int, dtype=torch.float32
) -> None:
    tolerance = update_tolerance(steps, terms, dtype)
    differences = update_differences(a_dir, b_dir, base_dir)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= tolerance, (
        f"{worst}: updates differ by {differences[worst]:.2e} of their norm, more than "
        f"{steps} steps x {terms} terms x eps = {tolerance:.2e}"
    )

"""The denominator of MFU: datasheet peaks by GPU name, and a CPU measurement that a busy
machine cannot push below the real peak (the cause of MFU readings of 333-991%)."""

import pytest
import torch

from sftpipe.modeling import peak_flops
from sftpipe.modeling.peak_flops import datasheet, fastest_rate, measure, peak


@pytest.mark.parametrize(
    ("device_name", "dtype", "tflops", "row"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989, "H100"),
        ("NVIDIA H200", torch.bfloat16, 989, "H200"),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989, "GH200"),
        ("NVIDIA H100 PCIe", torch.float16, 756, "H100 PCIe"),
        ("NVIDIA H100 NVL", torch.bfloat16, 835, "H100 NVL"),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312, "A100"),
        ("NVIDIA A100 80GB PCIe", None, 19.5, "A100"),
        ("NVIDIA A10G", torch.bfloat16, 125, "A10G"),
        ("NVIDIA A10", torch.bfloat16, 125, "A10"),
        ("NVIDIA L4", torch.bfloat16, 121, "L4"),
        ("NVIDIA L40S", torch.bfloat16, 362, "L40S"),
        ("Tesla T4", torch.float16, 65, "T4"),
    ],
)
def test_known_gpus_take_the_datasheet_dense_peak(device_name, dtype, tflops, row):
    found = datasheet(device_name, dtype)
    assert found.flops == pytest.approx(tflops * 1e12)
    assert found.source.startswith(f"datasheet {row} ") and found.source.endswith(" dense")


def test_unknown_gpus_and_missing_precisions_are_not_guessed():
    assert datasheet("Some Future Accelerator", torch.bfloat16) is None
    assert datasheet("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 tensor cores
    assert datasheet("Tesla V100-SXM2-16GB", torch.float16).flops == pytest.approx(125e12)


def test_fp32_with_tf32_matmuls_takes_the_tf32_column():
    before = torch.backends.cuda.matmul.allow_tf32  # a property: set and restored by hand
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        found = datasheet("NVIDIA H100 80GB HBM3", None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert found.flops == pytest.approx(494e12) and "tf32" in found.source
    assert datasheet("NVIDIA H100 80GB HBM3", None).flops == pytest.approx(67e12)


def test_the_fastest_run_counts_so_load_cannot_lower_the_peak():
    """A fake clock: runs of 5, 1 and 3 s; the run that nothing disturbed (1 s) is the peak."""
    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])
    rate = fastest_rate(lambda: None, flops=100.0, repeats=3, clock=lambda: next(ticks))
    assert rate == pytest.approx(100.0)


def test_cpu_peak_is_measured_says_so_and_leaves_the_training_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    found = peak(torch.device("cpu"), None)
    assert torch.equal(torch.rand(4), expected)  # dropout draws do not depend on the benchmark
    assert found.source.startswith("measured on cpu: fastest of 5 runs")
    # The floor any CPU meets and the ceiling none reaches: 1 GFLOP/s to 100 TFLOP/s.
    assert 1e9 < found.flops < 1e14
    assert "TFLOP/s (measured on cpu" in found.describe()


def test_a_known_gpu_is_not_measured(monkeypatch):
    """No GPU here: torch.cuda's device name is replaced, and `measure` must not be called."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(peak_flops, "measure", lambda *a: pytest.fail("measured a known GPU"))
    found = peak(torch.device("cuda", 0), torch.bfloat16)
    assert found.flops == pytest.approx(989e12)


def test_measure_uses_the_training_precision():
    fp32 = measure(torch.device("cpu"), None, repeats=2)
    bf16 = measure(torch.device("cpu"), torch.bfloat16, repeats=2)
    assert "float32" in fp32.source or "fp32" in fp32.source
    assert "bfloat16" in bf16.source

"""The GPU bundle's pieces that can be checked without a GPU or the network: the rewritten
bitsandbytes wheel, and how bench_gpu.py turns timed windows into rates."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import bench_gpu
import pack_gpu_bundle


def test_slim_bitsandbytes_keeps_cuda13_and_cpu_and_a_record_that_matches(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {
        "bitsandbytes/__init__.py": b"x = 1\n",
        "bitsandbytes/libbitsandbytes_cpu.so": b"cpu",
        "bitsandbytes/libbitsandbytes_cuda118.so": b"a" * 1000,
        "bitsandbytes/libbitsandbytes_cuda130.so": b"c130",
        "bitsandbytes/libbitsandbytes_cuda132.so": b"c132",
        "bitsandbytes/libbitsandbytes_rocm64.so": b"rocm",
        "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: bitsandbytes\n",
    }
    with zipfile.ZipFile(wheel, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
        out.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "stale\n")

    pack_gpu_bundle.slim_bitsandbytes(wheel)

    with zipfile.ZipFile(wheel) as slim:
        names = set(slim.namelist())
        record = slim.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        contents = {name: slim.read(name) for name in names}
    kept = {
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cuda132.so",
        "bitsandbytes-0.50.2.dist-info/METADATA",
    }
    assert names == kept | {"bitsandbytes-0.50.2.dist-info/RECORD"}
    for line in record[:-1]:
        name, digest, size = line.split(",")
        expected = base64.urlsafe_b64encode(hashlib.sha256(contents[name]).digest())
        assert digest == "sha256=" + expected.rstrip(b"=").decode()
        assert int(size) == len(contents[name])
    assert {line.split(",")[0] for line in record[:-1]} == kept
    assert record[-1] == "bitsandbytes-0.50.2.dist-info/RECORD,,"


def test_rates_leave_out_the_first_window_and_sum_the_rest():
    steps = [{"tokens": 100 * (i + 1), "loss_tokens": 10 * (i + 1)} for i in range(6)]
    windows = bench_gpu.windows_of(steps, 2)
    assert [w["tokens"] for w in windows] == [300, 700, 1100]
    for window, seconds, loss in zip(windows, (9.0, 1.0, 2.0), (3.0, 2.0, 1.0), strict=True):
        window |= {"seconds": seconds, "loss": loss}
    rates = bench_gpu.steady(windows)
    assert rates["steady_windows"] == 2
    assert rates["tokens_per_s"] == pytest.approx((700 + 1100) / 3.0)
    assert rates["loss_tokens_per_s"] == pytest.approx((70 + 110) / 3.0)
    assert rates["losses"] == [3.0, 2.0, 1.0]


def test_the_datasheet_peak_matches_specific_names_first():
    peaks = dict(bench_gpu.DATASHEET_BF16)
    first = next(flops for key, flops in bench_gpu.DATASHEET_BF16 if key in "NVIDIA H100 PCIe")
    assert first == peaks["H100 PCIe"] != peaks["H100"]
    assert next(f for k, f in bench_gpu.DATASHEET_BF16 if k in "NVIDIA H200") == 989.4e12

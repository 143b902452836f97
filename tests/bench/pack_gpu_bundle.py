"""Build the folder that `bench_gpu.py` needs on a GPU machine with no internet.

    python tests/bench/pack_gpu_bundle.py [--out build/gpu-bundle] [--python-version 3.12]

The GPU image (see docs/gpu.md) has PyTorch, transformers 5.17, pandas, pyarrow, peft,
accelerate and huggingface_hub but not pydantic, trl, datasets, bitsandbytes, ftfy, the
transformers and peft sftpipe is tested with (5.24, 0.21) nor sftpipe itself. The bundle
carries them as wheels for that machine's Python, downloaded from the package index this
machine reaches (`pip download --no-deps`, one version each), plus:

- bitsandbytes rebuilt with only its CUDA 13 libraries (the published wheel holds one per
  CUDA and ROCm version: 43 MB; CUDA 13 alone: ~3 MB),
- the sftpipe wheel (`pip wheel --no-deps .`),
- SmolLM2's tokenizer and the configs of SmolLM2-135M and of a SmolLM2-1.7B-shaped model
  (no weights: the benchmark draws random ones of the same shape; throughput does not depend
  on them),
- the training conversations (chatterbot-corpus exchanges, skewed multi-turn),
- bench_gpu.py and run.sh (installs the wheels into /tmp/site and runs the benchmark).

Nothing here goes into git (build/ is ignored). The total is printed and must stay under
--max-mib.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT / "tests" / "bench"))

# What the GPU machine lacks, pinned to the versions this repo is tested with
# (constraints.txt). Their other requirements are on the GPU image already (pandas, pyarrow,
# xxhash, fsspec, huggingface_hub >= 1.31, tokenizers 0.23, safetensors 0.8, accelerate).
WHEELS = (
    "transformers==5.24.0",
    "peft==0.21.2",  # the image's peft may predate transformers 5.24
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "trl==1.16.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    # clean repairs mojibake with ftfy (the chatterbot data has some)
    "ftfy==6.3.1",
    "wcwidth==0.9.4",
)
BITSANDBYTES = "bitsandbytes==0.50.2"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# SmolLM2-1.7B's shape (its published config): what the issue asks the 1.7B runs to use.
SHAPE_1_7B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 8192,
    "rope_theta": 130000,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(wheels: Path, requirements: list[str], python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip(
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        *platforms,
        "--dest",
        str(wheels),
        *requirements,
    )


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def slim_bitsandbytes(wheel: Path, keep: tuple[str, ...] = ("cuda13", "cpu")) -> Path:
    """The wheel rewritten without the native libraries of other CUDA/ROCm/XPU versions;
    RECORD lists what is left, with its hashes."""
    slim = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
        kept: list[tuple[str, bytes]] = []
        record_name = ""
        for info in source.infolist():
            name = info.filename
            if name.endswith("/RECORD"):
                record_name = name
                continue
            library = Path(name).name
            if library.startswith("libbitsandbytes_") and not any(k in library for k in keep):
                continue
            kept.append((name, source.read(info)))
        lines = [f"{name},{_record_hash(data)},{len(data)}" for name, data in kept]
        for name, data in kept:
            out.writestr(name, data)
        out.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    slim.replace(wheel)
    return wheel


def write_models(target: Path) -> None:
    """SmolLM2's tokenizer files and the two configs (no weights)."""
    from sftpipe.apps import demo

    source = demo.prepare_demo_model(ROOT / "build" / "bench-train" / "cache")
    tokenizer = target / "smollm2-tokenizer"
    tokenizer.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, tokenizer / name)
    config = json.loads((source / "config.json").read_text())
    for name, shape in (("smollm2-135m", {}), ("smollm2-1.7b-shape", SHAPE_1_7B)):
        folder = target / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config | shape, indent=1))
        if (source / "generation_config.json").exists():
            shutil.copy(source / "generation_config.json", folder)


def write_data(target: Path, conversations: int) -> None:
    import bench_train

    rows = bench_train.skewed_conversations(conversations)
    target.mkdir(parents=True)
    (target / "conversations.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )


RUN_SH = """#!/bin/sh
# Install the bundled wheels beside the GPU image's packages, then run the benchmark.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=${SFTPIPE_BENCH_SITE:-/tmp/site}
# --ignore-requires-python: sftpipe declares Python 3.11 (its images); the GPU image has 3.12.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
    --ignore-requires-python --target "$SITE" "$HERE"/wheels/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 "$HERE/bench_gpu.py" --bundle "$HERE" "$@"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--no-bitsandbytes", action="store_true", help="skip QLoRA's wheel")
    parser.add_argument("--max-mib", type=float, default=40.0)
    args = parser.parse_args()

    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    download(wheels, list(WHEELS), args.python_version)
    if not args.no_bitsandbytes:
        download(wheels, [BITSANDBYTES], args.python_version)
        slim_bitsandbytes(next(wheels.glob("bitsandbytes-*.whl")))
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(ROOT))
    write_models(out / "models")
    write_data(out / "data", args.conversations)
    shutil.copy(ROOT / "tests" / "bench" / "bench_gpu.py", out / "bench_gpu.py")
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)

    sizes = {p.relative_to(out): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    total = sum(sizes.values()) / 2**20
    for path, size in sorted(sizes.items(), key=lambda item: -item[1])[:8]:
        print(f"  {size / 2**20:7.2f} MiB  {path}")
    print(f"[pack] {out}: {len(sizes)} files, {total:.1f} MiB (limit {args.max_mib} MiB)")
    if total > args.max_mib:
        raise SystemExit(f"bundle is {total:.1f} MiB > {args.max_mib} MiB")


if __name__ == "__main__":
    main()

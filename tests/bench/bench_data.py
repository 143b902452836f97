"""`make bench-data`: the data stages against TRL's own dataset preparation, in one run.

1. 200k synthetic multi-turn conversations (80% English, 20% Chinese, 30% with a system
   prompt, 1-8 exchanges, log-normal turn lengths: a skewed length distribution), JSONL.
2. sftpipe clean + tokenize (SmolLM2's tokenizer from the demo package, max_length 1024,
   packing on) vs TRL SFTTrainer's dataset preparation (same tokenizer and max_length,
   assistant_only_loss through a {% generation %} copy of the same template, both cores).
   Conversations per second of each, and the ratio.
3. Loss masks: 500 sampled conversations tokenized by both must have identical input_ids and
   labels.
4. Packing efficiency (non-pad fraction at max_length) of the packed train file vs unpacked.
5. Peak RSS of clean + tokenize on a ~2 GB JSONL file, in a fresh process: the largest
   process (the main one by its VmHWM per stage, workers by ru_maxrss), and the peak sum of
   PSS over all processes (sampled; what they use together, shared pages counted once).

Usage: python tests/bench/bench_data.py [--conversations N] [--rss-gb G] [--skip-trl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EN = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
]
# CJK ideographs from the start of the block (the most common ones sit there too).
ZH = "".join(chr(code) for code in range(0x4E00, 0x5A00))

MAX_LENGTH = 1024


def generate(path: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def text(chinese: bool, scale: float) -> str:
        n = max(1, int(rng.lognormal(np.log(scale), 1.0)))
        if chinese:
            return "".join(ZH[i] for i in rng.integers(0, len(ZH), int(n * 1.5))) + "。"
        words = " ".join(EN[i] for i in rng.integers(0, len(EN), n))
        return words[:1].upper() + words[1:] + "."

    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            chinese = rng.random() < 0.2
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": text(chinese, 8)})
            for _ in range(min(8, int(rng.geometric(0.5)))):
                messages.append({"role": "user", "content": text(chinese, 15)})
                messages.append({"role": "assistant", "content": text(chinese, 40)})
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def tokenizer_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF the demo package ships."""
    target = work / "smollm2-tokenizer"
    if not (target / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from sftpipe.apps import demo

        gguf = demo.gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def run_sftpipe(data: Path, model: Path, out: Path, on_stage=lambda stage: None) -> dict:
    from sftpipe.config import DataConfig, TokenizeConfig
    from sftpipe.stages import clean, tokenize

    start = time.perf_counter()
    on_stage("clean")
    cleaned = clean.run(DataConfig(data_uri=str(data)), out / "c.jsonl", out / "q.jsonl")
    middle = time.perf_counter()
    on_stage("tokenize")
    tokenized = tokenize.run(
        TokenizeConfig(max_length=MAX_LENGTH),
        str(model),
        out / "c.jsonl",
        out / "train.parquet",
        out / "val.parquet",
        out / "tq.jsonl",
    )
    end = time.perf_counter()
    return {
        "clean_s": middle - start,
        "tokenize_s": end - middle,
        "seconds": end - start,
        "rows_in": cleaned.rows_in,
        "rows_out": cleaned.rows_out,
        "packing_efficiency": tokenized.packing_efficiency,
        "unpacked_efficiency": tokenized.unpacked_efficiency,
    }


def generation_template(template: str) -> str:
    """The same ChatML rendering with {% generation %} around assistant replies (TRL needs it
    for assistant_only_loss)."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in template, "unexpected template"
    marked = (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + plain + "{% endif %}"
    )
    return template.replace(plain, marked)


def run_trl(data: Path, model: Path, out: Path, processes: int):
    os.environ["HF_DATASETS_CACHE"] = str(out / "hf-cache")
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = generation_template(tokenizer.chat_template)
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
        )
    )
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(
        output_dir=str(out / "trl"),
        max_length=MAX_LENGTH,
        packing=False,
        assistant_only_loss=True,
        dataset_num_proc=processes if processes > 1 else None,
        report_to=[],
        use_cpu=True,
        shuffle_dataset=False,
    )
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=dataset, processing_class=tokenizer)
    seconds = time.perf_counter() - start
    return seconds, dataset, trainer.train_dataset


def compare_masks(model: Path, prepared, count: int = 500) -> int:
    """Conversations whose ids and labels differ between sftpipe and TRL (of `count`)."""
    from sftpipe.data.chat_templates import Renderer, token_ranges
    from sftpipe.data.tokenized import labels_for
    from sftpipe.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    renderer = Renderer(tokenizer)
    rng = np.random.default_rng(1)
    differ = 0
    for index in rng.choice(len(prepared), size=min(count, len(prepared)), replace=False):
        # The prepared row's own messages: TRL drops rows while preparing, so the same index in
        # the raw dataset is another conversation.
        messages = prepared[int(index)]["messages"]
        text, spans = renderer.render(messages)
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        ids = encoding.ids[:MAX_LENGTH]
        labels = labels_for(encoding.ids, token_ranges(encoding, spans))[:MAX_LENGTH]
        row = prepared[int(index)]
        differ += ids != row["input_ids"] or labels != row["labels"]
    return differ


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += _tree(int(child))
    return found


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; PSS splits shared pages (forked workers share most of
    their parent's) between the processes that share them, so PSS adds up across processes."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        )
    except OSError:  # the process just ended
        return 0, 0
    return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])


def _reset_peak() -> None:
    """Restart this process's VmHWM from its current RSS (Linux clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _own_peak_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024**2


def measure_memory(data: Path, model: Path, out: Path) -> dict:
    """clean + tokenize on `data` in this process. Per stage: this process's exact peak RSS
    (the kernel's VmHWM, restarted at each stage), and, sampled every 0.2 s, the largest
    single process's RSS (this one or a worker) and the peak sum of PSS over the process tree
    (a sample can miss a short peak while a C call holds the GIL); plus the kernel's
    ru_maxrss of the workers (the largest one) over the whole run."""
    import threading

    stage = ["start"]
    peaks: dict[str, dict[str, float]] = {}
    done = threading.Event()

    def next_stage(name: str) -> None:
        peaks.setdefault(stage[0], {})["main_peak_gb"] = _own_peak_gb()
        _reset_peak()
        stage[0] = name

    def sample() -> None:
        while not done.wait(0.2):
            sizes = [_memory_kb(pid) for pid in _tree(os.getpid())]
            peak = peaks.setdefault(stage[0], {})
            largest, total = max(r for r, _ in sizes) / 1024**2, sum(p for _, p in sizes) / 1024**2
            peak["max_rss_gb"] = max(peak.get("max_rss_gb", 0.0), largest)
            peak["pss_sum_gb"] = max(peak.get("pss_sum_gb", 0.0), total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = run_sftpipe(data, model, out, on_stage=next_stage)
    next_stage("end")
    done.set()
    sampler.join()
    return result | {
        "stages": peaks,
        "main_peak_gb": max(stage["main_peak_gb"] for stage in peaks.values()),
        "ru_maxrss_workers_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2,
    }


def peak_rss(data: Path, model: Path, out: Path) -> dict:
    """`measure_memory` in a fresh child process: the parent's own RUSAGE_CHILDREN would also
    count every earlier child (TRL's dataset workers, the first run's workers)."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys, json; sys.path.insert(0, {here!r}); from bench_data import measure_memory; "
        f"from pathlib import Path; print(json.dumps(measure_memory(Path({str(data)!r}), "
        f"Path({str(model)!r}), Path({str(out)!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=200_000)
    parser.add_argument("--rss-gb", type=float, default=2.0)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sftpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"[bench-data] workdir {work}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (other work on the machine slows both sides)",
        flush=True,
    )
    model = tokenizer_dir(work)
    data = work / "conversations.jsonl"
    generate(data, args.conversations)
    print(
        f"[bench-data] {args.conversations:,} conversations, {data.stat().st_size / 1e6:.0f} MB",
        flush=True,
    )
    ours = run_sftpipe(data, model, work / "sftpipe")
    ours_rate = ours["rows_in"] / ours["seconds"]
    print(
        f"[bench-data] sftpipe clean {ours['clean_s']:.1f} s + tokenize "
        f"{ours['tokenize_s']:.1f} s: {ours_rate:,.0f} conversations/s",
        flush=True,
    )
    result = {"sftpipe": ours, "sftpipe_conversations_per_s": ours_rate}
    if not args.skip_trl:
        seconds, _, prepared = run_trl(data, model, work, os.cpu_count() or 1)
        trl_rate = args.conversations / seconds
        differ = compare_masks(model, prepared)
        result |= {
            "trl_seconds": seconds,
            "trl_conversations_per_s": trl_rate,
            "speedup": ours_rate / trl_rate,
            "mask_mismatches_of_500": differ,
        }
        print(
            f"[bench-data] TRL SFTTrainer preparation {seconds:.1f} s: {trl_rate:,.0f} "
            f"conversations/s; sftpipe is {ours_rate / trl_rate:.2f}x; loss masks differ on "
            f"{differ} of 500 sampled conversations",
            flush=True,
        )
    print(
        f"[bench-data] packing efficiency {ours['packing_efficiency']:.1%} packed vs "
        f"{ours['unpacked_efficiency']:.1%} unpacked (non-pad fraction at max_length "
        f"{MAX_LENGTH})",
        flush=True,
    )
    if args.rss_gb > 0:
        big = work / "big.jsonl"
        if not big.exists() or big.stat().st_size < args.rss_gb * 1e9:  # reused with --workdir
            with big.open("wb") as out:
                copies = 0
                while out.tell() < args.rss_gb * 1e9:
                    generate(work / "part.jsonl", args.conversations, seed=copies + 1)
                    out.write((work / "part.jsonl").read_bytes())
                    copies += 1
            (work / "part.jsonl").unlink()
        size_gb = big.stat().st_size / 1e9
        print(f"[bench-data] measuring memory on a {size_gb:.2f} GB JSONL", flush=True)
        memory = peak_rss(big, model, work / "rss")
        peak = max(memory["main_peak_gb"], memory["ru_maxrss_workers_gb"])
        pss = max(stage.get("pss_sum_gb", 0.0) for stage in memory["stages"].values())
        result |= {
            "rss_input_gb": size_gb,
            "peak_rss_gb": peak,
            "peak_pss_sum_gb": pss,
            "rss_run": memory,
        }
        stages = ", ".join(
            f"{name} {stage['main_peak_gb']:.2f} GB (sampled {stage['max_rss_gb']:.2f} GB)"
            for name, stage in memory["stages"].items()
            if name in ("clean", "tokenize")
        )
        print(
            f"[bench-data] peak RSS {peak:.2f} GB on a {size_gb:.2f} GB JSONL (the largest "
            f"process of clean + tokenize, workers included; goal < 1.5 GB; main process by "
            f"stage: "
            f"{stages}); all processes together {pss:.2f} GB (peak sum of PSS); "
            f"{memory['rows_in']:,} conversations in {memory['seconds']:.0f} s (clean "
            f"{memory['clean_s']:.0f} s + tokenize {memory['tokenize_s']:.0f} s): "
            f"{memory['rows_in'] / memory['seconds']:,.0f} conversations/s",
            flush=True,
        )
    (work / "bench-data.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

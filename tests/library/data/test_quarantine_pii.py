"""PII in rejected rows: with `scrub_pii` on, emails, phones, card numbers and IP addresses in
rows that clean rejects appear in none of the quarantine, the HTML report, the error line of a
failed step, or what goes to MLflow (a real MLflow server with SeaweedFS artifacts)."""

from __future__ import annotations

import gzip
import json
import random
import uuid
from pathlib import Path

import pytest

from sftpipe.config import DataConfig, PipelineConfig
from sftpipe.errors import SftpipeError
from sftpipe.kfp_glue import steps
from sftpipe.stages import clean
from sftpipe.stages.clean import read_jsonl
from sftpipe.tracking.runs import RUN_ID_ENV, open_run

EMAIL, EMAIL_2 = "jane.doe@example.com", "ops-team+alerts@mail.example.org"
PHONES = ("13812345678", "+44 20 7946 0958", "(555) 123-4567")
FULL_WIDTH_PHONE = "１３９８７６５４３２１"  # NFKC: 13987654321
CARDS = ("4111 1111 1111 1111", "5500-0000-0000-0004")
IPS = ("192.168.10.77", "2001:db8::8a2e:370:7334")
# Every string that must not leak, including what a cut at 2,000 characters would leave of an
# address that crosses it, and the ASCII form of the full-width phone.
SECRETS = (
    EMAIL,
    EMAIL_2,
    *PHONES,
    FULL_WIDTH_PHONE,
    "13987654321",
    *CARDS,
    *(card.replace(" ", "").replace("-", "") for card in CARDS),
    *IPS,
    "jane.doe@e",
)


# Padding that puts EMAIL at character 1,988 of its raw line: a cut at 2,000 would show
# "jane.doe@exa", which no pattern matches.
CROSSING = 2000 - 12 - len('{"messages": [{"role": "user", "content": "') - 1


def chat(*turns, roles=("user", "assistant")):
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def line(row) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_inputs(folder: Path) -> int:
    """Good rows next to rejected rows that carry PII; returns the number of rejected rows."""
    folder.mkdir()
    good = [line(chat(f"question {i}", f"a helpful answer number {i}")) for i in range(30)]
    rejected = [
        # malformed JSON (cut), bad encoding, unknown role whose value is PII (it is in the
        # detail too), too long (the raw text, not the scrubbed one, is what is shown)
        f'{{"messages": [{{"role": "user", "content": "mail {EMAIL} or call {PHONES[0]}"',
        line(chat(f"card {CARDS[0]} and ip {IPS[0]}")).replace("card", "c\udce9rd"),
        line({"messages": [{"role": EMAIL, "content": f"from {IPS[1]}"}]}),
        line(chat(f"call {PHONES[1]} " + "x" * 400, "ok")),
        line(chat(f"{FULL_WIDTH_PHONE} and {PHONES[2]}", "hi", f"{CARDS[1]}")),  # no assistant end
        line({"text": f"write to {EMAIL_2}", "label": EMAIL}),  # unknown label / other task
        line(chat("y" * CROSSING + f" {EMAIL}")),  # the address crosses the 2,000-character cut
        good[0],  # an exact duplicate: its quarantined copy comes from the scrubbed row
    ]
    body = "\n".join(good[:10] + rejected + good[10:20]) + "\n"
    (folder / "a.jsonl").write_bytes(body.encode("utf-8", "surrogateescape"))
    (folder / "b.csv").write_text(
        "prompt,completion\n"
        + "".join(f"csv question {i},csv answer {i}\n" for i in range(5))
        + f"only one field from {IPS[0]} and {EMAIL}\n",
        encoding="utf-8",
    )
    (folder / "c.json").write_text(
        "[\n" + ",\n".join(good[20:25]) + "\n]\n" + line(chat(f"after the array {CARDS[0]}")),
        encoding="utf-8",
    )
    tail = random.Random(0).randbytes(100).hex()  # incompressible: the cut falls in it
    cut = gzip.compress((f'{good[25]}\n{{"messages": "{PHONES[1]} {EMAIL} {tail}"}}\n').encode())
    (folder / "d.jsonl.gz").write_bytes(cut[:-12])  # the stream ends inside the last line
    return len(rejected) + 3


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def config(folder: Path, **extra) -> DataConfig:
    return DataConfig(
        data_uri=str(folder), max_bad_fraction=1.0, max_chars=300, label_map="neg,pos", **extra
    )


def test_rejected_rows_are_scrubbed_in_quarantine_and_report(tmp_path):
    bad_rows = write_inputs(tmp_path / "in")
    report = clean.run(
        config(tmp_path / "in"), tmp_path / "c.jsonl", tmp_path / "q.jsonl", tmp_path / "r.html"
    )
    quarantine = (tmp_path / "q.jsonl").read_text(encoding="utf-8")
    assert len(read_jsonl(tmp_path / "q.jsonl")) == sum(report.dropped.values()) >= bad_rows
    for placeholder in ("<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IP_ADDRESS>"):
        assert placeholder in quarantine  # the rows are there, scrubbed
    assert leaks(quarantine) == []
    assert leaks((tmp_path / "r.html").read_text(encoding="utf-8")) == []
    assert leaks((tmp_path / "c.jsonl").read_text(encoding="utf-8")) == []


def test_without_scrubbing_the_quarantine_keeps_raw_text(tmp_path):
    """The opposite check (the test above can fail): scrub_pii=none shows rows as they are."""
    write_inputs(tmp_path / "in")
    clean.run(config(tmp_path / "in", scrub_pii="none"), tmp_path / "c.jsonl", tmp_path / "q.jsonl")
    assert EMAIL in (tmp_path / "q.jsonl").read_text(encoding="utf-8")


def test_the_error_line_of_a_failed_clean_has_no_pii(tmp_path):
    write_inputs(tmp_path / "in")
    with pytest.raises(SftpipeError) as caught:
        clean.run(
            config(tmp_path / "in").model_copy(update={"max_bad_fraction": 0.0}),
            tmp_path / "c.jsonl",
            tmp_path / "q.jsonl",
            tmp_path / "r.html",
        )
    assert "rows are bad" in str(caught.value) and leaks(str(caught.value)) == []
    assert leaks((tmp_path / "r.html").read_text(encoding="utf-8")) == []


class Artifact:
    def __init__(self, path):
        self.path, self.uri, self.metadata = str(path), str(path), {}

    def log_metric(self, key, value):
        self.metadata[key] = value


def test_nothing_of_the_rejected_rows_reaches_mlflow(tmp_path, mlflow_env, monkeypatch):
    write_inputs(tmp_path / "in")
    key = f"pii-{uuid.uuid4().hex}"
    monkeypatch.setenv(RUN_ID_ENV, key)
    params = PipelineConfig.from_flat(
        {
            "data_uri": str(tmp_path / "in"),
            "max_bad_fraction": 1.0,
            "max_chars": 300,
            "label_map": "neg,pos",
            "mlflow_experiment": "pii",
        }
    ).flat()
    outputs = {n: Artifact(tmp_path / n) for n in ("cleaned", "quarantine", "metrics", "report")}
    steps.clean(params, **outputs)

    tracker = open_run("pii", key)
    run = tracker.client.get_run(tracker.run_id)
    shown = json.dumps(
        [run.data.params, run.data.tags, run.data.metrics, outputs["cleaned"].metadata]
    )
    downloaded = Path(tracker.client.download_artifacts(tracker.run_id, "", str(tmp_path / "dl")))
    files = [p for p in downloaded.rglob("*") if p.is_file()]
    assert any(p.name == "clean.html" for p in files)  # the report did go to MLflow
    for path in files:
        assert leaks(path.read_text(encoding="utf-8", errors="replace")) == [], path
    assert leaks(shown) == []

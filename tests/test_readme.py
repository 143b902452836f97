"""The README opens with the two commands for a fresh machine, then what the pipeline does and
how to use the result; the rest lives in docs/ (tests/test_docs.py)."""

from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_starts_with_run_and_test_commands():
    head = README.split("## What the pipeline does")[0]
    assert "make run" in head and "make test" in head
    first_block = README.split("```bash")[1].split("```")[0]
    assert first_block.lstrip().startswith("make run") and "\nmake test" in first_block


def test_the_first_screen_says_what_happens_and_how_to_use_it():
    sections = [line for line in README.splitlines() if line.startswith("## ")]
    assert sections[:3] == [
        "## On a fresh machine",
        "## What the pipeline does",
        "## Using the result",
    ]
    # The stage table is a summary: a cell of one or two lines, the details in docs/.
    table = [line for line in README.splitlines() if line.startswith("| **")]
    assert [row.split("**")[1] for row in table] == [
        "clean",
        "tokenize",
        "finetune",
        "evaluate",
        "register",
    ]
    assert all(len(row) < 320 for row in table), max(table, key=len)
    assert len(README) < 10_000

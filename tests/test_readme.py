"""The README opens with the two commands for a fresh machine and documents every parameter."""

from pathlib import Path

from sftpipe.config import FIELDS, PipelineConfig

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_starts_with_run_and_test_commands():
    head = README.split("## What the pipeline does")[0]
    assert "make run" in head and "make test" in head


def test_every_parameter_is_documented_with_its_default():
    defaults = PipelineConfig().flat()
    for name in FIELDS:
        row = next((line for line in README.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert row, f"README has no row for {name}"
        assert f"`{defaults[name]!r}`" in row, f"README shows a stale default for {name}"

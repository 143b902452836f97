"""docs/: parameters.md is the generator's output for the current config, and every relative
link in the README and docs/ points at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

from sftpipe.apps import docgen
from sftpipe.config import FIELDS, PipelineConfig

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_parameters_page_is_generated_from_the_config():
    committed = (ROOT / "docs" / "parameters.md").read_text(encoding="utf-8")
    assert committed == docgen.parameters_markdown(), "stale: run `make docs`"


def test_every_parameter_has_a_row_with_its_default_and_flag():
    page = (ROOT / "docs" / "parameters.md").read_text(encoding="utf-8")
    defaults = PipelineConfig().flat()
    for name in FIELDS:
        (row,) = [line for line in page.splitlines() if line.startswith(f"| `{name}` |")]
        assert f"`{defaults[name]!r}`" in row
        assert f"`--{name.replace('_', '-')}" in row


def test_check_mode_finds_a_stale_page(tmp_path):
    page = tmp_path / "parameters.md"
    assert docgen.main(["--output", str(page)]) == 0
    assert docgen.main(["--output", str(page), "--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("`0.0001`", "`0.001`"))
    assert docgen.main(["--output", str(page), "--check"]) == 1


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("<"):
                continue  # http(s)://, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [
        page.name
        for page in sorted((ROOT / "docs").glob("*.md"))
        if page.name != "README.md" and f"]({page.name})" not in index
    ]
    assert not missing, f"add them to docs/README.md: {missing}"

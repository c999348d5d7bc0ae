"""The docs, the README, the examples and the docstrings speak of the project, never of how it was developed:
no issue numbers, no work sessions, no contributors, no "when this was written"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "an issue number": r"\bissues?\s*#?\d+",
    "a work session": r"\bsessions?\b",
    "a contributor": r"\b(?:helpers?|engineers?|h\d+)(?:'s)?\s+(?:h\d+\b|new\b|recipe\b)|\bengineers?\b",
    "how the docs were made": r"at the time of writing|when this (?:page|section) was written|for this page\b|"
                              r"development machine|new this (?:round|time)",
}
FILES = sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("examples/*.py"),
                *ROOT.glob("src/factlens/**/*.py"), *ROOT.glob("benchmarks/*.py")])


def _hits(text: str) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for what, pattern in FORBIDDEN.items()
            for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_words_about_how_the_project_was_developed(path):
    lines = [f"line {i}: {h}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for h in _hits(line)]
    assert not lines, "\n".join(lines)


def test_the_check_catches_what_it_is_for():
    for text in ("as measured in issue 19", "(issue #16)", "not measured in this session",
                 "Helper h5's new demo recipe", "on the development machine", "h5's recipe"):
        assert _hits(text), text
    for text in ("see the issues page", "the training loop", "one helper function", "20 engines"):
        assert not _hits(text), text


def test_home_page_code_fits_the_page():
    """Code blocks on the home page wrap before the theme's content width (no horizontal scrolling)."""
    inside, long = False, []
    for i, line in enumerate((ROOT / "docs" / "index.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif inside and len(line) > 88:
            long.append(f"line {i} ({len(line)} characters)")
    assert not long, long


def test_navigation_has_the_examples_and_a_real_capitals_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert "examples.md" in nav
    examples = (ROOT / "docs" / "examples.md").read_text()
    for path in sorted(ROOT.glob("examples/*.ipynb")):
        assert f"examples/{path.name}" in examples
    capitals = (ROOT / "docs" / "api" / "capitals.md").read_text()
    assert len(capitals.split()) > 250 and "::: factlens.capitals" in capitals  # a guide and its API, not a redirect


def test_every_docs_image_is_used():
    pages = "".join(p.read_text() for p in [*ROOT.glob("docs/**/*.md"), ROOT / "README.md"])
    unused = [p.name for p in (ROOT / "docs" / "img").iterdir() if p.name not in pages]
    assert not unused, unused

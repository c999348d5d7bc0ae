"""docs/index.md's architecture section lists every module of the package, and only modules that exist.

The list is the bullet list under the "Modules" heading inside "## Architecture": one bullet per package,
``- `factlens.pkg`: `module`, `module`, ...`` (a bullet may wrap onto indented lines). A package's bullet lists
the package itself; ``__main__`` modules are entry points, not listed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _section(text: str, heading: str, level: int) -> str:
    """The body of the first ``heading`` of this level, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"{'#' * level} {heading}"), None)
    assert start is not None, f"docs/index.md has no '{'#' * level} {heading}' heading"
    body = []
    for line in lines[start + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def listed_modules(markdown: str) -> list[str]:
    """Dotted module names of the architecture section's module list, in order (duplicates kept)."""
    arch = _section(markdown, "Architecture", 2)
    modules = _section(arch, "Modules", 3)
    bullets = re.split(r"\n(?=- )", "\n" + modules)
    names = []
    for bullet in bullets:
        if not bullet.startswith("- "):
            continue
        m = re.match(r"- `([\w.]+)`:(.*)", bullet, flags=re.S)
        assert m, f"a bullet of the module list does not read '- `package`: `module`, ...': {bullet[:80]!r}"
        package, rest = m.group(1), m.group(2)
        names.append(package)
        names += [f"{package}.{name}" for name in re.findall(r"`(\w+)`", rest)]
    return names


def existing_modules(src: Path = SRC) -> set[str]:
    """Every module and package under ``src/factlens``, read from the files (nothing is imported)."""
    found = set()
    for path in (src / "factlens").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.add(".".join(parts))
    return found


def test_architecture_section_lists_exactly_the_existing_modules():
    listed = listed_modules((ROOT / "docs" / "index.md").read_text())
    assert listed, "the architecture section's module list is empty"
    duplicates = sorted({n for n in listed if listed.count(n) > 1})
    assert not duplicates, f"listed twice in docs/index.md: {duplicates}"
    existing = existing_modules()
    missing = sorted(existing - set(listed))
    stale = sorted(set(listed) - existing)
    assert not missing and not stale, (f"docs/index.md's architecture section misses modules under src/factlens: "
                                       f"{missing}; and lists modules that do not exist: {stale}")


def test_the_parser_reads_wrapped_bullets_and_sees_a_missing_module(tmp_path):
    doc = ("## Architecture\n\ntext\n\n### Modules\n\n- `factlens`: `a`,\n  `b`\n- `factlens.p`: `c`\n\n## Next\n"
           "- `factlens.q`: `d`\n")
    assert listed_modules(doc) == ["factlens", "factlens.a", "factlens.b", "factlens.p", "factlens.p.c"]
    pkg = tmp_path / "factlens"
    (pkg / "p").mkdir(parents=True)
    for f in ("__init__.py", "a.py", "b.py", "p/__init__.py", "p/c.py", "p/__main__.py", "p/extra.py"):
        (pkg / f).write_text("")
    assert existing_modules(tmp_path) - set(listed_modules(doc)) == {"factlens.p.extra"}


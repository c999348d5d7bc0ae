"""Griffe extension for the docs build: adapt factlens docstrings to mkdocstrings without editing them.

- factlens docstrings open their doctest blocks with ``Example:`` (singular). Griffe's Google parser only
  knows ``Examples:``; it would render ``Example:`` as a Markdown admonition, where ``>>>`` lines become
  nested block quotes and outputs like ``[8, 8, 4]`` become broken reference links. The header is renamed
  so the blocks render as highlighted Python console code.
- Sphinx roles (``:class:`~factlens.x.Y```, ``:func:`name```, ``:mod:`...```) become optional autorefs
  cross-references: a link when the target is documented somewhere in the site, plain code otherwise
  (optional references never fail ``mkdocs build --strict``).

Source files are untouched (doctests and ``help()`` read the docstrings as written).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:(\s*)$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj):`(?P<body>[^`]+)`")
_EXPLICIT = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")


def _canonical(pkg: griffe.Module, path: str) -> str:
    """``path`` with re-exports followed to where the object is defined (``factlens.bios.Population`` ->
    ``factlens.bios.data.population.Population``), so the link lands on the rendered definition."""
    head, _, rest = path.partition(".")
    if head != pkg.name or not rest:
        return path
    try:
        member = pkg.get_member(rest)
        return member.final_target.path if member.is_alias else member.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError, KeyError, ValueError):
        return path


def _qualify(pkg: griffe.Module, obj: griffe.Object, target: str) -> str:
    """Full dotted path of ``target`` as written in ``obj``'s docstring (best effort)."""
    if target == pkg.name or target.startswith(f"{pkg.name}."):
        return _canonical(pkg, target)
    first, _, rest = target.partition(".")
    try:
        base = obj.resolve(first)
    except (griffe.NameResolutionError, AttributeError, KeyError):
        base = f"{obj.module.path}.{first}"
    return _canonical(pkg, f"{base}.{rest}" if rest else base)


def _role_to_autoref(pkg: griffe.Module, obj: griffe.Object, match: re.Match[str]) -> str:
    body = match["body"].strip()
    if explicit := _EXPLICIT.match(body):
        title, target = explicit["title"], explicit["target"].lstrip("~")
    elif body.startswith("~"):
        target = body[1:]
        title = target.rsplit(".", 1)[-1]
    else:
        target = title = body
    ident = html.escape(_qualify(pkg, obj, target.lstrip(".")), quote=True)
    return f'<autoref identifier="{ident}" optional><code>{html.escape(title)}</code></autoref>'


def _fix(pkg: griffe.Module, obj: griffe.Object) -> None:
    if obj.docstring is not None:
        value = _EXAMPLE_HEADER.sub(r"\1Examples:\2", obj.docstring.value)
        obj.docstring.value = _ROLE.sub(lambda m: _role_to_autoref(pkg, obj, m), value)
    for member in obj.members.values():
        if not member.is_alias:
            _fix(pkg, member)


class FactlensDocstrings(griffe.Extension):
    """Rename ``Example:`` headers and turn Sphinx roles into optional cross-references."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _fix(pkg, pkg)

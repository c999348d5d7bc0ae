"""The README's Python snippets run as written, and the CLI documents every option.

Every ```python block of README.md is executed in a fresh namespace, in a temporary working directory. Snippets
that need real weights or hours of training get the documented substitutions in :data:`SUBSTITUTIONS` (a
random-weight twin for ``factlens.load``, the ``tiny`` training preset for ``small``); nothing else is changed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: What CI changes in a snippet, and why: no hub access, and minutes rather than hours.
SUBSTITUTIONS = [
    ('factlens.load("gpt2")', 'factlens.tiny("gpt2")'),          # no weights offline: the random twin
    ('TrainConfig.preset("small"', 'TrainConfig.preset("tiny", steps=10'),  # 10 steps instead of 4k
    ('run.bridge(step=500)', 'run.bridge(step=0)'),  # a checkpoint the tiny run has
    ("capitals.dataset(model, shots=0)", "capitals.dataset(model, shots=0, n=48)"),  # 48 of 225 prompts
    ("shots=[0, 1, 2])", "shots=[0], n=48, folds=2)"),
]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(README.read_text())


def substituted(code: str) -> str:
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def test_readme_has_snippets_and_every_substitution_applies():
    assert len(BLOCKS) >= 3
    text = "\n".join(BLOCKS)
    for old, _ in SUBSTITUTIONS:
        assert old in text, f"substitution {old!r} matches nothing: update SUBSTITUTIONS with the README"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"snippet{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    import plotly.graph_objects as go

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: None)  # no browser in CI
    code = substituted(BLOCKS[index])
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "patched_forward" in code:  # the biography snippet: mismatched tokens are a factlens error, not IndexError
        import factlens
        from factlens.errors import ShapeError

        gpt2_ids = factlens.tiny("gpt2").to_tokens("The capital of France is")
        gpt2_ids[0, -1] = namespace["model"].cfg.d_vocab + 100
        with pytest.raises(ShapeError, match="to_tokens"):
            namespace["patched_forward"](namespace["model"], gpt2_ids,
                                         namespace["Reference"].from_checkpoint("runs/ref", step=10))


def _parsers(parser: argparse.ArgumentParser, prefix: str = "factlens"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}")


def test_every_cli_option_has_help():
    """Every option has a help line (that it states its default exactly once: tests/test_cli_help.py)."""
    from factlens.cli import build_parser

    seen = 0
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or not action.option_strings:
                continue
            seen += 1
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
    assert seen > 30

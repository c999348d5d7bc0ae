"""Docstring examples run in an empty namespace: the repository's conftest.py replaces the module globals pytest
hands each example with ``{"__name__": "__main__", "__builtins__": ...}``."""

from __future__ import annotations

from pathlib import Path

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

MODULE = '''
SECRET = 42


def documented():
    """
    >>> SECRET
    Traceback (most recent call last):
    NameError: name 'SECRET' is not defined
    >>> sorted(k for k in globals() if k != "__builtins__")
    ['__name__']
    >>> __name__
    '__main__'
    >>> len([1, 2])
    2
    """
'''


def _run(pytester, monkeypatch, conftest: str):
    monkeypatch.setenv("FACTLENS_NO_TYPECHECK", "1")
    pytester.makeconftest(conftest)
    pytester.makepyfile(documented_module=MODULE)
    return pytester.runpytest_subprocess("--doctest-modules", "-p", "no:cacheprovider", "-q")


def test_docstring_examples_see_no_module_global(pytester, monkeypatch):
    _run(pytester, monkeypatch, ROOT_CONFTEST.read_text()).assert_outcomes(passed=1)


def test_without_the_hook_pytest_would_hand_examples_the_module_globals(pytester, monkeypatch):
    """The control: the same example fails under plain pytest, so the test above can fail."""
    _run(pytester, monkeypatch, "").assert_outcomes(failed=1)

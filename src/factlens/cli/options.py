"""What every ``factlens`` command shares: the help formatter (one default per option, a description per command)
and the options that several commands take (``--threads``, ``--device``, ``--quiet``).

This module imports nothing heavy, so that ``factlens --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import re

_STATES_DEFAULT = re.compile(r"\b(default|unset)\b", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to an option's help only where the help does not already say what happens by
    default, and never for required options, flags or ``None`` (whose help says what "unset" means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (_STATES_DEFAULT.search(text) or action.required or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _SubParsers(argparse._SubParsersAction):
    """Sub-commands whose ``--help`` opens with their one-line ``help`` when no description is given."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("description") is None and kwargs.get("help"):
            kwargs["description"] = kwargs["help"][:1].upper() + kwargs["help"][1:] + "."
        return super().add_parser(name, **kwargs)


class HelpParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`HelpFormatter`; its sub-commands inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubParsers)


def add_threads(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--threads N``: torch CPU threads (see :mod:`factlens.threads`)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads; unset: $FACTLENS_THREADS, else the free cores of this machine "
                        f"(the cores less its load average){what}, at least 1")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1, ...); unset: CUDA when available, else CPU")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars and no plan before the work")


def add_compute(p: argparse.ArgumentParser, what: str = "") -> None:
    """The options of every command that computes: ``--device``, ``--threads``, ``--quiet``."""
    add_device(p)
    add_threads(p, what)
    add_quiet(p)


def resolve_device(device: str | None) -> str:
    """``--device``, or CUDA when available, else CPU: the one default of every command."""
    if device:
        return device
    from factlens.inputs import default_device

    return str(default_device())

"""The command line as a new user meets it: fast help, a description and one stated default per option,
--threads on every command that computes, "did you mean" on model names, one thread policy."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

import factlens
from factlens import threads
from factlens.cli import build_parser
from factlens.cli import capitals as capitals_cli
from factlens.errors import ConfigError, UnknownModelError
from factlens.threads import ENV, available_cores, default_threads, resolve_threads


def _commands(parser: argparse.ArgumentParser, path=("factlens",)):
    """(command path, parser) for every parser of the tree, leaves and groups."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _leaves():
    return [(p, sub) for p, sub in _commands(build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)]


def test_every_command_has_a_description_and_every_option_one_default():
    for path, parser in _commands(build_parser()):
        assert parser.description, f"{' '.join(path)} --help has no description"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue
            text = formatter._expand_help(action) if action.help else ""
            said = re.findall(r"\b(?:default|unset)\b", text, flags=re.IGNORECASE)
            expected = 0 if action.required else 1
            assert len(said) == expected, f"{' '.join(path)} {action.option_strings[0]}: {text!r}"


def test_every_command_that_computes_takes_threads_device_and_quiet():
    computing = 0
    for path, parser in _leaves():
        options = {s for a in parser._actions for s in a.option_strings}
        if "--device" in options:
            computing += 1
            assert {"--threads", "--quiet"} <= options, " ".join(path)
    assert computing >= 9  # demo, train, patch, grid, reproduce, eval, attention, mechanisms, capitals x2


def test_help_imports_no_torch():
    code = ("import sys\nfrom factlens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_cli_model_list_is_the_supported_list():
    assert tuple(capitals_cli.SUPPORTED_NAMES) == tuple(factlens.SUPPORTED)


@pytest.mark.parametrize("typo, meant", [("gpt2-smal", "gpt2-small"), ("gpt2-mediun", "gpt2-medium"),
                                         ("opt-1.3", "opt-1.3b"), ("GPT2-Large", None)])
def test_misspelt_model_names_get_a_suggestion(typo, meant):
    if meant is None:  # a case variant of a supported name is that name, not a typo
        assert factlens.resolve(typo).name == "gpt2-large"
        return
    with pytest.raises(UnknownModelError, match=re.escape(f"did you mean {meant!r}")):
        factlens.load(typo)
    with pytest.raises(UnknownModelError, match=re.escape(f"did you mean {meant!r}")):
        factlens.resolve(typo)


def test_cli_says_did_you_mean(capsys):
    from factlens.cli import main

    assert main(["capitals", "analyze", "--model", "gpt2-smal", "--out", "unused", "--quiet"]) == 2
    assert "did you mean 'gpt2-small'" in capsys.readouterr().err


def test_thread_policy(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cores = available_cores()
    assert 1 <= default_threads() <= cores
    assert default_threads(concurrent=cores) == 1  # one thread per concurrent cell when cells fill the cores
    monkeypatch.setattr(threads, "_runnable_now", lambda: cores + 5)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert default_threads() == 1  # a busy machine gets one thread, never zero
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    monkeypatch.setattr(threads, "_runnable_now", lambda: 0)
    assert default_threads() == cores  # the average still counts a job that has just ended: nothing runs now
    monkeypatch.setattr(threads, "_runnable_now", lambda: None)
    assert default_threads() == 1  # no running count (not Linux): the average alone
    monkeypatch.setenv(ENV, "3")
    assert default_threads() == 3 and resolve_threads(None) == 3 and resolve_threads(2) == 2
    for bad in ("0", "two"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ConfigError, match=ENV):
            default_threads()
    with pytest.raises(ConfigError, match="integer >= 1"):
        resolve_threads(0)


def test_cli_threads_apply_during_the_command_and_are_restored(monkeypatch):
    from factlens.cli import main

    seen = []
    before = torch.get_num_threads()
    args = build_parser().parse_args(["bios", "eval", "--run", "x", "--threads", "3"])
    args.func = lambda a: seen.append(torch.get_num_threads()) or 0
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: args)
    assert main([]) == 0
    assert seen == [3] and torch.get_num_threads() == before

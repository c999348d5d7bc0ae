"""``factlens capitals analyze|mitigate``: the Lv et al. analysis and mitigation table from the command line.

Model names: the supported hub models (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``opt-1.3b``; ``all`` = the
four), or offline random-weight twins for trying the pipeline without weights: ``tiny-gpt2``, ``tiny-opt`` and
``random-<name>`` (the full-size config, random weights).

Example:
    $ factlens capitals mitigate --model gpt2 --shots 0 1 2 --out out/mitigate
    $ factlens capitals analyze --model all --shots 0 --out out/analysis
"""

from __future__ import annotations

import argparse
from pathlib import Path

import factlens

ALL = ("gpt2", "gpt2-medium", "gpt2-large", "opt-1.3b")


def build_model(name: str, device: str | None = None):
    """A bridge for a CLI model name (compatibility mode on, as the Lv analyses need)."""
    if name.startswith("tiny-"):
        return factlens.tiny(name.removeprefix("tiny-"), compat=True, device=device)
    if name.startswith("random-"):
        return factlens.full_size(name.removeprefix("random-"), compat=True, device=device)
    return factlens.load(name, device=device)


def model_names(requested: list[str]) -> list[str]:
    names: list[str] = []
    for name in requested:
        names.extend(ALL if name == "all" else [name])
    return names


def run(args: argparse.Namespace) -> int:
    from factlens.capitals.mitigate import mitigation_table
    from factlens.capitals.report import analyze

    out = Path(args.out)
    for name in model_names(args.model):
        model = build_model(name, args.device)
        target = out / name if len(args.model) > 1 or args.model == ["all"] else out
        if args.capitals_command == "analyze":
            for shots in args.shots:
                folder = target / f"{shots}shot" if len(args.shots) > 1 else target
                report = analyze(model, shots=shots, out_dir=folder)
                print(f"{name}, {shots}-shot: {folder / 'index.html'}")
                print(report.summary())
        else:
            table = mitigation_table(model, shots=args.shots)
            target.mkdir(parents=True, exist_ok=True)
            table.to_csv(target / "mitigation.csv")
            (target / "mitigation.md").write_text(table.to_markdown())
            table.plot().write_html(target / "mitigation.html")
            print(f"{name}:\n{table.to_markdown()}\nwritten to {target}")
        del model
    return 0

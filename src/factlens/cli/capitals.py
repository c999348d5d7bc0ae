"""``factlens capitals analyze|mitigate``: the Lv et al. analysis and mitigation table from the command line.

``--model`` takes what :func:`factlens.load` takes: a supported name (``gpt2``, ``gpt2-medium``, ``gpt2-large``,
``opt-1.3b``; ``all`` = the four) or any HF id of a GPT-2/OPT checkpoint (from the HF cache, else the hub), a local
``save_pretrained`` folder, or an HF cache folder (``models--org--name`` or its ``snapshots/<hash>``). Offline
random-weight twins try the pipeline without weights: ``tiny-gpt2``, ``tiny-opt`` and ``random-<name>`` (the
full-size config, random weights). Every model runs in compatibility mode, as the Lv analyses require.

Example:
    $ factlens capitals mitigate --model gpt2 --shots 0 1 2 --out out/mitigate
    $ factlens capitals analyze --model all --shots 0 --out out/analysis
    $ factlens capitals analyze --model ~/checkpoints/my-gpt2 --out out/mine
    $ factlens recall analyze --relation developers --model gpt2 --out out/developers

``--relation`` picks a ready relation (:data:`factlens.recall.catalog.RELATIONS`: ``capitals``, ``languages``,
``currencies``, ``developers``, ``city-countries``...); ``factlens recall`` is the same command group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from factlens.cli.options import add_compute

SUPPORTED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "opt-1.3b")  # factlens.models.SUPPORTED (checked in tests)


def build_model(name: str, device: str | None = None):
    """A bridge for a CLI model name, folder or HF id (compatibility mode on, as the Lv analyses need)."""
    import factlens

    if not Path(name).expanduser().exists():
        if name.startswith("tiny-"):
            return factlens.tiny(name.removeprefix("tiny-"), compat=True, device=device)
        if name.startswith("random-"):
            return factlens.full_size(name.removeprefix("random-"), compat=True, device=device)
    return factlens.load(name, device=device, compat=True)


def _label(name: str) -> str:
    """A folder name for a model: its last path component for folders and HF ids."""
    return Path(name.rstrip("/")).name or name


def output_folders(names: list[str]) -> dict[str, str]:
    """One folder name per model, unique and stable: the last path component, with as many parent components as
    it takes to tell models apart (``A/model``, ``B/model`` → ``A-model``, ``B-model``). The same model twice is
    refused, since its second table would overwrite the first.

    Example:
        >>> from factlens.cli.capitals import output_folders
        >>> output_folders(["gpt2", "runs/A/model", "runs/B/model"])
        {'gpt2': 'gpt2', 'runs/A/model': 'A-model', 'runs/B/model': 'B-model'}
    """
    from factlens.errors import ConfigError

    parts = {n: [p for p in Path(n.rstrip("/")).parts if p not in ("/", ".", "")] or [n] for n in names}
    seen: dict[str, str] = {}
    for n in names:
        key = str(Path(n).expanduser().resolve()) if Path(n).expanduser().exists() else n
        if key in seen:
            raise ConfigError(f"--model lists {seen[key]!r} and {n!r}, which are the same model: its second result "
                              "would overwrite the first. List each model once.")
        seen[key] = n
    depth = dict.fromkeys(names, 1)
    while True:
        labels = {n: "-".join(parts[n][-depth[n]:]) for n in names}
        clash = {n for n in names if list(labels.values()).count(labels[n]) > 1}
        if not clash:
            return labels
        grow = {n for n in clash if depth[n] < len(parts[n])}
        if not grow:
            raise ConfigError(f"the models {sorted(clash)} would write to the same output folder "
                              f"{labels[next(iter(clash))]!r}; run them with separate --out folders.")
        for n in grow:
            depth[n] += 1


def model_names(requested: list[str]) -> list[str]:
    names: list[str] = []
    for name in requested:
        names.extend(SUPPORTED_NAMES if name == "all" else [name])
    return names


def run(args: argparse.Namespace) -> int:
    from factlens.recall.catalog import relation
    from factlens.recall.mitigation import mitigation_table
    from factlens.recall.report import analyze
    from factlens.storage import check_writable_dir

    rel = relation(getattr(args, "relation", "capitals"))
    names = model_names(args.model)
    several = len(args.model) > 1 or args.model == ["all"]
    labels = output_folders(names)  # refuse colliding folders before any model is built
    out = check_writable_dir(args.out)
    for name in names:
        model = build_model(name, args.device)
        target = out / labels[name] if several else out
        if args.capitals_command == "analyze":
            for shots in args.shots:
                folder = target / f"{shots}shot" if len(args.shots) > 1 else target
                if not args.quiet:
                    from factlens.bios.estimate import format_seconds
                    from factlens.recall.report import estimate_analysis

                    one_pass, total = estimate_analysis(model, rel, shots=shots)
                    print(f"factlens capitals analyze: {name}, {rel.name}, {shots}-shot: logit lens, path patching, "
                          f"mover heads, MLP decomposition, final layer, mitigation table\n"
                          f"  time:  about {format_seconds(total)} on this machine now (a forward pass of the "
                          f"prompts measured: {one_pass:.2f} s)\n  where: {folder / 'report.html'} (each stage "
                          "timed in the report)", flush=True)
                report = analyze(model, rel, shots=shots, out_dir=folder, progress=not args.quiet)
                print(f"{name}, {rel.name}, {shots}-shot: report {folder / 'report.html'}")
                print(report.to_markdown())
        else:
            table = mitigation_table(model, rel, shots=args.shots, progress=not args.quiet)
            target.mkdir(parents=True, exist_ok=True)
            from factlens.storage import atomic_write

            table.to_csv(target / "mitigation.csv")
            atomic_write(target / "mitigation.md", table.to_markdown())
            atomic_write(target / "mitigation.html", table.plot().to_html())
            print(f"{name}:\n{table.to_markdown()}\nwritten to {target}")
        del model
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``capitals`` command group on the top-level parser's subparsers."""
    capitals = sub.add_parser("capitals", aliases=["recall"],
                              help="country→capital and other relation recall (Lv et al. 2024)").add_subparsers(
        dest="capitals_command", required=True)
    for name, help_text in (("analyze", "whole analysis → HTML report"), ("mitigate", "mitigation table")):
        p = capitals.add_parser(name, help=help_text)
        p.add_argument("--model", nargs="+", default=["gpt2"],
                       help="gpt2 | gpt2-medium | gpt2-large | opt-1.3b | all | any HF id of a GPT-2/OPT checkpoint | "
                            "a save_pretrained folder | an HF cache folder; tiny-gpt2 / tiny-opt / random-<name> "
                            "for offline random-weight twins")
        p.add_argument("--relation", default="capitals",
                       help="a ready relation of factlens.recall.catalog: capitals | capitals-appendix | languages | "
                            "currencies | developers | city-countries")
        p.add_argument("--shots", type=int, nargs="+", default=[0], help="few-shot settings (demonstrations)")
        p.add_argument("--out", required=True, help="output folder (one subfolder per model when several)")
        add_compute(p)
        p.set_defaults(func=run)

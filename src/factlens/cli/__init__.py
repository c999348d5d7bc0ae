"""The ``factlens`` command line.

Examples:
    $ factlens demo                                   # 3 phases of knowledge acquisition on 2 CPU cores
    $ factlens bios train --preset paper --people 64000 --steps 16000 --out runs/paper
    $ factlens bios patch --reference runs/paper --reference-step 8000 --start 0 --out runs/patched
    $ factlens bios grid --preset small --reference-steps 0 500 1000 4000 --starts 0 --out runs/grid
    $ factlens capitals analyze --model gpt2 --shots 0 --out out/gpt2
    $ factlens capitals mitigate --model gpt2 --shots 0 1 2 --out out/mitigate
"""

from __future__ import annotations

import argparse
import os
import sys

from factlens.cli import bios as bios_cli
from factlens.cli import capitals as capitals_cli
from factlens.cli.options import HelpParser
from factlens.errors import FactlensError


def build_parser() -> argparse.ArgumentParser:
    """The ``factlens`` parser: ``demo``, ``bios ...`` (:mod:`factlens.cli.bios`), ``capitals ...``
    (:mod:`factlens.cli.capitals`)."""
    parser = HelpParser(prog="factlens", description="Mechanistic interpretability of factual recall.")
    sub = parser.add_subparsers(dest="command", required=True)
    bios_cli.add_commands(sub)
    capitals_cli.add_commands(sub)
    return parser


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, options every command shares: a device torch does not know (or this machine
    lacks), a thread count below 1, a plateau ratio outside (0, 1)."""
    from factlens.errors import ConfigError
    from factlens.inputs import check_device

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: pass a number of CPU threads >= 1 (e.g. --threads 1).")
    if getattr(args, "plateau_ratio", None) is not None:
        from factlens.bios.phases import check_plateau_ratio

        check_plateau_ratio(args.plateau_ratio)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a factlens error (bad input, a run that will not fit in memory) prints its message and
    returns 2 instead of a traceback (``FACTLENS_TRACEBACK=1`` shows the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        from factlens.threads import use_threads

        check_common_args(args)

        # processes sharing this machine's cores: the ranks torchrun started here, else this one
        concurrent = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        with use_threads(getattr(args, "threads", None), concurrent=max(concurrent, 1)):
            return args.func(args)
    except FactlensError as err:
        if os.environ.get("FACTLENS_TRACEBACK"):
            raise
        print(f"factlens: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

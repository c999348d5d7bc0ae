"""The ``factlens`` command line.

Example:
    $ factlens demo --out out/demo
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    import factlens

    for arch in ("gpt2", "opt"):
        model = factlens.tiny(arch)
        tokens = model.to_tokens("The capital of France is")
        base = model(tokens)
        with factlens.intervene(model, factlens.attend_to_self(model)) as run:
            out = model(tokens)
        change = (out - base).abs().amax(-1)[0]
        fired = {k: v.calls for k, v in run.records.items()}
        print(f"{arch}: last-layer attend-to-self edit fired {fired}; max |Δlogit| per position: "
              f"{[round(float(x), 4) for x in change]}")
        assert torch.equal(change[:-1], torch.zeros_like(change[:-1]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="factlens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo on tiny random-weight models")
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate ``tests/data/bios_demo_run``: the small trained biography run that several tests read.

The run is retrained from the config recorded in the committed run (so the data does not drift when the
``demo`` preset changes), and the chosen checkpoints are copied in with their manifests. Training is
deterministic on CPU, so the result is byte-identical to the committed files on the same torch version.

Usage:
    python scripts/build_bios_demo_run.py                      # the committed steps (the final checkpoint)
    python scripts/build_bios_demo_run.py --keep-steps 0 250 500 750 1000
    python scripts/build_bios_demo_run.py --config my_config.json --out /tmp/demo_run

Tests that read it: tests/test_bios_recall_testbed.py (and any test naming ``bios_demo_run``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from factlens.bios import TrainConfig, train
from factlens.checkpoints import list_checkpoints, step_dir

RUN = Path(__file__).resolve().parents[1] / "tests" / "data" / "bios_demo_run"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", type=Path, default=RUN / "config.json", help="TrainConfig as JSON")
    ap.add_argument("--out", type=Path, default=RUN, help="where the run is written")
    ap.add_argument("--keep-steps", type=int, nargs="*", default=None,
                    help="checkpoints to keep (default: the ones the committed run has)")
    args = ap.parse_args(argv)
    config = TrainConfig.from_dict(json.loads(args.config.read_text()))
    keep = args.keep_steps if args.keep_steps is not None else list_checkpoints(RUN / "checkpoints")
    with tempfile.TemporaryDirectory() as tmp:
        train(config, Path(tmp) / "run", progress=True)
        trained = list_checkpoints(Path(tmp) / "run" / "checkpoints")
        missing = sorted(set(keep) - set(trained))
        if missing:
            raise SystemExit(f"the run has no checkpoint at {missing}; it has {trained}")
        staging = Path(tmp) / "staging"
        (staging / "checkpoints").mkdir(parents=True)
        shutil.copy(Path(tmp) / "run" / "config.json", staging / "config.json")
        for step in keep:
            shutil.copytree(step_dir(Path(tmp) / "run" / "checkpoints", step),
                            step_dir(staging / "checkpoints", step))
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staging, args.out)
    print(f"wrote {args.out}: checkpoints {keep}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

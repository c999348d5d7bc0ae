"""Train the ``recall-testbed`` biography run and ship its final checkpoint as ``tests/data/recall_testbed``.

The recall testbed is a deeper biography model for Lv et al.'s analyses (6 layers × 4 heads, d_model 128,
400 people; the ``recall-testbed`` preset of :data:`factlens.bios.config.RUN_PRESETS`): the run keeps a
checkpoint every 125 steps for ``factlens bios mechanisms``, and its final checkpoint (5.4 MB) is copied into
the test data. Training runs on one CPU thread and is deterministic, so the shipped files are reproduced on the
same torch version. It took 12 min 54 s on one thread of a 2-core machine (docs/mechanisms.md).

Usage:
    python scripts/build_recall_testbed.py --out out/recall_testbed            # train (resumes if interrupted)
    python scripts/build_recall_testbed.py --out out/recall_testbed --ship     # ... and copy the final checkpoint
    factlens bios mechanisms --run out/recall_testbed --out docs/img/recall_testbed   # the docs' analysis
    python scripts/build_recall_testbed.py --out out/r4 --layers 4
                                                       # a candidate recipe (docs/mechanisms.md); not shippable

Tests that read the shipped checkpoint: tests/test_bios_mitigations.py, tests/test_recall_testbed.py.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from factlens.bios import TrainConfig, train
from factlens.checkpoints import list_checkpoints, step_dir
from factlens.threads import use_threads

SHIPPED = Path(__file__).resolve().parents[1] / "tests" / "data" / "recall_testbed"


def ship(run: Path, dest: Path = SHIPPED) -> Path:
    """Copy ``run``'s config and final checkpoint to ``dest`` (replacing it only once the copy is complete)."""
    last = list_checkpoints(run / "checkpoints")[-1]
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staging = Path(tmp) / "run"
        (staging / "checkpoints").mkdir(parents=True)
        shutil.copy(run / "config.json", staging / "config.json")
        shutil.copytree(step_dir(run / "checkpoints", last), step_dir(staging / "checkpoints", last))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/recall_testbed"), help="run folder")
    ap.add_argument("--ship", action="store_true", help=f"copy the final checkpoint to {SHIPPED}")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    recipe = ap.add_argument_group("candidate recipes (override the preset; such a run cannot be shipped)")
    recipe.add_argument("--layers", type=int, help="n_layer (preset: 6)")
    recipe.add_argument("--steps", type=int, help="training steps, the cosine schedule's length")
    recipe.add_argument("--lr", type=float, help="peak learning rate")
    recipe.add_argument("--min-lr", type=float, help="the cosine schedule's floor")
    recipe.add_argument("--beta2", type=float, help="AdamW beta2 (beta1 stays 0.9)")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in dict(steps=args.steps, lr=args.lr, min_lr=args.min_lr).items() if v is not None}
    if args.layers is not None:
        overrides["model"] = dict(n_layer=args.layers)
    if args.beta2 is not None:
        overrides["betas"] = (0.9, args.beta2)
    if overrides and args.ship:
        ap.error("--ship copies the recall-testbed preset only; drop --ship to train a candidate recipe, or change "
                 "the preset in factlens/bios/config.py")
    config = TrainConfig.preset("recall-testbed", **overrides)
    print(f"training the recall-testbed preset ({config.model}, {config.n_people} people, {config.steps} steps) "
          f"on one CPU thread (13 min on a 2-core machine for the preset) into {args.out}")
    t0 = time.perf_counter()
    with use_threads(1):  # one thread: the shipped weights are reproduced bit for bit
        history = train(config, args.out, device="cpu", progress=not args.quiet)
    evals = history.evals
    print(f"trained in {time.perf_counter() - t0:.0f} s; final attribute accuracy "
          f"{float(evals['attr_acc'].iloc[-1]):.3f} (held-out templates)")
    if args.ship:
        print(f"shipped {ship(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

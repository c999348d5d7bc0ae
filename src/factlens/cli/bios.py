"""``factlens demo`` and ``factlens bios ...``: biography training runs, patching, evaluation (Zucchet et al.).

Example:
    $ factlens demo                                   # 3 phases of knowledge acquisition on 2 CPU cores
    $ factlens bios train --preset paper --people 64000 --steps 16000 --out runs/paper
    $ factlens bios patch --reference runs/paper --reference-step 8000 --start 0 --out runs/patched
    $ factlens bios grid --preset small --reference-steps 0 500 1000 4000 --starts 0 --out runs/grid
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path


def _train_config(args: argparse.Namespace):
    from factlens.bios.trainer import TrainConfig

    overrides = {}
    for field, value in (("n_people", args.people), ("steps", args.steps), ("batch_size", args.batch_size),
                         ("lr", args.lr), ("seed", args.seed), ("arch", args.arch), ("compile", args.compile or None)):
        if value is not None:
            overrides[field] = value
    if args.sampler:
        overrides["sampler"] = json.loads(args.sampler)
    return TrainConfig.preset(args.preset, **overrides)


def _write_curves(history, out: Path) -> None:
    fig = history.plot()
    fig.write_html(out / "curves.html")
    with contextlib.suppress(Exception):  # kaleido/Chrome not installed: the HTML is the figure
        fig.write_image(out / "curves.png")


def _summarise(history) -> str:
    ev = history.evals
    end = history.plateau_end()
    return (f"attribute loss {ev['attr_loss'].iloc[0]:.2f} → {ev['attr_loss'].iloc[-1]:.3f} nats "
            f"(no-knowledge baseline {history.baseline:.3f}); accuracy {ev['attr_acc'].iloc[-1]:.3f}; "
            f"plateau end: {end if end is not None else 'not reached'}")


def cmd_train(args: argparse.Namespace, config=None) -> int:
    from factlens.bios.trainer import train

    config = config or _train_config(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    history = train(config, out, device=args.device, progress=not args.quiet)
    _write_curves(history, out)
    print(f"{out}: {_summarise(history)}; {time.perf_counter() - t0:.0f} s; figure {out / 'curves.html'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.preset = "demo"
    return cmd_train(args)


def cmd_patch(args: argparse.Namespace) -> int:
    import dataclasses

    from factlens.bios.runs import run_config
    from factlens.bios.trainer import PatchConfig

    config = run_config(args.reference) if args.same_config else _train_config(args)
    patch = PatchConfig(reference=args.reference, reference_step=args.reference_step, start_patching=args.start,
                        reset_optimizer=not args.keep_optimizer)
    return cmd_train(args, dataclasses.replace(config, patch=patch))


def cmd_grid(args: argparse.Namespace) -> int:
    from factlens.patching.grid import run_grid

    result = run_grid(_train_config(args), args.out, reference_steps=args.reference_steps, start_steps=args.starts,
                      device=args.device, progress=not args.quiet)
    print(result.to_dataframe().to_string(index=False))
    print(f"table {Path(args.out) / 'grid.csv'}, heat-map {Path(args.out) / 'grid.html'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from factlens.bios.runs import checkpoint_path, run_config
    from factlens.bios.trainer import Trainer
    from factlens.checkpoints import load_checkpoint, load_state

    config = run_config(args.run)
    trainer = Trainer(config, Path(args.run), device=args.device, progress=False)
    ckpt = load_checkpoint(checkpoint_path(args.run, args.step))
    load_state(trainer.raw_model, ckpt.state, ckpt.path)
    trainer._sync_patching(ckpt.step)
    print(json.dumps({"step": ckpt.step, **trainer.evaluate()}, indent=1))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from factlens.bios.history import TrainingHistory

    history = TrainingHistory.load(args.run)
    _write_curves(history, Path(args.run))
    print(f"{args.run}: {_summarise(history)}; figure {Path(args.run) / 'curves.html'}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from factlens.patching.circuits import attention_to_name

    result = attention_to_name(args.run, n_sequences=args.sequences, device=args.device or "cpu",
                               progress=not args.quiet)
    result.to_dataframe().to_csv(Path(args.run) / "attention_to_name.csv", index=False)
    result.plot().write_html(Path(args.run) / "attention_to_name.html")
    print(f"wrote {Path(args.run) / 'attention_to_name.html'}")
    return 0


def cmd_mechanisms(args: argparse.Namespace) -> int:
    import torch

    from factlens.testbeds.mechanisms import check_out, mechanisms, write_mechanisms

    out = check_out(args.out if args.out else Path(args.run) / "mechanisms")  # refuse a bad --out before the work
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = mechanisms(args.run, attributes=args.attributes, steps=args.steps, n=args.prompts,
                            device=args.device or "cpu", progress=not args.quiet)
    finally:
        torch.set_num_threads(threads)
    written = write_mechanisms(result, out)
    print(f"{result!r}\n{result.seconds:.0f} s; wrote {', '.join(str(p) for p in written)}")
    return 0


def _train_args(p: argparse.ArgumentParser, preset: str | None = "demo") -> None:
    p.add_argument("--preset", default=preset, help="paper | small | demo | tiny")
    p.add_argument("--people", type=int, help="population size N")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--arch", choices=["gpt2", "opt"])
    p.add_argument("--sampler", help='JSON, e.g. \'{"kind": "power_law", "alpha": 0.6}\'')
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and the ``bios`` command group on the top-level parser's subparsers."""
    demo = sub.add_parser("demo", help="train the CPU demo run: initial drop, plateau, knowledge emergence")
    _train_args(demo)
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(func=cmd_demo)

    bios = sub.add_parser("bios", help="synthetic biographies (Zucchet et al. 2025)").add_subparsers(
        dest="bios_command", required=True)
    p = bios.add_parser("train", help="train (or resume) a biography run")
    _train_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train)
    p = bios.add_parser("patch", help="train with attention patched from a reference run's checkpoint")
    _train_args(p)
    p.add_argument("--reference", required=True, help="reference run directory (or checkpoint directory)")
    p.add_argument("--reference-step", type=int)
    p.add_argument("--start", type=int, default=0, help="start_patching step")
    p.add_argument("--keep-optimizer", action="store_true", help="do not reset AdamW when patching starts")
    p.add_argument("--same-config", action="store_true", help="reuse the reference run's config")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_patch)
    p = bios.add_parser("grid", help="reference step × start step patching grid (resumable)")
    _train_args(p)
    p.add_argument("--reference-steps", type=int, nargs="+", required=True)
    p.add_argument("--starts", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_grid)
    p = bios.add_parser("eval", help="evaluate a checkpoint of a run")
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int)
    p.add_argument("--device")
    p.set_defaults(func=cmd_eval)
    p = bios.add_parser("plot", help="write a run's learning-curve figure")
    p.add_argument("--run", required=True)
    p.set_defaults(func=cmd_plot)
    p = bios.add_parser("attention", help="attention-to-name analysis over a run's checkpoints")
    p.add_argument("--run", required=True)
    p.add_argument("--sequences", type=int, default=512)
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_attention)
    p = bios.add_parser("mechanisms", help="Lv et al.'s recall mechanisms (movers, MLP intercept, final-layer "
                        "suppression) at every checkpoint of a run, on the training-step axis")
    p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
    p.add_argument("--attributes", nargs="+", help="attributes to analyse (default: all six)")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoint steps (default: all)")
    p.add_argument("--prompts", type=int, default=128, help="held-out-template prompts per attribute")
    p.add_argument("--out", help="output folder (default: RUN/mechanisms)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for the small "
                   "biography models, by far on a shared machine; 0 = torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mechanisms)

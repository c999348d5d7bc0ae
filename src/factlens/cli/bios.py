"""``factlens demo`` and ``factlens bios ...``: biography training runs, patching, evaluation (Zucchet et al.).

Example:
    $ factlens demo                                   # 3 phases of knowledge acquisition on 2 CPU cores
    $ factlens bios train --preset paper --people 64000 --steps 16000 --out runs/paper
    $ factlens bios patch --reference runs/paper --reference-step 8000 --start 0 --out runs/patched
    $ factlens bios grid --preset small --reference-steps 0 500 1000 4000 --starts 0 --out runs/grid
    $ factlens bios reproduce --scale cpu --out runs/reproduce   # the paper's headline experiments + report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from factlens.cli.options import add_compute, add_threads, resolve_device


def _train_config(args: argparse.Namespace, base=None):
    """The preset with the command line's overrides; without --preset, ``base`` (a reference run's config) with
    them, else the demo preset."""
    from factlens.bios.trainer import TrainConfig

    overrides = {}
    for field, value in (("n_people", args.people), ("steps", args.steps), ("batch_size", args.batch_size),
                         ("lr", args.lr), ("seed", args.seed), ("arch", args.arch), ("compile", args.compile or None)):
        if value is not None:
            overrides[field] = value
    if args.sampler:
        overrides["sampler"] = _sampler_json(args.sampler)
    overrides.update(_knob_overrides(args))
    model = overrides.pop("model", {})
    if args.preset is None and base is not None:
        return dataclasses.replace(base, **overrides, model={**base.model, **model})  # checked on construction
    return TrainConfig.preset(args.preset or "demo", model=model, **overrides)


def _knob_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig overrides of the data and robustness options (``model`` holds the model-size ones); values
    are checked by :meth:`TrainConfig.check`, which names the fix for a bad one."""
    out = {}
    for field, value in (("n_train_templates", getattr(args, "templates", None)),
                         ("sentence_order", getattr(args, "sentence_order", None)),
                         ("weight_decay", getattr(args, "weight_decay", None))):
        if value is not None:
            out[field] = value
    if getattr(args, "betas", None) is not None:
        out["betas"] = tuple(args.betas)
    model = {key: value for key, value in (("n_layer", getattr(args, "n_layers", None)),
                                           ("n_head", getattr(args, "n_heads", None)),
                                           ("n_embd", getattr(args, "d_model", None))) if value is not None}
    if "n_embd" in model:
        model["n_inner"] = 4 * model["n_embd"]  # the paper's d_mlp = 4 d_model
    if model:
        out["model"] = model
    return out


def _sampler_json(text: str) -> dict:
    from factlens.errors import ConfigError

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--sampler {text!r} is not valid JSON ({err.msg} at character {err.pos}); write it like "
                          """--sampler '{"kind": "power_law", "alpha": 0.6}' (double quotes inside single ones)."""
                          ) from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--sampler {text!r} is not a JSON object; write it like "
                          """--sampler '{"kind": "power_law", "alpha": 0.6}'.""")
    return spec


def _existing_run(path: str) -> Path:
    """``--run`` as a path, refused (naming the fix) when it is not a directory."""
    from factlens.errors import RunNotFoundError

    run = Path(path)
    if not run.is_dir():
        raise RunNotFoundError(f"--run {path}: {'is a file, not' if run.exists() else 'there is no'} run directory "
                               "there; pass the --out directory of a training run (factlens bios train --out DIR).")
    return run


def _write_curves(history, out: Path) -> None:
    _write_curves_fig(history.plot(), out)


def _write_curves_fig(fig, out: Path) -> None:
    """``curves.html`` and, where this machine can export PNGs (:func:`factlens.figures.png_support`),
    ``curves.png``; a stale ``curves.png`` of an earlier figure is removed when it cannot."""
    from factlens.figures import png_support
    from factlens.storage import atomic_write

    atomic_write(out / "curves.html", fig.to_html())
    if png_support()[0]:
        atomic_write(out / "curves.png", fig.to_image(format="png"))
    else:
        (out / "curves.png").unlink(missing_ok=True)


def _summarise(history) -> str:
    ev = history.evals
    end = history.plateau_end()
    return (f"attribute loss {ev['attr_loss'].iloc[0]:.2f} → {ev['attr_loss'].iloc[-1]:.3f} nats "
            f"(no-knowledge baseline {history.baseline:.3f}); accuracy {ev['attr_acc'].iloc[-1]:.3f}; "
            f"plateau end: {end if end is not None else 'not reached'}")


def _keep_last_checkpoint(out: Path) -> None:
    """``--keep-checkpoints last``: delete every evaluation checkpoint but the final one, and every resume
    checkpoint but the newest (the run stays finished: a re-run writes nothing)."""
    from factlens.checkpoints import prune_checkpoints

    prune_checkpoints(out / "checkpoints", 1)
    prune_checkpoints(out / "resume", 1)


def cmd_train(args: argparse.Namespace, config=None, what: str | None = None) -> int:
    import torch

    from factlens.bios.estimate import measure, plan
    from factlens.bios.run import Run, pin_reference
    from factlens.bios.tracking import make_tracker
    from factlens.bios.trainer import Trainer

    config = pin_reference(config or _train_config(args))  # a patching reference by its checksum
    out = Path(args.out)
    Run(out).check(config)  # refuse a bad --out before building anything
    tracker = make_tracker(args.log_to, out, config)
    t0 = time.perf_counter()
    trainer = Trainer(config, out, device=args.device, progress=not args.quiet, tracker=tracker)
    keep = getattr(args, "keep_checkpoints", "all")
    if not args.quiet and trainer.rank == 0 and not Run(out).finished(config):
        what = what or (f"factlens bios {getattr(args, 'bios_command', 'train')}: train a {config.n_people:,}-person biography run "
                        f"({config.arch}, {config.steps:,} steps)")
        print(plan(what, measure(trainer), out, device=trainer.device, threads=torch.get_num_threads(), keep=keep),
              flush=True)
    history = trainer.run()
    if keep == "last" and trainer.rank == 0:
        _keep_last_checkpoint(out)
    _write_curves(history, out)
    print(f"{out}: {_summarise(history)}; {time.perf_counter() - t0:.0f} s; figure {out / 'curves.html'}")
    return 0


def demo_figure(history, phases: dict):
    """The demo's learning curves with the three phases of :func:`~factlens.bios.phases.three_phases` shaded."""
    p, base = phases, history.baseline
    # linear and zoomed on the baseline, so that the plateau's ±3% band is visible (the drop starts off-scale)
    fig = history.plot("factlens demo: 1 drop to the baseline, 2 plateau (within ±3% of it), 3 knowledge emergence",
                       loss_range=(0, 2 * base))
    if p["drop_end"] is not None:
        for x0, x1, name, colour in [(0, p["drop_end"], "1 drop", "#9ecae1"),
                                     (p["drop_end"], p["plateau_end"], "2 plateau", "#fdd0a2"),
                                     (p["plateau_end"], int(history.evals["step"].max()), "3 emergence", "#c7e9c0")]:
            for col in (1, 2):  # the phase names on the loss panel only (plotly labels "new text" otherwise)
                label = dict(annotation_text=name, annotation_position="top left") if col == 1 else {}
                fig.add_vrect(x0=x0, x1=x1, fillcolor=colour, opacity=0.35, line_width=0, row=1, col=col, **label)
    band = p["band"]
    fig.add_hrect(y0=(1 - band) * base, y1=(1 + band) * base, fillcolor="#636363", opacity=0.15, line_width=0,
                  row=1, col=1)
    fig.update_yaxes(title_text="attribute loss (nats; grey: ±3% band)", row=1, col=1)
    return fig


def cmd_demo(args: argparse.Namespace) -> int:
    from factlens.bios.run import Run

    args.preset = "demo"
    t0 = time.perf_counter()
    config = _train_config(args)
    code = cmd_train(args, config, what=f"factlens demo: train a {config.n_people:,}-person biography run "
                                        f"({config.steps:,} steps) and shade its three phases")
    run = Run(args.out)
    history, p = run.history, run.phases()
    fig = demo_figure(history, p)
    _write_curves_fig(fig, Path(args.out))
    if p["drop_end"] is None:
        print(f"phases: the loss never came within ±3% of the baseline; final accuracy {p['final_acc']:.3f}")
    else:
        touch = (f" (it first touched the band at step {p['first_in_band']})"
                 if p["first_in_band"] != p["drop_end"] else "")
        print(f"phases: drop to the baseline by step {p['drop_end']}{touch}, within ±3% of it until step "
              f"{p['plateau_end']} ({p['plateau_steps']} steps), final accuracy {p['final_acc']:.3f}; "
              f"{time.perf_counter() - t0:.0f} s")
    if getattr(args, "check", False):
        ok = p["drop_end"] is not None and p["plateau_steps"] >= p["drop_end"] and p["final_acc"] >= 0.8
        print("demo check: " + ("the three phases are there" if ok else
                                "FAILED: need a plateau at least as long as the drop and final accuracy >= 0.8"))
        return code or (0 if ok else 1)
    return code


def cmd_patch(args: argparse.Namespace) -> int:
    from factlens.bios.patching.config import PatchConfig
    from factlens.bios.run import reference_config

    patch = PatchConfig(reference=args.reference, reference_step=args.reference_step, start_patching=args.start,
                        reset_optimizer=not args.keep_optimizer)
    if args.same_config:
        args.preset = None
    # without --preset the run takes the reference's config (same model, data and schedule), with any overrides
    base = reference_config(args.reference, args.reference_step) if args.preset is None else None
    return cmd_train(args, dataclasses.replace(_train_config(args, base), patch=patch))


def _executor(args: argparse.Namespace):
    """The executor settings: ``--executor-config FILE`` with the command line's values over it."""
    from factlens.bios.executor import ExecutorConfig
    from factlens.errors import ConfigError

    ex = ExecutorConfig.from_file(args.executor_config) if args.executor_config else ExecutorConfig()
    sbatch = dict(ex.sbatch)
    for item in args.sbatch or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--sbatch {item!r}: write KEY=VALUE, e.g. --sbatch account=mylab --sbatch qos=high.")
        sbatch[key.lstrip("-")] = value
    return ex.updated(kind=args.executor, partition=args.partition, gpus_per_job=args.gpus_per_job,
                      cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min,
                      array_parallelism=args.array_parallelism, sbatch=sbatch, workers=args.workers,
                      log_to=getattr(args, "log_to", None))


def _print_cells(report) -> int:
    """Print the cells that failed or are not finished; 1 when a cell failed, else 0."""
    counts = {}
    for s in report.statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    print("cells: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    for s in report.statuses:
        if s.state != "finished":
            print(s.describe())
    return 1 if report.failed else 0


def _not_finished(err) -> int:
    """Cells are queued or running (``--no-wait``): say so, exit 0. Otherwise (failed, or not started with
    ``--collect``) the error stands, after the cells' states."""
    _print_cells(err.report)
    if err.report.waiting and not err.report.failed:
        print(err)
        return 0
    raise err


def _executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the cells train (local, or a SLURM job array through submitit)")
    g.add_argument("--executor", choices=["local", "slurm"], help="local (default): this machine, one cell at a "
                   "time (--workers K: K at once; one per GPU with several GPUs); slurm: one job per cell, as a job array")
    g.add_argument("--executor-config", help="TOML or JSON file of executor settings (the options below, with "
                   "underscores); command-line values win; unset: none")
    g.add_argument("--partition", help="SLURM partition; unset: the executor config's value, else the executor's own")
    g.add_argument("--gpus-per-job", type=int, help="GPUs per SLURM job (one cell per job); unset: the executor config's value, else the executor's own")
    g.add_argument("--workers", type=int, help="local: cells trained at once, each in its own process with its "
                   "share of the cores (e.g. --workers 2 on 2 cores: one thread each); unset: the executor config's "
                   "value, else 1")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per job, and each cell's torch threads; unset: the executor config's value, else the executor's own")
    g.add_argument("--mem-gb", type=float, help="memory per SLURM job (GB); unset: the executor config's value, else the executor's own")
    g.add_argument("--time-min", type=int, help="time limit per SLURM job (minutes); a cell that reaches it is "
                   "requeued and resumes from its newest checkpoint; unset: the executor config's value, else the executor's own")
    g.add_argument("--array-parallelism", type=int, help="at most this many SLURM jobs of the array at once; unset: the executor config's value, else the executor's own")
    g.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="extra sbatch option (repeatable), "
                   "e.g. --sbatch account=mylab --sbatch qos=high; unset: none")
    g.add_argument("--no-wait", action="store_true", help="slurm: return once the cells are submitted; run the same "
                   "command again (or with --collect) to gather the finished cells")
    g.add_argument("--collect", action="store_true", help="start nothing: report the cells that have finished")


def _grid_plan(args: argparse.Namespace, config) -> None:
    """Print what the grid trains (cells still to train, each measured on one of its steps), how long, where."""
    import tempfile

    import torch

    from factlens.bios.estimate import measure, plan
    from factlens.bios.trainer import Trainer

    cells = sum(len({s for s in args.starts if s <= ref} | ({ref} if args.freeze else set()))
                for ref in args.reference_steps)
    runs = cells + (0 if args.reference else 1)
    with tempfile.TemporaryDirectory() as tmp:
        est = measure(Trainer(config, tmp, device=args.device, progress=False))
    print(plan(f"factlens bios grid: {'' if args.reference else 'a reference run and '}{cells} patched runs of "
               f"{config.n_people:,} people x {config.steps:,} steps, (finished cells are reused)",
               est, args.out, runs=runs, device=args.device or est_device(), threads=torch.get_num_threads()),
          flush=True)


def est_device() -> str:
    from factlens.cli.options import resolve_device

    return resolve_device(None)


def cmd_grid(args: argparse.Namespace) -> int:
    from factlens.bios.executor import CellsNotFinished
    from factlens.bios.patching.grid import run_grid
    from factlens.bios.run import reference_config

    if args.reference:  # reuse it; its config is the grid's unless --preset/overrides say otherwise (then refused)
        config = _train_config(args, reference_config(args.reference))
    else:
        config = _train_config(args)
    if not args.quiet:
        _grid_plan(args, config)
    try:
        result = run_grid(config, args.out, reference_steps=args.reference_steps, start_steps=args.starts,
                          reference=args.reference, include_freeze=args.freeze, device=args.device,
                          progress=not args.quiet, executor=_executor(args),
                          wait=not (args.no_wait or args.collect), submit=not args.collect)
    except CellsNotFinished as err:
        return _not_finished(err)
    print(result.to_dataframe().to_string(index=False))
    print(f"table {Path(args.out) / 'grid.csv'}, heat-map {Path(args.out) / 'grid.html'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from factlens.bios.run import Run

    run = Run(_existing_run(args.run))
    step = run.checkpoint(args.step, tensors=False).step  # refuses a step the run has not saved, naming them
    device = args.device or ("cuda" if _cuda() else "cpu")
    print(json.dumps({"step": step, **run.evaluate(step, device=device)}, indent=1))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_plot(args: argparse.Namespace) -> int:
    from factlens.bios.run import Run
    from factlens.storage import check_writable_dir, storage_errors

    history = Run(_existing_run(args.run)).history
    check_writable_dir(args.run, "the figure is written into the run folder: make it writable (chmod u+w RUN) or "
                       "copy the run to a writable disk")
    with storage_errors(args.run):
        _write_curves(history, Path(args.run))
    print(f"{args.run}: {_summarise(history)}; figure {Path(args.run) / 'curves.html'}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from factlens.bios.patching.circuits import attention_to_name
    from factlens.storage import atomic_write, check_writable_dir

    run_dir = _existing_run(args.run)
    check_writable_dir(run_dir, "the results are written into the run folder: make it writable (chmod u+w RUN) "
                       "or copy the run to a writable disk")  # before the work, not after it
    result = attention_to_name(run_dir, n_sequences=args.sequences, device=resolve_device(args.device),
                               progress=not args.quiet)
    atomic_write(Path(args.run) / "attention_to_name.csv", result.to_dataframe().to_csv(index=False))
    atomic_write(Path(args.run) / "attention_to_name.html", result.plot().to_html())
    written = [Path(args.run) / "attention_to_name.html"]
    if args.sharpness:
        from factlens.bios.patching.sharpness import attention_sharpness

        sharp = attention_sharpness(args.run, result.steps, n_sequences=args.sequences, device=resolve_device(args.device),
                                    progress=not args.quiet)
        atomic_write(Path(args.run) / "attention_sharpness.csv", sharp.to_dataframe().to_csv(index=False))
        atomic_write(Path(args.run) / "attention_sharpness.html", sharp.plot(result).to_html())
        written.append(Path(args.run) / "attention_sharpness.html")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_mechanisms(args: argparse.Namespace) -> int:
    from factlens.testbeds.mechanisms import mechanisms
    from factlens.testbeds.mechanisms_result import check_out, write_mechanisms

    out = check_out(args.out if args.out else Path(args.run) / "mechanisms")  # refuse a bad --out before the work
    result = mechanisms(args.run, attributes=args.attributes, steps=args.steps, n=args.prompts,
                        device=resolve_device(args.device), progress=not args.quiet, folds=args.folds)
    written = write_mechanisms(result, out)
    print(f"{result!r}\nmitigations at step {result.steps[-1]} ({result.folds}-fold intercepts):\n"
          f"{result.mitigation_table().round(4).to_string()}")
    print(f"{result.seconds:.0f} s; wrote {', '.join(str(p) for p in written)}")
    return 0


APPENDIX_STAGES = ("curriculum", "alpha_grid", "patching_grid", "templates", "robustness")  # factlens.bios.stages


def cmd_reproduce(args: argparse.Namespace) -> int:
    stages = list(dict.fromkeys(args.stages))
    if not (args.quiet or args.report_only or args.collect):
        _reproduce_plan(args, stages)
    appendix = [s for s in stages if s in APPENDIX_STAGES]
    code = _reproduce_stages(args, appendix) if appendix else 0
    code = (_reproduce_dynamics(args) if "dynamics" in stages else 0) or code
    forgetting = tuple(s for s in stages if s not in ("dynamics", *APPENDIX_STAGES))
    if forgetting:
        code = max(code, _reproduce_forgetting(args, forgetting))
    return code


def _reproduce_configs(args: argparse.Namespace, stages: list[str]) -> tuple[int, list]:
    """(cells in all, the configs still to train) of the requested stages."""
    from factlens.bios.reproduce import reproduce_cells, with_overrides
    from factlens.bios.reproduce_forgetting import FORGETTING_SCALES, planned_configs
    from factlens.bios.stages import scale_with, stage_cells

    knobs = _knob_overrides(args)
    cells = [c for stage in stages if stage in APPENDIX_STAGES
             for c in stage_cells(stage, scale_with(args.scale, knobs), args.out)]
    if "dynamics" in stages:
        scale = with_overrides(args.scale, knobs) if knobs else args.scale
        cells += [c for stage in ("scaling", "curriculum", "patching") for c in reproduce_cells(scale, args.out, stage)]
    todo = []
    for cell in cells:
        try:
            done = cell.finished()
        except Exception:  # another run in its folder: the run itself refuses it, naming the fix
            done = False
        if not done:
            todo.append(cell.config)
    forgetting = tuple(s for s in stages if s in ("hallucination", "finetune"))
    total, tuned = planned_configs(FORGETTING_SCALES[args.scale], args.out, forgetting) if forgetting else (0, [])
    return len(cells) + total, todo + tuned


def _reproduce_plan(args: argparse.Namespace, stages: list[str]) -> None:
    """Print what ``bios reproduce`` trains, how long it takes here (measured steps), and where it writes."""
    from factlens.bios.estimate import estimate_configs, format_seconds

    ex = _executor(args)
    total, todo = _reproduce_configs(args, stages)
    toy = " (plus the toy model)" if "toy" in stages else ""
    head = (f"factlens bios reproduce --scale {args.scale}: stages {', '.join(stages)}; {len(todo)} of {total} "
            f"training runs still to train{toy}")
    if args.scale == "tiny":
        head += " (a SMOKE RUN: its numbers mean nothing)"
    if not todo:
        print(f"{head}; writes {args.out}", flush=True)
        return
    if ex.kind != "local":
        print(f"{head}, as a SLURM job array (one job per run); writes {args.out} (job records and logs in "
              f"{args.out}/jobs)", flush=True)
        return
    est = estimate_configs(todo, device=args.device, workers=ex.workers)
    print(f"{head}, {ex.workers} at a time on {args.device or est_device()}\n"
          f"  time:  about {format_seconds(est.total_s)} on this machine now ({est.steps:,} steps and "
          f"{est.evals:,} evaluations, each set-up measured){toy}\n"
          f"  where: {args.out} (one run folder per cell, {est.checkpoints:,} checkpoints; a table and a figure "
          "per stage; HTML reports)", flush=True)


def _reproduce_stages(args: argparse.Namespace, stages: list[str]) -> int:
    """The §3 and appendix stages (:mod:`factlens.bios.stages`), each writing OUT/<stage>.csv and .html."""
    from factlens.bios.stages import run_stage, scale_with, stage_cells
    from factlens.figures import png_support

    scale = scale_with(args.scale, _knob_overrides(args))
    png = not args.no_png and png_support()[0]
    if not args.no_png and not png:
        print(f"no PNGs: {png_support()[1]}; the HTML figures are complete")
    for stage in stages:
        t0 = time.perf_counter()
        cells = stage_cells(stage, scale, args.out)
        print(f"stage {stage}: {len(cells)} training runs at scale {args.scale} under {args.out}/{stage}/ "
              f"(finished ones are read, not retrained)")
        result = run_stage(stage, scale, args.out, executor=_executor(args), device=args.device,
                           progress=not args.quiet, train_missing=not (args.report_only or args.collect),
                           wait=not (args.no_wait or args.collect or args.report_only), write_png=png)
        print(result.table.to_string(index=False))
        missing = f"; not finished: {result.missing}" if result.missing else ""
        print(f"{stage}: {time.perf_counter() - t0:.0f} s; table {args.out}/{stage}.csv, figure "
              f"{args.out}/{stage}.html{' and .png' if png else ''}{missing}")
    return 0


def _reproduce_forgetting(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    from factlens.bios.reproduce_forgetting import reproduce_forgetting

    print(f"§4 stages {', '.join(stages)} at scale {args.scale} under {args.out} (finished cells are read, not "
          "retrained; wall times of the cpu scale: docs/reproduction.md)")
    collect = args.report_only or getattr(args, "collect", False)
    result = reproduce_forgetting(args.scale, args.out, stages=stages, device=args.device, progress=not args.quiet,
                                  train_missing=not collect, executor=_executor(args),
                                  wait=not (collect or getattr(args, "no_wait", False)))
    for name, table in (("hallucination", result.hallucination), ("fine-tuning", result.finetune),
                        ("fine-tuning on rare, already-seen people (non-celebrities)", result.rare),
                        ("toy", None if result.toy is None else result.toy.final())):
        if table is not None:
            print(f"{name}:\n{table.round(4).to_string(index=False)}")
    missing = f"; not finished: {result.missing}" if result.missing else ""
    print(f"computed {len(result.trained)} cells in {result.wall_s:.0f} s{missing}; report {result.report}")
    if "finetune" in stages and result.finetune is None and result.cells.waiting:
        print("the fine-tuning cells start from hallucination/base's last checkpoint: run the same command again "
              "once it has finished to submit them")
    return _print_cells(result.cells) if result.missing else 0


def _reproduce_dynamics(args: argparse.Namespace) -> int:
    from factlens.bios.executor import CellsNotFinished
    from factlens.bios.reproduce import reproduce, with_overrides

    if args.scale == "tiny" and not args.quiet:
        print("factlens bios reproduce --scale tiny: a SMOKE RUN (a few dozen steps per cell; tests the pipeline, "
              f"its numbers mean nothing); writes {Path(args.out) / 'report.html'}", flush=True)
    knobs = _knob_overrides(args)
    scale = with_overrides(args.scale, knobs) if knobs else args.scale
    try:
        result = reproduce(scale, args.out, plateau_ratio=args.plateau_ratio, device=args.device,
                           progress=not args.quiet, write_png=not args.no_png,
                           train_missing=not (args.report_only or args.collect), executor=_executor(args),
                           wait=not (args.no_wait or args.collect or args.report_only))
    except CellsNotFinished as err:
        return _not_finished(err)
    print(result.to_dataframe().to_string(index=False))
    print(result.patching_table().round(3).to_string())
    print(result.curriculum.to_string(index=False))
    missing = f"; not finished: {result.missing}" if result.missing else ""
    print(f"{result.fit_text()} (paper: 0.43 · N^0.81 steps at batch 128)")
    print(f"trained {len(result.trained)} cells in {result.wall_s:.0f} s{missing}; report {result.report}; {result.png_note}")
    if result.scale == "tiny":
        print("smoke run: the tiny scale only tests that every stage runs; its numbers mean nothing "
              "(--scale cpu or gpu for results)")
    return _print_cells(result.cells) if result.missing else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from factlens.bios.attention_drift import attention_drift
    from factlens.bios.data.samplers import make_sampler
    from factlens.bios.finetune import finetune_config
    from factlens.bios.forgetting import forgetting_summary
    from factlens.bios.run import Run
    from factlens.bios.trainer import train
    from factlens.errors import ConfigError
    from factlens.storage import atomic_write

    run = _existing_run(args.run)
    seen_from = args.seen_from
    if args.non_celebrities:
        sampler = Run(run).config.sampler
        if str(sampler.get("kind", "")).replace("_", "").lower() != "celebrities":
            raise ConfigError(f"--non-celebrities: {run} was not trained with the celebrities sampler ({sampler}); "
                              "pass --seen-from I to fine-tune on its people I.. instead.")
        seen_from = make_sampler(dict(sampler), n=Run(run).config.n_people).n_celebrities
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("checkpoint_every", args.eval_every)) if v}
    config = finetune_config(run, step=args.step, n_new=args.new_people, old_weight=args.replay, seen_from=seen_from,
                             keep_optimizer=args.keep_optimizer, steps=args.steps, lr=args.lr, **overrides)
    out = Path(args.out)
    Run(out).check(config)  # refuse a bad --out before training
    who = (f"its people {seen_from}..{config.n_people - 1} (already seen)" if seen_from is not None
           else f"{args.new_people} new people")
    print(f"fine-tuning {run} on {who}: {args.steps} steps at constant LR {args.lr:g}, replay weight {args.replay:g}, "
          f"{'pre-training' if args.keep_optimizer else 'fresh'} AdamW state; old, new and unseen people evaluated "
          f"on {len(config.checkpoint_steps())} checkpoints; run folder {out}")
    t0 = time.perf_counter()
    history = train(config, out, device=args.device, progress=not args.quiet)
    _write_curves(history, out)
    summary = forgetting_summary(history)
    atomic_write(out / "forgetting.json", json.dumps(summary, indent=1))
    if args.drift_sequences:
        drift = attention_drift(out, n_sequences=args.drift_sequences, device=args.device or "cpu",
                                progress=not args.quiet)
        atomic_write(out / "attention_drift.csv", drift.to_dataframe().to_csv(index=False))
        atomic_write(out / "attention_drift.html", drift.plot().to_html())
    print(json.dumps(summary, indent=1))
    print(f"{time.perf_counter() - t0:.0f} s; curves {out / 'curves.html'}"
          + (f", attention drift {out / 'attention_drift.html'}" if args.drift_sequences else ""))
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from factlens.bios.toy_memory import ToyMemoryConfig, ToyMemoryResult, run_toy_memory
    from factlens.storage import atomic_write, storage_errors

    overrides = {k: tuple(v) if isinstance(v, list) else v  # argparse lists: the config's fields are tuples
                 for k, v in (("seed", args.seed), ("new_sizes", args.new_sizes),
                              ("replay_weights", args.replay_weights)) if v is not None}
    config = ToyMemoryConfig.preset(args.preset, **overrides)
    out = Path(args.out)
    runs = len(config.runs())
    print(f"toy associative memory: pre-train on {config.n_pairs} pairs for {config.pretrain_steps} steps, then "
          f"{runs} fine-tuning runs of {config.finetune_steps} steps at once (about a minute per core for the paper "
          f"preset); results in {out}")
    t0 = time.perf_counter()
    result = run_toy_memory(config, progress=not args.quiet)
    result.save(out)
    result = ToyMemoryResult.load(out, config)
    fig = result.plot()
    with storage_errors(out / "toy.html"):
        atomic_write(out / "toy.html", fig.to_html())
    print(result.final().round(4).to_string(index=False))
    print(f"pre-training accuracy {result.pretrain_acc:.4f}; {time.perf_counter() - t0:.0f} s; figure "
          f"{out / 'toy.html'}, table {out / 'toy_curves.csv'}")
    return 0


def _keep_checkpoints(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-checkpoints", choices=["all", "last"], default="all",
                   help="all: every evaluation checkpoint (what bios attention / mechanisms / patch read); last: "
                        "only the final one (the learning curves need none)")


def _train_args(p: argparse.ArgumentParser, preset: str | None = "demo") -> None:
    p.add_argument("--preset", default=preset, metavar="{paper,small,demo,tiny,recall-testbed}",
                   help="run preset" if preset else "run preset; unset: the reference run's config "
                                                    "(--reference), else demo")
    p.add_argument("--people", type=int, help="population size N; unset: the preset's")
    p.add_argument("--steps", type=int, help="training steps; unset: the preset's")
    p.add_argument("--batch-size", type=int, help="sequences per step; unset: the preset's")
    p.add_argument("--lr", type=float, help="peak learning rate; unset: the preset's")
    p.add_argument("--seed", type=int, help="training seed; unset: the preset's")
    p.add_argument("--arch", choices=["gpt2", "opt"], help="architecture; unset: the preset's")
    p.add_argument("--sampler", help='person sampler as JSON, e.g. \'{"kind": "power_law", "alpha": 0.6}\'; unset: the preset\'s')
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--templates", type=int, help="training templates per person and attribute (1..24; the paper: "
                                                  "20; 5 stay held out); unset: 20")
    p.add_argument("--sentence-order", choices=["random", "fixed"],
                   help="random: shuffle the six sentences (the paper); fixed: attribute order (Fig. A) "
                        "(default: the preset's, random)")
    _robustness_args(p)
    p.add_argument("--log-to", choices=["tensorboard", "wandb"],
                   help="also log metrics, checkpoint steps and config to TensorBoard (RUN/tensorboard) or W&B "
                        "(WANDB_MODE=offline works without a network); unset: metrics.jsonl only")
    add_compute(p)


def _robustness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (the paper: 0.1); unset: the preset's")
    p.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
                   help="AdamW betas (the paper: 0.9 0.95); unset: the preset's")
    p.add_argument("--n-layers", type=int, help="transformer blocks; unset: the preset's")
    p.add_argument("--d-model", type=int, help="residual width (d_mlp = 4 d_model); unset: the preset's")
    p.add_argument("--n-heads", type=int, help="attention heads per block (must divide d_model); unset: the preset's")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and the ``bios`` command group on the top-level parser's subparsers."""
    demo = sub.add_parser("demo", help="train the CPU demo run: initial drop, plateau, knowledge emergence")
    _train_args(demo)
    demo.add_argument("--out", default="out/demo", help="run folder")
    _keep_checkpoints(demo)
    demo.add_argument("--check", action="store_true",
                      help="exit 1 unless the plateau (±3%% band) lasts as long as the drop and accuracy ends >= 0.8")
    demo.set_defaults(func=cmd_demo)

    bios = sub.add_parser("bios", help="synthetic biographies (Zucchet et al. 2025)").add_subparsers(
        dest="bios_command", required=True)
    p = bios.add_parser("train", help="train (or resume) a biography run")
    _train_args(p)
    _keep_checkpoints(p)
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=cmd_train)
    p = bios.add_parser("patch", help="train with attention patched from a reference run's checkpoint")
    _train_args(p, preset=None)
    p.add_argument("--reference", required=True, help="reference run directory (or checkpoint directory)")
    p.add_argument("--reference-step", type=int,
                   help="the step of the reference checkpoint to patch from: needed when --reference is a run "
                        "directory (one of the steps it saved); leave unset when --reference is a checkpoint directory")
    p.add_argument("--start", type=int, default=0, help="start_patching step")
    p.add_argument("--keep-optimizer", action="store_true", help="do not reset AdamW when patching starts")
    p.add_argument("--same-config", action="store_true",
                   help="reuse the reference run's config, ignoring --preset (the default without --preset)")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=cmd_patch)
    p = bios.add_parser("grid", help="reference step × start step patching grid (resumable)")
    _train_args(p, preset=None)
    p.add_argument("--reference", help="an existing, finished reference run to reuse (its config is the grid's); "
                                       "default: train OUT/reference")
    p.add_argument("--reference-steps", type=int, nargs="+", required=True,
                   help="reference checkpoint steps (grid columns)")
    p.add_argument("--starts", type=int, nargs="+", default=[0], help="start_patching steps (grid rows)")
    p.add_argument("--freeze", action="store_true",
                   help="also run the freeze cells (start == reference step: attention frozen at that step)")
    p.add_argument("--out", required=True, help="grid folder (one run folder per cell)")
    _executor_args(p)
    p.set_defaults(func=cmd_grid)
    p = bios.add_parser("reproduce", help="plateau vs N, attention patching, curriculum: runs + HTML report (resumable)")
    p.add_argument("--scale", choices=["tiny", "cpu", "gpu"], default="cpu",
                   help="tiny: seconds (smoke); cpu: 6-32 min per stage on 2 cores (docs/reproduction.md; the "
                        "command prints its own measured estimate first); gpu: the paper preset")
    p.add_argument("--out", required=True, help="report folder (one run folder per cell; resumable)")
    p.add_argument("--stages", nargs="+",
                   choices=["dynamics", "hallucination", "finetune", "toy", *APPENDIX_STAGES],
                   default=["dynamics", "hallucination", "finetune", "toy"],
                   help="dynamics: plateau vs N, attention patching, curriculum; hallucination, finetune, toy: §4 "
                        "(report in OUT/forgetting_report.html); curriculum, alpha_grid, patching_grid, templates, "
                        "robustness: §3 and the appendix (OUT/<stage>.csv and .html)")
    p.add_argument("--plateau-ratio", type=float, default=0.98, help="plateau end: first loss < ratio x baseline")
    p.add_argument("--no-png", action="store_true",
                   help="HTML only (PNGs need the png extra and a Chrome or Chromium browser)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished cells")
    _robustness_args(p)
    p.add_argument("--log-to", choices=["tensorboard", "wandb"],
                   help="also log every training cell's metrics, checkpoint steps and config to TensorBoard "
                        "(CELL/tensorboard) or W&B (one run per cell); unset: metrics.jsonl only")
    add_compute(p)
    _executor_args(p)
    p.set_defaults(func=cmd_reproduce)
    p = bios.add_parser("finetune", help="fine-tune a trained run's checkpoint on new (or rare, already-seen) "
                        "people at a constant LR, with replay of the old ones; old/new/unseen curves and attention drift")
    p.add_argument("--run", required=True, help="the pre-training run folder")
    p.add_argument("--step", type=int, help="its checkpoint to start from; unset: the last")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--new-people", type=int, default=4000, help="new people to fine-tune on")
    who.add_argument("--seen-from", type=int, help="instead, fine-tune on the run's own people I..N-1 (already seen); unset: new people")
    who.add_argument("--non-celebrities", action="store_true",
                     help="instead, fine-tune on a celebrity run's non-celebrities (its people n_celebrities..N-1)")
    p.add_argument("--replay", type=float, default=0.0,
                   help="replay weight of each old person (each fine-tuning person weighs 1; 0 = no replay)")
    p.add_argument("--steps", type=int, default=4000, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=3e-5, help="constant learning rate")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="carry the run's AdamW state over (from its resume checkpoint at --step) instead of a fresh one")
    p.add_argument("--batch-size", type=int, help="sequences per step; unset: the run's")
    p.add_argument("--eval-every", type=int, help="evaluate and checkpoint every K steps; unset: the paper's schedule")
    p.add_argument("--drift-sequences", type=int, default=64,
                   help="old people's biographies for the attention-drift figure (0: skip it)")
    p.add_argument("--out", required=True, help="fine-tuning run folder")
    add_compute(p)
    p.set_defaults(func=cmd_finetune)
    p = bios.add_parser("toy", help="the toy associative memory: forgetting of old pairs when fine-tuning on new "
                        "ones, with and without replay (Zucchet et al. §4)")
    p.add_argument("--preset", choices=["paper", "tiny"], default="paper", help="paper: the paper's sizes; tiny: seconds")
    p.add_argument("--new-sizes", type=int, nargs="+", help="new-set sizes without replay; unset: the preset's")
    p.add_argument("--replay-weights", type=float, nargs="+",
                   help="replay weight of each old pair (new pairs weigh 1); unset: the preset's")
    p.add_argument("--seed", type=int, help="seed of the pairs, the initialisation and the batches; unset: the preset's")
    p.add_argument("--out", required=True, help="output folder (toy.json, toy_curves.csv, toy.html)")
    add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_toy)
    p = bios.add_parser("eval", help="evaluate a checkpoint of a run")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--step", type=int, help="checkpoint step; unset: the last")
    add_compute(p)
    p.set_defaults(func=cmd_eval)
    p = bios.add_parser("plot", help="write a run's learning-curve figure")
    p.add_argument("--run", required=True, help="run folder")
    p.set_defaults(func=cmd_plot)
    p = bios.add_parser("attention", help="attention-to-name analysis over a run's checkpoints")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--sequences", type=int, default=512, help="biographies averaged over per checkpoint")
    p.add_argument("--sharpness", action="store_true",
                   help="also attention sharpness per layer (entropy / log attendable positions), drawn beside it")
    add_compute(p)
    p.set_defaults(func=cmd_attention)
    p = bios.add_parser("mechanisms", help="Lv et al.'s recall mechanisms (logit lens, movers, MLP intercept, "
                        "final-layer suppression, mitigations (a)/(b)) at every checkpoint of a run, on the "
                        "training-step axis")
    p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
    p.add_argument("--attributes", nargs="+", help="attributes to analyse; unset: all six")
    p.add_argument("--steps", type=int, nargs="+", help="checkpoint steps; unset: all")
    p.add_argument("--prompts", type=int, default=128, help="held-out-template prompts per attribute")
    p.add_argument("--folds", type=int, default=5, help="folds (by template) of the out-of-fold intercepts of "
                   "mitigation (b)")
    p.add_argument("--out", help="output folder; unset: RUN/mechanisms")
    add_compute(p)
    p.set_defaults(func=cmd_mechanisms)

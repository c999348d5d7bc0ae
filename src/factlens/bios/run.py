"""A biography training run's folder, opened once: :class:`Run`, the one reader (and the one claim) of a run.

A run folder holds ``checkpoints/step_NNNNNNN`` (model only, on the checkpoint schedule), ``resume/`` (model,
optimizer and RNG, the last few), ``metrics.jsonl`` (the log), ``config.json`` (a readable copy of the config)
and, for a run trained on people passed explicitly (``train(..., population=...)``), ``population.npz``.

Identity is checked by content, never by name: the config is the one stored in every checkpoint manifest (all
must carry the same one, and ``config.json`` must agree); a checkpoint folder must hold the step its manifest
says (a renamed folder is refused); the people are checked against the population fingerprint each manifest
records; a patching reference is pinned by its absolute path and its weights' checksum
(:func:`pin_reference`), and a reference that changed since is refused.

Example:
    >>> import tempfile
    >>> from factlens.bios.config import TrainConfig
    >>> from factlens.bios.run import Run
    >>> from factlens.bios.trainer import train
    >>> out = tempfile.mkdtemp() + "/run"
    >>> _ = train(TrainConfig.preset("tiny", steps=10), out, device="cpu", progress=False)
    >>> run = Run(out)
    >>> run.steps, run.config.steps, len(run.population())
    ([0, 10], 10, 64)
    >>> sorted(run.evaluate(10)) == sorted(run.history.final.keys() - {"step"})
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from factlens.bios.config import TrainConfig
from factlens.bios.data.population import Population
from factlens.bios.data.vocab import BiosVocab
from factlens.bios.history import TrainingHistory
from factlens.bios.metrics_log import METRICS, read_jsonl
from factlens.bios.phases import three_phases
from factlens.bios.task import BiosTask, trained_population
from factlens.checkpoints import MANIFEST, MODEL_FILE, Checkpoint, list_checkpoints, load_checkpoint, step_dir
from factlens.errors import CheckpointError, ConfigError, EmptyDatasetError, RunNotFoundError, StorageError
from factlens.storage import FolderLock, atomic_write, free_bytes, storage_errors

CONFIG, POPULATION, LOCK = "config.json", "population.npz", ".factlens.lock"
CHECKPOINTS, RESUME = "checkpoints", "resume"


# ------------------------------------------------------------------------------------------ configs
def config_diff(a: dict, b: dict) -> list[str]:
    """The fields where two config dicts differ."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _normalise(raw, where: str) -> dict:
    try:
        return TrainConfig.from_dict(raw).to_dict()
    except (TypeError, ValueError, AttributeError, ConfigError) as err:
        raise CheckpointError(f"{where} is not a biography-run config ({err}); this is not a factlens bios run "
                              "(perhaps another tool's file). Use another directory.") from None


def _population_key(checkpoint: Checkpoint) -> str | None:
    return checkpoint.manifest.get("extra", {}).get("population_sha256")


class Run:
    """The folder of one biography training run. See the module docstring.

    Reading (``config``, ``checkpoint``, ``history``, ``population``, ``evaluate``...) needs an existing run;
    :meth:`claim` is how a trainer takes a folder (new, empty, or this run's) for writing.

    Args:
        path: the run folder (the ``--out`` of ``factlens bios train``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------------------ the stored run
    def _require_dir(self) -> None:
        if not self.path.is_dir():
            what = " (it is a file)" if self.path.exists() else ""
            raise RunNotFoundError(f"run directory {self.path} does not exist{what}; pass the --out directory of a "
                                   "training run (factlens bios train --out DIR).")

    @cached_property
    def manifests(self) -> dict[Path, Checkpoint]:
        """Every checkpoint's manifest (``checkpoints/`` and ``resume/``; weights not read), by folder.

        A folder whose name is not the step its manifest holds (renamed or copied over) is refused."""
        out = {}
        for sub in (CHECKPOINTS, RESUME):
            for step in list_checkpoints(self.path / sub):
                path = step_dir(self.path / sub, step)
                out[path] = load_checkpoint(path, verify=False, load_tensors=False)  # refuses a renamed folder
        return out

    def _stored(self) -> dict:
        """The one config the manifests carry (``{}`` when there is no checkpoint); a mix is refused."""
        distinct = {}
        for path, ckpt in self.manifests.items():
            config = _normalise(ckpt.config, f"the manifest of {path}")
            distinct.setdefault(json.dumps(config, sort_keys=True), config)
        if len(distinct) > 1:
            first, second, *_ = distinct.values()
            raise CheckpointError(f"{self.path} mixes checkpoints of {len(distinct)} runs (their configs differ in "
                                  f"{config_diff(first, second)}); keep each run in its own directory: move the "
                                  "stray checkpoints out, or delete the directory and train again.")
        people = {_population_key(c) for c in self.manifests.values()} - {None}
        if len(people) > 1:
            raise CheckpointError(f"{self.path} mixes checkpoints of runs trained on different people (population "
                                  f"fingerprints {sorted(people)}); keep each run in its own directory: move the "
                                  "stray checkpoints out, or delete the directory and train again.")
        return next(iter(distinct.values()), {})

    def _config_json(self) -> TrainConfig | None:
        path = self.path / CONFIG
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not JSON ({err}); it is corrupt or another tool's file. Restore it, or "
                                  "delete it (the checkpoints' manifests hold the run's config).") from None
        return TrainConfig.from_dict(_normalise(raw, str(path)))

    @cached_property
    def stored_config(self) -> TrainConfig | None:
        """The run's config from its manifests, checked against ``config.json``; ``config.json`` alone when
        there is no checkpoint yet; ``None`` for an empty folder."""
        self._require_dir()
        stored, from_json = self._stored(), self._config_json()
        if stored and from_json is not None and from_json.to_dict() != stored:
            raise CheckpointError(f"{self.path / CONFIG} disagrees with the config in the run's checkpoints (differs "
                                  f"in {config_diff(from_json.to_dict(), stored)}): it was edited or overwritten. "
                                  "Restore it or delete it; the checkpoints' config is the one the run was trained "
                                  "with.")
        return TrainConfig.from_dict(stored) if stored else from_json

    @property
    def config(self) -> TrainConfig:
        """The :class:`~factlens.bios.config.TrainConfig` the run was trained with (validated once, cached)."""
        config = self.stored_config
        if config is None or not self.manifests:
            raise RunNotFoundError(f"{self.path} has no checkpoints{'' if config else ' and no config.json'}; "
                                   f"train it first (factlens bios train --out {self.path}).")
        return config

    @property
    def steps(self) -> list[int]:
        """The steps of the run's checkpoints (``checkpoints/``), ascending."""
        return sorted(c.step for p, c in self.manifests.items() if p.parent.name == CHECKPOINTS)

    def checkpoint_dir(self, step: int | None = None) -> Path:
        """The checkpoint folder of ``step`` (default: the last), refused (naming the saved steps) if absent."""
        self.config  # noqa: B018 - validates the run (one config, config.json agrees, folders hold their steps)
        steps = self.steps
        if not steps:
            raise RunNotFoundError(f"{self.path} has no checkpoints; train it first (factlens bios train --out "
                                   f"{self.path}).")
        step = steps[-1] if step is None else step
        if step not in steps:
            total = self.config.steps
            if steps[-1] < total and 0 <= step <= total:
                raise CheckpointError(f"{self.path} has no checkpoint at step {step} yet: the run has reached step "
                                      f"{steps[-1]} of {total} (still training, or interrupted). Let it finish "
                                      f"(factlens bios train resumes it) and retry, or pick a saved step; available: "
                                      f"{steps}")
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}; available: {steps} (pick a step "
                                  "on its checkpoint schedule)")
        return step_dir(self.path / CHECKPOINTS, step)

    def checkpoint(self, step: int | None = None, *, tensors: bool = True) -> Checkpoint:
        """The verified checkpoint of ``step`` (default: the last), weights loaded unless ``tensors=False``."""
        return load_checkpoint(self.checkpoint_dir(step), load_tensors=tensors)

    def hf(self, step: int | None = None, device: str | torch.device = "cpu"):
        """The plain HF model of a checkpoint (eval mode)."""
        return self.checkpoint(step).build_model(device).eval()

    def bridge(self, step: int | None = None, device: str | torch.device = "cpu", compat: bool = True):
        """A prepared TransformerLens bridge of a checkpoint, with the task tokenizer (compatibility mode on by
        default, as the Lv analyses of :mod:`factlens.testbeds` require; it changes no logits)."""
        from factlens.models import bridge_from_hf

        return bridge_from_hf(self.hf(step, device), self.vocab().hf_tokenizer(), compat=compat, copy_model=False)

    # ------------------------------------------------------------------------------ people and metrics
    def population(self) -> Population:
        """The people the run trained on (old and new people for a fine-tuning run), checked by content.

        A run trained on people passed explicitly reads them from ``population.npz``; any other run rebuilds
        them from its config. Either way their fingerprint must be the one the checkpoints recorded."""
        config = self.config
        recorded = {_population_key(c) for c in self.manifests.values()} - {None}
        stored = self.path / POPULATION
        base = Population.load(stored) if stored.exists() else None
        if base is None:
            base = config.make_population()
        if recorded and base.fingerprint() not in recorded:
            (want,) = recorded
            fix = ("it was replaced: restore the run's own population.npz" if stored.exists() else
                   f"the run was trained on people passed explicitly, and {stored} is missing: restore it")
            raise CheckpointError(f"{self.path}: the people rebuilt for this run (fingerprint {base.fingerprint()}) "
                                  f"are not the ones it was trained on ({want}); {fix}.")
        return trained_population(config, base)

    def vocab(self) -> BiosVocab:
        """The run's task vocabulary (from its pools), checked against the fingerprint its checkpoints record."""
        vocab = BiosVocab(self.config.make_pools())
        recorded = {c.manifest.get("extra", {}).get("vocab_fingerprint") for c in self.manifests.values()}
        recorded = {r for r in recorded if isinstance(r, str) and not r.startswith("<")}  # older runs: unreadable
        if recorded and vocab.fingerprint() not in recorded:
            raise CheckpointError(f"{self.path}: the task vocabulary rebuilt from the run's config (fingerprint "
                                  f"{vocab.fingerprint()}) is not the one it was trained with ({sorted(recorded)[0]}); "
                                  "the run was written by another factlens version. Open it with that version.")
        return vocab

    @cached_property
    def history(self) -> TrainingHistory:
        """The run's metrics log as a :class:`~factlens.bios.history.TrainingHistory` (baseline: its pools)."""
        self._require_dir()
        path = self.path / METRICS
        if not path.is_file():
            raise RunNotFoundError(f"{self.path} has no {METRICS}: it is not a training run, or the run has not "
                                   f"started. Check the path, or train it (factlens bios train --out {self.path}).")
        rows = read_jsonl(path)
        if not rows:
            raise EmptyDatasetError(f"{path} is empty: the run has not logged anything yet. Let it reach its first "
                                    f"evaluation (step 0), or resume it (factlens bios train --out {self.path}).")
        config = self.stored_config
        pools = config.make_pools() if config is not None else None
        return TrainingHistory.from_records(rows, pools=pools, run_dir=self.path)

    def phases(self, band: float = 0.03) -> dict:
        """The three phases of the run's loss curve, band reading (:func:`~factlens.bios.phases.three_phases`)."""
        return three_phases(self.history, band=band)

    @torch.no_grad()
    def evaluate(self, step: int | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
        """The run's evaluation metrics at a checkpoint, computed now (no trainer is built).

        The same numbers the trainer logged at that step: attribute loss/accuracy on held-out templates per
        group of people, hallucination metrics on unseen people; a patched run's checkpoints at or after
        ``start_patching`` are scored with the reference's patterns patched in, as in training.
        """
        config = self.config
        ckpt = self.checkpoint(step)
        task = BiosTask.build(config, self.population())
        device = torch.device(device)
        model = ckpt.build_model(device).eval()
        patch = config.patch
        patcher = None
        if patch is not None and ckpt.step >= patch.start_patching:
            from factlens.bios.patching.training import AttentionPatcher

            reference = load_checkpoint(reference_checkpoint(patch)).build_model(device)
            patcher = AttentionPatcher(model, reference, layers=patch.layers, heads=patch.heads).install()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

        def logits(tokens: torch.Tensor) -> torch.Tensor:
            if patcher is not None:
                patcher.run_reference(tokens)
            with amp:
                return model(tokens).logits

        try:
            return task.evaluate(logits, lambda batch: batch.trimmed().to(device))
        finally:
            if patcher is not None:
                patcher.remove()

    # ------------------------------------------------------------------------------ writing: the claim
    def check(self, config: TrainConfig, people: str | None = None) -> None:
        """Refuse (naming the fix) a folder that is not new, empty or the run of ``config``; writes nothing.

        ``people``: the fingerprint of the people the writer trains on
        (:meth:`~factlens.bios.data.population.Population.fingerprint`); a run of the same config on other
        people is refused too."""
        path = self.path
        for above in (path, *path.parents):
            if above.exists():
                if not above.is_dir():
                    what = f"{path} is a file" if above == path else f"{path} cannot be created: {above} is a file"
                    raise ConfigError(f"the output directory {what}. Pass a directory path (new, or this run's "
                                      "own) as out_dir / --out.")
                break
        if not path.exists():
            return
        entries = sorted(e for e in os.listdir(path) if not e.startswith("."))  # hidden: our lock and temp files
        if not entries:
            return
        fresh = Run(path)  # read the folder as it is now, not as this object first saw it
        try:
            from_json = fresh._config_json()
        except CheckpointError:
            raise self._foreign(entries) from None
        if from_json is None and not fresh.manifests:  # a corrupt manifest raises, naming the checkpoint
            raise self._foreign(entries)
        run = fresh.stored_config.to_dict()
        ours = config.to_dict()
        if (run.get("patch") or {}).get("reference_sha256", "") is None and ours.get("patch"):
            ours["patch"] = {**ours["patch"], "reference_sha256": None}  # a run written before references were pinned
        if run != ours:
            where = "" if fresh.manifests else " (no checkpoint yet)"
            raise CheckpointError(f"{path} holds a run with another config{where} (differs in "
                                  f"{config_diff(run, ours)}); use a new output directory, or the same config to "
                                  "resume it.")
        recorded = {_population_key(c) for c in fresh.manifests.values()} - {None}
        if (path / POPULATION).exists():
            recorded.add(Population.load(path / POPULATION).fingerprint())
        if people is not None and recorded and people not in recorded:
            raise CheckpointError(f"{path} holds a run of this config trained on other people (population "
                                  f"fingerprint {sorted(recorded)[0]}, the people given now are {people}); use a new "
                                  "output directory, or the run's own people (Run(out).population()) to resume it.")
        if (path / METRICS).exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn last line is recovered by the resume
                read_jsonl(path / METRICS)  # another tool's log raises, naming the fix

    def finished(self, config: TrainConfig) -> bool:
        """Whether the folder holds the run of ``config`` trained to its last step (final evaluation logged, final
        checkpoint written). Like :meth:`check`, it refuses a folder that holds anything else."""
        self.check(config)
        metrics = self.path / METRICS
        if not metrics.exists():
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logged = any(r["kind"] == "eval" and r["step"] == config.steps for r in read_jsonl(metrics))
        return logged and config.steps in list_checkpoints(self.path / CHECKPOINTS)

    def _foreign(self, entries: list[str]) -> CheckpointError:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        return CheckpointError(f"{self.path} is not empty and is not a factlens training run (it holds {shown}); "
                               "factlens never overwrites another tool's files. Pass a new or empty directory as "
                               "out_dir / --out.")

    def check_space(self, needed: int, what: str) -> None:
        """Refuse a run that would fill the disk (:class:`~factlens.errors.StorageError`, naming the space)."""
        from factlens.resources import format_bytes

        free = free_bytes(self.path)
        if free is not None and free < needed:
            raise StorageError(f"{self.path} is on a disk with {format_bytes(free)} free, but this run writes about "
                               f"{format_bytes(needed)} ({what}). Free some space, pass a directory on another disk "
                               "(out_dir / --out), or save fewer checkpoints (checkpoint_every, keep_resume).")

    @contextlib.contextmanager
    def claim(self, config: TrainConfig, *, needed: int = 0, what: str = "", people: str | None = None
              ) -> Iterator[Run]:
        """Check, lock, check again, write ``config.json``; the lock is held until the block exits.

        1. **Check** (read-only): the folder is new, empty, or holds *this* run on these ``people``
           (:meth:`check`).
        2. **Lock**: an exclusive ``flock`` on ``.factlens.lock`` (holding the owner's pid, host and start time)
           for as long as the block runs; a second writer is refused, naming the holder. The kernel drops the
           lock of a killed process, so a lock left by a SIGKILLed trainer is taken over.
        3. **Check again** under the lock, then write ``config.json`` (atomically, with the umask's mode).

        Example:
            >>> import tempfile
            >>> from factlens.bios.config import TrainConfig
            >>> from factlens.bios.run import Run
            >>> run = Run(tempfile.mkdtemp() + "/run")
            >>> with run.claim(TrainConfig.preset("tiny")):
            ...     (run.path / "config.json").exists()
            True
        """
        self.check(config, people)
        if needed:
            self.check_space(needed, what)
        with storage_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.path / LOCK):
            self.check(config, people)  # another trainer may have written between the first check and the lock
            text = json.dumps(config.to_dict(), indent=1)
            config_json = self.path / CONFIG
            if not config_json.exists() or config_json.read_text() != text:
                atomic_write(config_json, text)
            self.__dict__.pop("manifests", None)
            self.__dict__.pop("stored_config", None)
            yield self


# ------------------------------------------------------------------------------------------ references
def reference_checkpoint(reference, step: int | None = None) -> Path:
    """The checkpoint folder a patching reference names: a checkpoint folder, or a run folder's checkpoint.

    ``reference`` is a :class:`~factlens.bios.patching.config.PatchConfig` (its ``reference`` and
    ``reference_step``; a pinned checksum is checked) or a path with ``step``. Refuses, naming the fix: a path
    that does not exist or holds no checkpoints, a run folder without ``step``, a step the run has not saved
    (saying how far a run still being written has got), a checkpoint folder paired with another ``step``, and
    a reference whose weights changed since the config was pinned.

    Example:
        >>> from factlens.bios.run import reference_checkpoint
        >>> reference_checkpoint("runs/ref", 10)                          # doctest: +SKIP
        PosixPath('runs/ref/checkpoints/step_0000010')
    """
    pinned = getattr(reference, "reference_sha256", None)
    if hasattr(reference, "reference"):
        reference, step = reference.reference, reference.reference_step
    path = Path(reference)
    if (path / MANIFEST).exists():
        ckpt = load_checkpoint(path, verify=False, load_tensors=False)
        if step is not None and step != ckpt.step:
            raise ConfigError(f"reference_step={step} but {path} is the checkpoint of step {ckpt.step}; drop "
                              f"reference_step, or pass the run directory ({path.parent.parent}) with "
                              f"reference_step={step}.")
    else:
        if not path.is_dir():
            raise CheckpointError(f"the reference {path} does not exist; pass a run directory trained by factlens "
                                  "(factlens bios train --out DIR) or one of its checkpoints/step_NNNNNNN directories.")
        run = Run(path)
        if not list_checkpoints(path / CHECKPOINTS):
            raise CheckpointError(f"the reference {path} holds no checkpoints; pass a run directory trained by "
                                  "factlens (factlens bios train --out DIR), or wait until it has saved its first "
                                  "checkpoint.")
        if step is None:
            raise ConfigError(f"{path} is a run directory; pass reference_step (--reference-step) to choose one of "
                              f"its checkpoints: {run.steps}.")
        path = run.checkpoint_dir(step)
        ckpt = run.manifests[path]
    if pinned is not None and ckpt.manifest.get("sha256", {}).get(MODEL_FILE) != pinned:
        raise CheckpointError(f"the reference checkpoint {path} is not the one this run was configured with (its "
                              "weights' checksum changed: it was retrained, replaced or moved over). Restore the "
                              "original reference, or start a new run with the reference as it is now.")
    return path


def reference_config(reference: str | Path, step: int | None = None) -> TrainConfig:
    """The :class:`~factlens.bios.config.TrainConfig` a reference run (or one of its checkpoints) was trained with.

    Example:
        >>> from factlens.bios.run import reference_config
        >>> reference_config("runs/ref").steps                                # doctest: +SKIP
        16000
    """
    path = Path(reference)
    if (path / MANIFEST).exists():
        ckpt = load_checkpoint(reference_checkpoint(path, step), verify=False, load_tensors=False)
        if not ckpt.config:
            raise CheckpointError(f"{ckpt.path} holds no training config (it was not written by the factlens "
                                  "trainer); pass the run's settings explicitly (--preset and overrides).")
        return TrainConfig.from_dict(_normalise(ckpt.config, f"the manifest of {ckpt.path}"))
    if step is None and not (path.is_dir() and list_checkpoints(path / CHECKPOINTS)):
        step = 0  # a missing or empty reference: reference_checkpoint names the fix
    if step is not None:
        reference_checkpoint(path, step)  # the step must be saved
    return Run(path).config


def pin_reference(config: TrainConfig) -> TrainConfig:
    """``config`` with its patching reference pinned: the reference checkpoint's weights' checksum stored in
    ``patch.reference_sha256`` (its path is absolute from the moment the config is built). A config already
    pinned is checked against the reference as it is now. Unpatched configs come back unchanged."""
    patch = config.patch
    if patch is None:
        return config
    path = reference_checkpoint(patch)  # refuses a changed reference when already pinned
    digest = load_checkpoint(path, verify=False, load_tensors=False).manifest.get("sha256", {}).get(MODEL_FILE)
    if digest is None:
        raise CheckpointError(f"{path / MANIFEST} has no checksum for {MODEL_FILE}: the reference cannot be pinned. "
                              "Pass a checkpoint written by the factlens trainer.")
    return dataclasses.replace(config, patch=dataclasses.replace(patch, reference_sha256=digest))


def load_hf(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """The plain HF model of a run's checkpoint (``Run(run_dir).hf(step, device)``)."""
    return Run(run_dir).hf(step, device)


def load_bridge(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu",
                compat: bool = True):
    """A prepared TransformerLens bridge of a run's checkpoint (``Run(run_dir).bridge(step, device, compat)``)."""
    return Run(run_dir).bridge(step, device, compat)


__all__ = ["CHECKPOINTS", "CONFIG", "LOCK", "METRICS", "POPULATION", "RESUME", "Run", "config_diff", "load_bridge",
           "load_hf", "pin_reference", "reference_checkpoint", "reference_config"]

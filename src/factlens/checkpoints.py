"""Safe training checkpoints: atomic directories, a checksummed manifest, no arbitrary pickle.

A checkpoint is a directory ``step_{step:07d}`` holding

- ``model.safetensors``: the HF model's ``state_dict`` (plain HF names, loadable by ``from_pretrained`` code);
- ``optimizer.pt``: optimizer + LR-scheduler + RNG state, loaded with ``torch.load(weights_only=True)``
  (optional: analysis-only checkpoints may omit it);
- ``manifest.json``: architecture (the HF config dict), step, the training config, the data seed, and the
  sha256 of every other file.

It is written into a temporary sibling directory, every file ``fsync``-ed, then renamed into place with
``os.replace``, so a crash never leaves a half-written checkpoint under the final name; files and directories
get the permissions the user's umask gives (as ``torch.save`` and ``save_pretrained`` do), and a full disk or a
read-only directory is reported as :class:`~factlens.errors.StorageError` naming the path and the space needed
(:mod:`factlens.storage`).
:func:`load_checkpoint` verifies the manifest and the checksums and refuses a mismatch, a manifest without
checksums, or a ``step_NNNNNNN`` folder whose manifest holds another step (renamed or copied over), with
:class:`~factlens.errors.CheckpointError`.

Example:
    >>> import factlens, tempfile
    >>> from factlens.checkpoints import save_checkpoint, load_checkpoint
    >>> hf = factlens.build_hf("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    >>> path = save_checkpoint(tempfile.mkdtemp(), hf, step=10, config={"lr": 1e-3})
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.step
    10
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from factlens.errors import ArchitectureMismatchError, CheckpointError
from factlens.models import from_config, unwrap
from factlens.storage import atomic_write, chmod_default, storage_errors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "optimizer.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7})$")
ARCH_KEYS = ("model_type", "n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size",
             "num_hidden_layers", "num_attention_heads", "hidden_size", "ffn_dim", "max_position_embeddings")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def architecture(config) -> dict[str, Any]:
    """The architecture-defining fields of an HF config (what two checkpoints must share to be compatible)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d[k] for k in ARCH_KEYS if k in d and d[k] is not None}


def check_same_architecture(a: dict, b: dict, what: str = "reference checkpoint") -> None:
    """Raise :class:`ArchitectureMismatchError` listing every field where two architectures differ."""
    diffs = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if diffs:
        listed = ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in diffs.items())
        raise ArchitectureMismatchError(
            f"the {what} has another architecture ({listed}). Use a checkpoint of the same preset "
            "(layers, heads, d_model, vocabulary and context must all match)."
        )


def save_checkpoint(root: str | Path, model: PreTrainedModel, *, step: int, config: dict | None = None, optimizer=None,
                    scheduler=None, data_seed: int | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint of an HF model atomically; returns its directory.

    A full disk or an unwritable ``root`` raises :class:`~factlens.errors.StorageError` (naming the path and
    the bytes needed) and leaves no partial checkpoint behind."""
    root = Path(root)
    final = step_dir(root, step)
    state = _untie({k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()})
    needed = sum(v.numel() * v.element_size() for v in state.values()) * (3 if optimizer is not None else 1)
    with storage_errors(final, needed):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:07d}_"))
        try:
            _write_checkpoint(tmp, final, state, model, step=step, config=config, optimizer=optimizer,
                              scheduler=scheduler, data_seed=data_seed, extra=extra)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_checkpoint(tmp: Path, final: Path, state: dict[str, torch.Tensor], model, *, step, config, optimizer,
                      scheduler, data_seed, extra) -> None:
    chmod_default(tmp, directory=True)
    save_file(state, str(tmp / MODEL_FILE))
    files = [MODEL_FILE]
    if optimizer is not None:
        blob = {"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "torch_rng": torch.get_rng_state()}
        torch.save(blob, tmp / STATE_FILE)
        files.append(STATE_FILE)
    manifest = {
        "format": FORMAT_VERSION, "step": step, "data_seed": data_seed, "config": config or {},
        "architecture": architecture(unwrap(model).config), "hf_config": unwrap(model).config.to_dict(),
        "extra": extra or {}, "sha256": {f: _sha256(tmp / f) for f in files},
    }
    atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
    for f in files:
        chmod_default(tmp / f)  # safetensors writes its file 0600
        _fsync(tmp / f)
    if final.exists():  # replace an older copy: move it aside first, so the final name is never half-written
        old = final.with_name(f".old_{final.name}_{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store the tied copy separately."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


@dataclass
class Checkpoint:
    """A verified checkpoint: manifest fields plus lazily loaded tensors."""

    path: Path
    step: int
    manifest: dict
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def architecture(self) -> dict:
        return self.manifest["architecture"]

    def has_training_state(self) -> bool:
        return (self.path / STATE_FILE).exists()

    def training_state(self) -> dict:
        """Optimizer/scheduler/RNG state, loaded with ``weights_only=True``."""
        if not self.has_training_state():
            raise CheckpointError(f"{self.path} has no optimizer state; it cannot resume training.")
        return torch.load(self.path / STATE_FILE, weights_only=True, map_location="cpu")

    def build_model(self, device: str | torch.device = "cpu"):
        """An HF model (on factlens attention) with this checkpoint's weights."""
        model = from_config(self.manifest["hf_config"])
        load_state(model, self.state, self.path)
        return model.to(device)


def load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], where: Path | str = "checkpoint") -> None:
    """Load a state dict strictly, turning key/shape mismatches into clear factlens errors."""
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ArchitectureMismatchError(
            f"{where} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:3]]}. "
            "Build the model with the checkpoint's own config (Checkpoint.build_model())."
        )
    target.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, *, verify: bool = True, load_tensors: bool = True) -> Checkpoint:
    """Open a checkpoint directory, verify its manifest and checksums, and load the weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist; list a run's checkpoints with "
                              "factlens.checkpoints.list_checkpoints(run_dir).")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a factlens checkpoint or was truncated.")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{mpath} is corrupt ({err}); delete this checkpoint and resume from an earlier one.") from err
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath} is corrupt (not a JSON object); delete this checkpoint and resume from an "
                              "earlier one.")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {manifest.get('format')!r}; this factlens reads {FORMAT_VERSION}.")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"{mpath} is corrupt (step {step!r} is not a step); delete this checkpoint and resume "
                              "from an earlier one.")
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{path} holds the checkpoint of step {step}, not of step {int(named.group(1))}: the "
                              f"folder was renamed or copied over another. Rename it back to {step_dir('', step)} "
                              "(if that step is not there already), or delete it.")
    if verify:
        sums = manifest.get("sha256")
        if not isinstance(sums, dict) or MODEL_FILE not in sums:
            raise CheckpointError(f"{mpath} has no checksum for {MODEL_FILE}, so the weights cannot be verified: "
                                  "the manifest is corrupt. Delete this checkpoint and resume from an earlier one.")
        for fname, digest in sums.items():
            f = path / fname
            if not f.exists():
                raise CheckpointError(f"{path} is missing {fname}; the checkpoint is incomplete.")
            if _sha256(f) != digest:
                raise CheckpointError(f"{f} does not match its checksum: the file is truncated or corrupt. "
                                      "Delete this checkpoint and resume from an earlier one.")
    state = {}
    if load_tensors:
        try:
            state = load_file(str(path / MODEL_FILE))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path / MODEL_FILE} could not be read ({err}).") from err
    return Checkpoint(path=path, step=step, manifest=manifest, state=state)


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (temporary directories are ignored), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / MANIFEST).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str | Path, *, with_training_state: bool = True) -> Path | None:
    """The newest checkpoint directory under ``root`` (optionally only those that can resume)."""
    for step in reversed(list_checkpoints(root)):
        path = step_dir(root, step)
        if not with_training_state or (path / STATE_FILE).exists():
            return path
    return None


def prune_checkpoints(root: str | Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root``; returns the deleted steps."""
    steps = list_checkpoints(root)
    doomed = steps[:-keep] if keep > 0 else steps
    for step in doomed:
        path = step_dir(root, step)
        trash = path.with_name(f".old_{path.name}_{os.getpid()}")
        os.replace(path, trash)  # out of list_checkpoints' sight at once, then deleted
        shutil.rmtree(trash, ignore_errors=True)
    return doomed

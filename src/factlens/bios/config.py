"""Biography training-run configuration: model and run presets, attention patching, samplers.

A :class:`TrainConfig` is plain data (JSON-serialisable via :meth:`TrainConfig.to_dict`) and is stored in every
checkpoint's manifest, so a run can be rebuilt and resumed from its directory alone.

Example:
    >>> cfg = TrainConfig.preset("tiny", steps=20)
    >>> cfg.model["n_layer"], cfg.batch_size
    (2, 8)
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from factlens.bios.data.pools import Pools
from factlens.checkpoints import list_checkpoints
from factlens.errors import CheckpointError, ConfigError

MODEL_PRESETS: dict[str, dict] = {
    "paper": dict(n_layer=8, n_head=8, n_embd=512, n_inner=2048),
    "small": dict(n_layer=4, n_head=8, n_embd=256, n_inner=1024),
    "demo": dict(n_layer=2, n_head=4, n_embd=128, n_inner=512),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, n_inner=64),
}
RUN_PRESETS: dict[str, dict] = {
    "paper": dict(n_people=64_000, steps=16_000, batch_size=128, lr=4e-4, n_eval_sequences=16_000, n_unseen=16_000),
    "small": dict(n_people=8_000, steps=4_000, batch_size=128, lr=1e-3, n_eval_sequences=2_048, n_unseen=1_024),
    # CPU demo: 1,000 people, small attribute pools and one birth year (with 201 years the birth date, 3
    # informative tokens and 38% of the baseline, is learned person by person before anything else and pulls the
    # loss through the plateau), so that the drop to the no-knowledge baseline, a plateau of several hundred
    # steps at accuracy <= 0.03, and knowledge emergence all appear; see docs/reproduction.md for the measurements.
    "demo": dict(n_people=1_000, steps=2_000, batch_size=32, lr=3e-3, n_eval_sequences=256, n_unseen=128,
                 checkpoint_every=25, eval_batch_size=128,
                 pools=dict(first_names=60, last_names=60, cities=60, universities=30, majors=20, companies=40,
                            years=1)),
    "tiny": dict(n_people=64, steps=30, batch_size=8, lr=1e-3, n_eval_sequences=32, n_unseen=16, checkpoint_every=10),
}


def paper_schedule(total_steps: int, dense_until: int = 2000, dense_every: int = 125, n_spread: int = 32) -> list[int]:
    """Zucchet et al.'s checkpoint steps: every 125 steps up to 2k, plus 32 evenly spread, plus the last.

    Example:
        >>> paper_schedule(16000)[:3], paper_schedule(16000)[-1]
        ([0, 125, 250], 16000)
    """
    steps = set(range(0, min(dense_until, total_steps) + 1, dense_every))
    steps |= {round(total_steps * i / n_spread) for i in range(1, n_spread + 1)}
    steps.add(total_steps)
    return sorted(s for s in steps if 0 <= s <= total_steps)


@dataclass
class PatchConfig:
    """Attention patching from a reference checkpoint (Zucchet et al. §2.2).

    Attributes:
        reference: a checkpoint directory (``.../checkpoints/step_0008000``) or a run directory, with
            ``reference_step`` picking the checkpoint.
        reference_step: the reference checkpoint's step when ``reference`` is a run directory.
        start_patching: first step trained with patched attention (0 = the whole run;
            ``== reference_step`` freezes attention at that step).
        layers / heads: which layers and heads to patch (default all).
        reset_optimizer: re-initialise AdamW's state when patching starts (as in the paper).
    """

    reference: str
    reference_step: int | None = None
    start_patching: int = 0
    layers: list[int] | None = None
    heads: list[int] | None = None
    reset_optimizer: bool = True

    def checkpoint_dir(self) -> Path:
        path = Path(self.reference)
        if (path / "manifest.json").exists():
            return path
        if self.reference_step is None:
            raise ConfigError(f"{path} is a run directory; pass reference_step to choose its checkpoint.")
        ckpt = path / "checkpoints" / f"step_{self.reference_step:07d}"
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint at step {self.reference_step} in {path}; available: "
                                  f"{list_checkpoints(path / 'checkpoints')}")
        return ckpt


@dataclass
class TrainConfig:
    """Everything that defines a biography training run (serialised into every checkpoint)."""

    model: dict = field(default_factory=lambda: dict(MODEL_PRESETS["paper"]))
    arch: str = "gpt2"
    n_people: int = 64_000
    steps: int = 16_000
    batch_size: int = 128
    lr: float = 4e-4
    min_lr: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float | None = None
    seq_len: int | None = None
    sampler: dict = field(default_factory=lambda: {"kind": "uniform"})
    pools: dict | None = None  # sizes for Pools.sized(...); None = the paper's pools
    seed: int = 0
    data_seed: int = 0
    n_eval_sequences: int = 16_000
    eval_batch_size: int = 256
    n_unseen: int = 0
    checkpoint_every: int | None = None  # None = the paper's schedule
    resume_every: int = 500
    log_every: int = 10
    compile: bool = False
    patch: PatchConfig | None = None
    finetune: dict | None = None  # a FinetuneConfig as a dict (see factlens.bios.finetune)

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """A preset (``paper``, ``small``, ``demo``, ``tiny``) with overrides."""
        if name not in RUN_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(RUN_PRESETS)}.")
        model = dict(MODEL_PRESETS[name], **overrides.pop("model", {}))
        return cls(model=model, **{**RUN_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        if d.get("patch"):
            d["patch"] = PatchConfig(**d["patch"])
        d["betas"] = tuple(d.get("betas", (0.9, 0.95)))
        return cls(**d)

    def make_pools(self) -> Pools:
        """The run's attribute pools: the paper's, or ``Pools.sized(**self.pools)``."""
        return Pools.default() if self.pools is None else Pools.sized(**self.pools)

    def checkpoint_steps(self) -> list[int]:
        if self.checkpoint_every:
            return sorted(set(range(0, self.steps + 1, self.checkpoint_every)) | {self.steps})
        return paper_schedule(self.steps)

    def validate(self, max_bio_tokens: int) -> int:
        """Check the config; returns the sequence length to use."""
        if self.steps < 1 or self.batch_size < 1 or self.n_people < 1:
            raise ConfigError("steps, batch_size and n_people must be positive.")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr} is not a learning rate; use e.g. 4e-4.")
        seq_len = self.seq_len or 8 * math.ceil(max_bio_tokens / 8)
        if seq_len < max_bio_tokens:
            raise ConfigError(f"seq_len={seq_len} is shorter than the longest biography ({max_bio_tokens} tokens).")
        n_ctx = self.model.get("n_positions")
        if n_ctx is not None and seq_len > n_ctx:
            raise ConfigError(f"seq_len={seq_len} is longer than the model's context n_positions={n_ctx}; "
                              f"raise n_positions or shorten the sequence.")
        return seq_len


_OPT_FIELDS = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
               "n_inner": "ffn_dim", "n_positions": "max_position_embeddings"}


def hf_field_names(arch: str, model: dict) -> dict:
    """Presets use GPT-2 field names; translate them for OPT (``n_layer`` → ``num_hidden_layers``...)."""
    if arch == "gpt2":
        return dict(model)
    if arch == "opt":
        out = {_OPT_FIELDS.get(k, k): v for k, v in model.items()}
        out.setdefault("word_embed_proj_dim", out.get("hidden_size"))
        return out
    raise ConfigError(f"arch={arch!r}; the trainer builds 'gpt2' or 'opt' models.")


__all__ = ["MODEL_PRESETS", "RUN_PRESETS", "PatchConfig", "TrainConfig", "hf_field_names", "paper_schedule"]

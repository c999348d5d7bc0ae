"""Biography training-run configuration: model and run presets, samplers (attention patching: :mod:`factlens.bios.patching.config`).

A :class:`TrainConfig` is plain data (JSON-serialisable via :meth:`TrainConfig.to_dict`) and is stored in every
checkpoint's manifest, so a run can be rebuilt and resumed from its directory alone.

Example:
    >>> from factlens.bios import TrainConfig
    >>> cfg = TrainConfig.preset("tiny", steps=20)
    >>> cfg.model["n_layer"], cfg.batch_size
    (2, 8)
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from factlens.bios.data.pools import Pools
from factlens.bios.data.population import Population
from factlens.bios.data.templates import N_TEMPLATES
from factlens.bios.patching.config import PatchConfig
from factlens.errors import ConfigError
from factlens.inputs import TL_TO_HF, check_keys, hf_config_keys, refuse_unknown_keys

MODEL_PRESETS: dict[str, dict] = {
    "paper": dict(n_layer=8, n_head=8, n_embd=512, n_inner=2048),
    "small": dict(n_layer=4, n_head=8, n_embd=256, n_inner=1024),
    "demo": dict(n_layer=2, n_head=4, n_embd=128, n_inner=512),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, n_inner=64),
    "recall-testbed": dict(n_layer=6, n_head=4, n_embd=128, n_inner=512),
}
SENTENCE_ORDERS = ("random", "fixed")
MODEL_SIZE_KEYS = ("n_layer", "n_head", "n_embd", "n_inner")  # GPT-2 names of n_layers, n_heads, d_model, d_mlp
RUN_PRESETS: dict[str, dict] = {
    "paper": dict(n_people=64_000, steps=16_000, batch_size=128, lr=4e-4, n_eval_sequences=16_000, n_unseen=16_000),
    "small": dict(n_people=8_000, steps=4_000, batch_size=128, lr=1e-3, n_eval_sequences=2_048, n_unseen=1_024),
    # CPU demo: a small date pool, a cosine floor of 4e-4 and AdamW beta2 0.995; why each, and what the preset
    # measures (plateau length, accuracy, wall time), is in docs/reproduction.md ("The demo preset and the recipe sweep").
    "demo": dict(n_people=650, steps=1_800, batch_size=32, lr=2e-3, min_lr=4e-4, betas=(0.9, 0.995),
                 n_eval_sequences=192, n_unseen=64, checkpoint_every=25, eval_batch_size=192,
                 pools=dict(first_names=60, last_names=60, cities=10, universities=10, majors=10, companies=10,
                            years=1, days=2)),
    "tiny": dict(n_people=64, steps=30, batch_size=8, lr=1e-3, n_eval_sequences=32, n_unseen=16, checkpoint_every=10),
    # Lv et al. recall testbed (docs/mechanisms.md, scripts/build_recall_testbed.py): the bios_demo_run population
    # (400 people, 60 cities, 40 companies...) on a 6-layer model with the demo optimizer (cosine 2e-3 -> 4e-4,
    # AdamW beta2 0.995), checkpoints every 125 steps for the mechanisms-over-training figures. Measured:
    # held-out attribute accuracy 0.999 at step 2,500, 12 min 54 s on one CPU thread.
    "recall-testbed": dict(n_people=400, steps=2_500, batch_size=32, lr=2e-3, min_lr=4e-4, betas=(0.9, 0.995),
                           n_eval_sequences=256, n_unseen=64, checkpoint_every=125, eval_batch_size=256,
                           pools=dict(first_names=60, last_names=60, cities=60, universities=30, majors=20,
                                      companies=40)),
}


def paper_schedule(total_steps: int, dense_until: int = 2000, dense_every: int = 125, n_spread: int = 32) -> list[int]:
    """Zucchet et al.'s checkpoint steps: every 125 steps up to 2k, plus 32 evenly spread, plus the last.

    Example:
        >>> from factlens.bios.config import paper_schedule
        >>> paper_schedule(16000)[:3], paper_schedule(16000)[-1]
        ([0, 125, 250], 16000)
    """
    steps = set(range(0, min(dense_until, total_steps) + 1, dense_every))
    steps |= {round(total_steps * i / n_spread) for i in range(1, n_spread + 1)}
    steps.add(total_steps)
    return sorted(s for s in steps if 0 <= s <= total_steps)


@refuse_unknown_keys
@dataclass
class FinetuneConfig:
    """Fine-tuning a pre-trained run on new people, with replay of old ones (Zucchet et al. §4).

    Built by :func:`factlens.bios.finetune.finetune_config`, which records who the old people are.

    Example:
        >>> from factlens.bios.config import FinetuneConfig
        >>> FinetuneConfig(init_from="/runs/paper/checkpoints/step_0016000", n_new=0)
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: n_new=0; fine-tuning needs at least one new person.

    Attributes:
        init_from: the pre-training checkpoint folder (made absolute when the config is built).
        n_new: number of new people. old_weight: replay weight of each old person (0 = no replay).
        new_seed: seed of the new people's names, values and template splits.
        population_sha256: the fingerprint of the pre-training run's people (the "old" people); a fine-tuning
            run on any other people is refused.
        seen_from: fine-tune on the pre-training run's own people ``seen_from .. N-1`` (already seen, e.g. a
            celebrity run's non-celebrities) instead of ``n_new`` new people; the old people are then ``0 ..
            seen_from-1``.
        keep_optimizer: carry the pre-training AdamW state over (read from the base run's resume checkpoint at
            the same step) instead of a fresh AdamW (the default: every checkpoint can be fine-tuned, and the
            paper resets AdamW when it changes the set-up, as in attention patching).
        new_population_sha256: the fingerprint of the fine-tuning people, checked like ``population_sha256``.
    """

    init_from: str
    n_new: int = 4000
    old_weight: float = 0.0
    new_seed: int = 1_000_003
    population_sha256: str | None = None
    seen_from: int | None = None
    keep_optimizer: bool = False
    new_population_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.init_from, (str, Path)) or not str(self.init_from):
            raise ConfigError(f"init_from={self.init_from!r}: pass the pre-training checkpoint folder.")
        self.init_from = os.path.abspath(self.init_from)
        if isinstance(self.n_new, bool) or not isinstance(self.n_new, int) or self.n_new < 1:
            raise ConfigError(f"n_new={self.n_new!r}; fine-tuning needs at least one new person.")
        if not _is_real(self.old_weight) or self.old_weight < 0:
            raise ConfigError(f"old_weight={self.old_weight!r}; pass a replay weight >= 0 (0 = no replay).")
        if isinstance(self.new_seed, bool) or not isinstance(self.new_seed, int) or self.new_seed < 0:
            raise ConfigError(f"new_seed={self.new_seed!r}; pass an integer >= 0.")
        if self.seen_from is not None and (isinstance(self.seen_from, bool) or not isinstance(self.seen_from, int)
                                           or self.seen_from < 1):
            raise ConfigError(f"seen_from={self.seen_from!r}; pass the first already-seen person to fine-tune on "
                              "(>= 1), or None for new people.")
        if not isinstance(self.keep_optimizer, bool):
            raise ConfigError(f"keep_optimizer={self.keep_optimizer!r}: pass True or False.")


@refuse_unknown_keys
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
    n_train_templates: int = 20  # training templates per person and attribute (Fig. A: 1..24); 5 stay held out
    sentence_order: str = "random"  # "random": the six sentences shuffled (the paper); "fixed": attribute order
    seed: int = 0
    data_seed: int = 0
    n_eval_sequences: int = 16_000
    eval_batch_size: int = 256
    n_unseen: int = 0
    checkpoint_every: int | None = None  # None = the paper's schedule
    resume_every: int = 500
    keep_resume: int = 2  # resume checkpoints kept in out/resume (older ones are deleted)
    log_every: int = 10
    compile: bool = False
    patch: PatchConfig | None = None
    finetune: FinetuneConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.patch, dict):
            self.patch = PatchConfig(**self.patch)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        self.check()

    def check(self) -> None:
        """Refuse, with :class:`~factlens.errors.ConfigError` naming the fix, settings that cannot train.

        Example:
            >>> from factlens.bios import TrainConfig
            >>> TrainConfig.preset("tiny", min_lr=1e4)
            Traceback (most recent call last):
            ...
            factlens.errors.ConfigError: min_lr=10000.0 is above lr=0.001: the cosine schedule would raise the learning rate until the loss diverges. Pass 0 <= min_lr <= lr (e.g. min_lr=1e-7).
        """
        for name in ("steps", "batch_size", "n_people", "n_eval_sequences", "eval_batch_size", "resume_every",
                     "keep_resume", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        for name in ("n_unseen", "seed", "data_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}; pass an integer >= 0.")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r}; pass a positive integer, or None for "
                              "the paper's schedule.")
        if not _is_real(self.lr) or not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr!r} is not a learning rate; use e.g. 4e-4.")
        if not _is_real(self.min_lr) or self.min_lr < 0:
            raise ConfigError(f"min_lr={self.min_lr!r}; pass 0 <= min_lr <= lr (e.g. min_lr=1e-7).")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is above lr={self.lr}: the cosine schedule would raise the "
                              "learning rate until the loss diverges. Pass 0 <= min_lr <= lr (e.g. min_lr=1e-7).")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} is negative: it grows the weights until the loss "
                              "diverges. Pass weight_decay >= 0 (the paper uses 0.1).")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else (self.betas,)
        if len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"betas={self.betas!r}; AdamW needs two values in [0, 1), e.g. (0.9, 0.95).")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError(f"grad_clip={self.grad_clip!r}; pass a positive maximum gradient norm (e.g. 1.0), "
                              "or None for no clipping.")
        if not isinstance(self.model, dict):
            raise ConfigError(f"model={self.model!r}; pass a dict of HF config fields such as {{'n_layer': 4}}.")
        if self.arch not in ("gpt2", "opt"):
            raise ConfigError(f"arch={self.arch!r}; the trainer builds 'gpt2' or 'opt' models.")
        known = hf_config_keys("gpt2") | (hf_config_keys("opt") if self.arch == "opt" else set())
        check_keys(self.model, known, f"TrainConfig.model ({self.arch}; GPT-2 field names such as n_layer, n_head, "
                   "n_embd, n_positions)", TL_TO_HF["gpt2"])
        if self.pools is not None:
            import inspect

            if not isinstance(self.pools, dict):
                raise ConfigError(f"pools={self.pools!r}; pass a dict of pool sizes for Pools.sized(...), or None.")
            check_keys(self.pools, [p for p in inspect.signature(Pools.sized).parameters if p != "cls"],
                       "TrainConfig.pools (Pools.sized)")
        if isinstance(self.n_train_templates, bool) or not isinstance(self.n_train_templates, int) or not (
                1 <= self.n_train_templates < N_TEMPLATES):
            raise ConfigError(f"n_train_templates={self.n_train_templates!r}; pass 1..{N_TEMPLATES - 1} training "
                              f"templates per person (the paper uses 20; its Fig. A sweeps 1, 2, 4, 8, 16).")
        if self.sentence_order not in SENTENCE_ORDERS:
            raise ConfigError(f"sentence_order={self.sentence_order!r}; pass one of {SENTENCE_ORDERS} ('random' "
                              "shuffles the six sentences of every biography, as the paper does).")
        self._check_model()
        if not isinstance(self.sampler, dict):
            raise ConfigError(f"sampler={self.sampler!r}; pass a dict such as {{'kind': 'power_law', 'alpha': 0.6}}.")

    def _check_model(self) -> None:
        """Refuse model sizes that cannot build: non-positive sizes, or a width the heads do not divide."""
        if not isinstance(self.model, dict):
            raise ConfigError(f"model={self.model!r}; pass a dict such as {MODEL_PRESETS['demo']}.")
        for key in MODEL_SIZE_KEYS:
            value = self.model.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"model[{key!r}]={value!r}; pass a positive integer.")
        width, heads = self.model.get("n_embd"), self.model.get("n_head")
        if width is not None and heads is not None and width % heads:
            raise ConfigError(f"d_model={width} is not divisible by n_heads={heads}; pick a width that is a "
                              f"multiple of the head count (e.g. d_model={heads * max(1, round(width / heads))}).")

    @property
    def permute_sentences(self) -> bool:
        """Whether training biographies shuffle their six sentences (``sentence_order == "random"``)."""
        return self.sentence_order == "random"

    def make_population(self) -> Population:
        """The run's people: ``n_people`` drawn with ``data_seed`` from :meth:`make_pools`, with
        ``n_train_templates`` training templates each (their fingerprint is what checkpoints record)."""
        return Population.generate(self.n_people, seed=self.data_seed, pools=self.make_pools(),
                                   n_train_templates=self.n_train_templates)

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """A preset (``paper``, ``small``, ``demo``, ``tiny``, ``recall-testbed``) with overrides."""
        if name not in RUN_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(RUN_PRESETS)}.")
        model_keys = {k: f"model={{'{TL_TO_HF['gpt2'].get(k, k)}': ...}}"
                      for k in [*hf_config_keys("gpt2"), *TL_TO_HF["gpt2"]]}  # a model field passed at the top level
        check_keys(overrides, [f.name for f in dataclasses.fields(cls)], f"TrainConfig.preset({name!r})", model_keys)
        model = dict(MODEL_PRESETS[name], **overrides.pop("model", {}))
        return cls(model=model, **{**RUN_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        check_keys(d, [f.name for f in dataclasses.fields(cls)], "TrainConfig.from_dict")
        if d.get("patch"):
            check_keys(d["patch"], [f.name for f in dataclasses.fields(PatchConfig)], "TrainConfig.from_dict patch")
            d["patch"] = PatchConfig(**d["patch"])
        if d.get("finetune"):
            d["finetune"] = FinetuneConfig(**d["finetune"])
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
        """Check the config against the task (:meth:`check` runs on construction); returns the sequence length."""
        self.check()
        if self.patch is not None:
            self.patch.check_steps(self.steps)
        seq_len = self.seq_len or 8 * math.ceil(max_bio_tokens / 8)
        if seq_len < max_bio_tokens:
            raise ConfigError(f"seq_len={seq_len} is shorter than the longest biography ({max_bio_tokens} tokens).")
        n_ctx = self.model.get("n_positions")
        if n_ctx is not None and seq_len > n_ctx:
            raise ConfigError(f"seq_len={seq_len} is longer than the model's context n_positions={n_ctx}; "
                              f"raise n_positions or shorten the sequence.")
        return seq_len


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


__all__ = ["MODEL_PRESETS", "RUN_PRESETS", "SENTENCE_ORDERS", "FinetuneConfig", "TrainConfig", "hf_field_names", "paper_schedule"]

"""The toy associative memory of Zucchet et al. (2025, §4, App. F): why fine-tuning on new facts erases old ones.

A one-hidden-layer ReLU MLP (256 units) maps unit-norm 64-d Gaussian keys to one of 30 classes (cross-entropy).
It is pre-trained on 8,192 key–value pairs (AdamW, cosine decay, LR 0.03, 16k steps, batch 128, weight decay
0.01), then fine-tuned at a constant LR 1e-3 for 4,000 steps on new pairs: 32 … 1,024 new pairs without replay,
and 128 new pairs with replay weights 2 … 1/512. The **replay weight** is the paper's: each old pair is drawn
with weight ``w``, each new pair with weight 1, so a draw is an old pair with probability
``n_old·w / (n_old·w + n_new)`` (:class:`~factlens.bios.data.samplers.Replay`, the sampler the transformer's
fine-tuning uses too).

Reading choices (the paper does not fix them): values are balanced (``value(i) = i mod n_classes``, so every
prefix of the pairs has class counts that differ by at most one; keys are i.i.d., so the order carries no
information); the new pairs of a smaller new set are the first ones of the largest; weight decay applies to
every parameter; each fine-tuning run starts with a fresh AdamW state (same betas and weight decay) from
the exact pre-trained weights. All fine-tuning runs train at once as one stacked model: AdamW acts element by
element, so stacking the runs changes nothing but the speed (``tests/test_toy_memory.py`` checks it against
separate ``torch.nn`` runs).

Example:
    >>> from factlens.bios.toy_memory import ToyMemoryConfig, run_toy_memory
    >>> cfg = ToyMemoryConfig.preset("tiny", pretrain_steps=20, finetune_steps=10, new_sizes=(8,),
    ...                              replay_weights=(1.0,))
    >>> result = run_toy_memory(cfg, progress=False)
    >>> sorted(result.final()["n_new"].tolist())
    [8, 8]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from factlens.bios.data.samplers import Replay
from factlens.display import ResultDisplay
from factlens.errors import CheckpointError, ConfigError
from factlens.storage import atomic_write

PAPER_REPLAY_WEIGHTS = tuple(2.0 ** -k for k in range(-1, 10))  # 2, 1, 1/2, ..., 1/512


@dataclass(frozen=True)
class ToyMemoryConfig:
    """The toy model, its pre-training and its fine-tuning runs (defaults: the paper's).

    Attributes:
        dim / hidden / n_classes: key dimension, hidden ReLU units, number of classes.
        n_pairs: pre-training pairs. new_sizes: new-set sizes fine-tuned on without replay.
        replay_new / replay_weights: the new-set size and the replay weights of the replay runs.
        eval_every: old/new accuracy every ``eval_every`` fine-tuning steps (and every ``eval_every // 10`` over
            the first ``10 · eval_every`` steps, where forgetting happens).
    """

    dim: int = 64
    hidden: int = 256
    n_classes: int = 30
    n_pairs: int = 8192
    pretrain_steps: int = 16_000
    pretrain_lr: float = 0.03
    batch_size: int = 128
    weight_decay: float = 0.01
    finetune_lr: float = 1e-3
    finetune_steps: int = 4000
    new_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    replay_new: int = 128
    replay_weights: tuple[float, ...] = PAPER_REPLAY_WEIGHTS
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "n_classes", "n_pairs", "pretrain_steps", "batch_size", "finetune_steps",
                     "replay_new", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes={self.n_classes}; a classification needs at least 2 classes.")
        object.__setattr__(self, "new_sizes", tuple(int(k) for k in self.new_sizes))
        object.__setattr__(self, "replay_weights", tuple(float(w) for w in self.replay_weights))
        if any(k < 1 for k in self.new_sizes):
            raise ConfigError(f"new_sizes={self.new_sizes}; every new set needs at least one pair.")
        if any(not (math.isfinite(w) and w >= 0) for w in self.replay_weights):
            raise ConfigError(f"replay_weights={self.replay_weights}; pass finite weights >= 0 (0 = no replay).")
        if not (self.new_sizes or self.replay_weights):
            raise ConfigError("no fine-tuning run: pass new_sizes and/or replay_weights.")
        for name in ("pretrain_lr", "finetune_lr"):
            if not 0 < getattr(self, name) < 10:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a learning rate; use e.g. 1e-3.")

    @classmethod
    def preset(cls, name: str, **overrides) -> ToyMemoryConfig:
        """``paper`` (the defaults: about a minute on one CPU core) or ``tiny`` (a smoke test: seconds)."""
        presets = {"paper": {},
                   "tiny": dict(dim=16, hidden=32, n_classes=5, n_pairs=128, pretrain_steps=300, pretrain_lr=0.01,
                                batch_size=16, finetune_steps=100, new_sizes=(8, 32), replay_new=8,
                                replay_weights=(1.0, 1 / 8), eval_every=10)}
        if name not in presets:
            raise ConfigError(f"unknown toy preset {name!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[name], **overrides})

    @property
    def n_new_pool(self) -> int:
        """New pairs drawn once; every run's new set is a prefix of them."""
        return max([*self.new_sizes, self.replay_new])

    def runs(self) -> list[tuple[int, float]]:
        """``(n_new, replay weight)`` of every fine-tuning run: the no-replay sizes, then the replay weights."""
        return [(k, 0.0) for k in self.new_sizes] + [(self.replay_new, w) for w in self.replay_weights]

    def eval_steps(self) -> list[int]:
        """Fine-tuning steps evaluated: dense at the start, then every ``eval_every``, and the last."""
        dense = max(self.eval_every // 10, 1)
        steps = set(range(0, min(10 * self.eval_every, self.finetune_steps) + 1, dense))
        steps |= set(range(0, self.finetune_steps + 1, self.eval_every)) | {self.finetune_steps}
        return sorted(steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_pairs(n: int, dim: int, n_classes: int, generator: torch.Generator
               ) -> tuple[Float[torch.Tensor, "n dim"], Int[torch.Tensor, " n"]]:
    """``n`` unit-norm Gaussian keys and balanced values ``i mod n_classes``.

    Example:
        >>> import torch
        >>> from factlens.bios.toy_memory import make_pairs
        >>> keys, values = make_pairs(6, 4, 3, torch.Generator().manual_seed(0))
        >>> keys.norm(dim=-1).allclose(torch.ones(6)), values.tolist()
        (True, [0, 1, 2, 0, 1, 2])
    """
    keys = torch.randn(n, dim, generator=generator)  # [n, d]
    return keys / keys.norm(dim=-1, keepdim=True), torch.arange(n) % n_classes


class StackedMLP(torch.nn.Module):
    """``runs`` independent ReLU MLPs ``dim → hidden → n_classes``, evaluated as one batched matmul.

    Example:
        >>> import torch
        >>> from factlens.bios.toy_memory import StackedMLP
        >>> mlp = StackedMLP.init(1, 8, 16, 3, seed=0)
        >>> mlp(torch.zeros(1, 5, 8)).shape
        torch.Size([1, 5, 3])
    """

    def __init__(self, w1: Float[torch.Tensor, "runs dim hidden"], b1: Float[torch.Tensor, "runs hidden"],
                 w2: Float[torch.Tensor, "runs hidden classes"], b2: Float[torch.Tensor, "runs classes"]) -> None:
        super().__init__()
        self.w1, self.b1 = torch.nn.Parameter(w1), torch.nn.Parameter(b1)
        self.w2, self.b2 = torch.nn.Parameter(w2), torch.nn.Parameter(b2)

    @classmethod
    def init(cls, runs: int, dim: int, hidden: int, n_classes: int, seed: int) -> StackedMLP:
        """``torch.nn.Linear``'s default initialisation, drawn once from ``seed`` and copied to every run."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            first, second = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, n_classes)
        return cls(*(t.detach().expand(runs, *t.shape).clone()
                     for t in (first.weight.T, first.bias, second.weight.T, second.bias)))

    def copies(self, runs: int) -> StackedMLP:
        """``runs`` exact copies of this one-run model (new tensors; fine-tuning starts from them)."""
        if self.w1.shape[0] != 1:
            raise ConfigError(f"copies() needs a one-run model; this one holds {self.w1.shape[0]} runs.")
        return StackedMLP(*(p.detach().expand(runs, *p.shape[1:]).clone() for p in self.parameters()))

    def forward(self, x: Float[torch.Tensor, "runs batch dim"]) -> Float[torch.Tensor, "runs batch classes"]:
        h = torch.relu(torch.baddbmm(self.b1[:, None], x, self.w1))  # [r, b, hidden]
        return torch.baddbmm(self.b2[:, None], h, self.w2)


def _loss(model: StackedMLP, keys: torch.Tensor, values: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Sum over runs of each run's mean cross-entropy on its batch ``idx[r]`` (so each run's gradient is its own)."""
    i = torch.from_numpy(idx)  # [r, b]
    logits = model(keys[i])  # [r, b, c]
    return F.cross_entropy(logits.flatten(0, 1), values[i].flatten(), reduction="sum") / idx.shape[1]


@torch.no_grad()
def accuracy_and_loss(model: StackedMLP, keys: torch.Tensor, values: torch.Tensor, chunk: int = 4096
                      ) -> tuple[Float[torch.Tensor, " runs"], Float[torch.Tensor, " runs"]]:
    """Each run's accuracy and mean cross-entropy on the same pairs."""
    correct, nll = torch.zeros(model.w1.shape[0]), torch.zeros(model.w1.shape[0])
    for lo in range(0, len(keys), chunk):
        k, v = keys[lo:lo + chunk], values[lo:lo + chunk]
        logits = model(k.expand(model.w1.shape[0], *k.shape))  # [r, n, c]
        correct += (logits.argmax(-1) == v).sum(-1)
        nll += F.cross_entropy(logits.transpose(1, 2), v.expand(len(logits), -1), reduction="none").sum(-1)
    return correct / len(keys), nll / len(keys)


def pretrain(config: ToyMemoryConfig, keys: torch.Tensor, values: torch.Tensor, *, progress: bool = True
             ) -> StackedMLP:
    """Pre-train one MLP on all pairs: AdamW, cosine decay from ``pretrain_lr`` to 0, uniform batches."""
    model = StackedMLP.init(1, config.dim, config.hidden, config.n_classes, seed=config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.pretrain_steps)
    rng = np.random.default_rng([config.seed, 0])
    for _ in tqdm(range(config.pretrain_steps), desc="toy pre-training", disable=not progress, unit="step"):
        loss = _loss(model, keys, values, rng.integers(0, len(keys), (1, config.batch_size)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def finetune(config: ToyMemoryConfig, pretrained: StackedMLP, old: tuple[torch.Tensor, torch.Tensor],
             new: tuple[torch.Tensor, torch.Tensor], *, progress: bool = True) -> pd.DataFrame:
    """Every run of ``config.runs()`` from the pre-trained weights at once; one row per run × evaluated step.

    Run ``r`` draws its batches from :class:`~factlens.bios.data.samplers.Replay` over the old pairs and the
    first ``n_new`` new pairs, with its own random stream.
    """
    runs = config.runs()
    model = pretrained.copies(len(runs))
    opt = torch.optim.AdamW(model.parameters(), lr=config.finetune_lr, weight_decay=config.weight_decay)
    keys, values = torch.cat([old[0], new[0]]), torch.cat([old[1], new[1]])  # run r's new pairs: rows n_old..
    samplers = [Replay(len(old[0]), k, w) for k, w in runs]
    rngs = [np.random.default_rng([config.seed, 1, r]) for r in range(len(runs))]
    evals, rows = set(config.eval_steps()), []
    for step in tqdm(range(config.finetune_steps + 1), desc=f"toy fine-tuning ({len(runs)} runs at once)",
                     disable=not progress, unit="step"):
        if step in evals:
            old_acc, old_loss = accuracy_and_loss(model, *old)  # [r] each
            for r, (k, w) in enumerate(runs):
                new_acc, new_loss = accuracy_and_loss(_one(model, r), new[0][:k], new[1][:k])  # its own new set
                rows.append({"run": r, "n_new": k, "replay_weight": w, "step": step,
                             "old_acc": float(old_acc[r]), "old_loss": float(old_loss[r]),
                             "new_acc": float(new_acc[0]), "new_loss": float(new_loss[0])})
        if step == config.finetune_steps:
            break
        idx = np.stack([s(step, config.batch_size, g) for s, g in zip(samplers, rngs)])  # [r, b]
        loss = _loss(model, keys, values, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return pd.DataFrame(rows)


def _one(model: StackedMLP, r: int) -> StackedMLP:
    """Run ``r`` of a stacked model, as a one-run view (no copy)."""
    return StackedMLP(*(p.detach()[r:r + 1] for p in model.parameters()))


@dataclass
class ToyMemoryResult(ResultDisplay):
    """Forgetting in the toy associative memory.

    Attributes:
        config: what ran. pretrain_acc: accuracy on the pre-training pairs after pre-training.
        curves: one row per fine-tuning run × evaluated step (``run, n_new, replay_weight, step, old_acc,
            old_loss, new_acc, new_loss``; ``replay_weight`` 0 = no replay).
        wall_s: seconds the whole computation took.
    """

    config: ToyMemoryConfig
    pretrain_acc: float
    curves: pd.DataFrame
    wall_s: float

    def to_dataframe(self) -> pd.DataFrame:
        return self.curves.copy()

    def final(self) -> pd.DataFrame:
        """Each run's last evaluation, with its lowest old accuracy (the dip) and the step new accuracy reached 0.5."""
        rows = []
        for _, g in self.curves.groupby("run", sort=True):
            last = g.iloc[-1]
            half = g.loc[g["new_acc"] >= 0.5, "step"]
            rows.append({"n_new": int(last["n_new"]), "replay_weight": last["replay_weight"],
                         "min_old_acc": float(g["old_acc"].min()), "old_acc": last["old_acc"],
                         "new_acc": last["new_acc"], "new_acc_0.5_step": int(half.iloc[0]) if len(half) else None})
        return pd.DataFrame(rows)

    def plot(self):
        """Left: old accuracy vs fine-tuning step per new-set size (no replay). Right: final old and new accuracy
        vs replay weight (log scale)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            "Forgetting without replay: accuracy on the pre-training pairs",
            f"{self.config.replay_new} new pairs with replay: end of fine-tuning"))
        plain = self.curves[self.curves["replay_weight"] == 0]
        for k, g in plain.groupby("n_new"):
            fig.add_trace(go.Scatter(x=g["step"], y=g["old_acc"], mode="lines", name=f"{k} new pairs",
                                     hovertemplate=f"{k} new pairs<br>step %{{x}}<br>old accuracy %{{y:.3f}}"
                                                   "<extra></extra>"), 1, 1)
        final = self.final()
        final = final[final["replay_weight"] > 0].sort_values("replay_weight")
        for col, name, dash in (("old_acc", "old pairs", "solid"), ("new_acc", "new pairs", "dash")):
            fig.add_trace(go.Scatter(x=final["replay_weight"], y=final[col], mode="lines+markers",
                                     name=f"{name} (replay)", line=dict(color="black", dash=dash),
                                     hovertemplate=f"{name}<br>weight %{{x:.4g}}<br>accuracy %{{y:.3f}}"
                                                   "<extra></extra>"), 1, 2)
        fig.update_xaxes(title_text="fine-tuning step", row=1, col=1)
        fig.update_xaxes(title_text="replay weight of each old pair (new pairs: 1)", type="log", row=1, col=2)
        fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
        fig.update_layout(template="plotly_white", height=420, width=1000,
                          title=f"Toy associative memory: {self.config.n_pairs} pairs pre-trained "
                                f"(accuracy {self.pretrain_acc:.3f}), fine-tuned at LR {self.config.finetune_lr:g}")
        return fig

    def save(self, out: str | Path) -> None:
        """Write ``toy.json`` (config, pre-training accuracy, wall time) and ``toy_curves.csv``, atomically."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "toy_curves.csv", self.curves.to_csv(index=False))
        atomic_write(out / "toy.json", json.dumps({"config": self.config.to_dict(),
                                                        "pretrain_acc": self.pretrain_acc, "wall_s": self.wall_s}))

    @classmethod
    def load(cls, out: str | Path, config: ToyMemoryConfig | None = None) -> ToyMemoryResult:
        """Read a saved result; with ``config``, refuse one computed for another config."""
        out = Path(out)
        if not (out / "toy.json").is_file() or not (out / "toy_curves.csv").is_file():
            raise CheckpointError(f"{out} holds no toy-memory result (toy.json, toy_curves.csv); run "
                                  f"factlens bios toy --out {out}.")
        meta = json.loads((out / "toy.json").read_text())
        saved = ToyMemoryConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        if config is not None and saved != config:
            diff = [k for k in config.to_dict() if getattr(saved, k) != getattr(config, k)]
            raise CheckpointError(f"{out} holds a toy-memory result of another config (differs in {diff}); use "
                                  "another folder or the same config.")
        return cls(saved, meta["pretrain_acc"], pd.read_csv(out / "toy_curves.csv"), meta["wall_s"])


def run_toy_memory(config: ToyMemoryConfig | None = None, *, progress: bool = True) -> ToyMemoryResult:
    """Pre-train the toy memory, then fine-tune every run of ``config`` from it (see the module docstring)."""
    config = config or ToyMemoryConfig()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(config.seed)
    old = make_pairs(config.n_pairs, config.dim, config.n_classes, g)
    new = make_pairs(config.n_new_pool, config.dim, config.n_classes, g)
    model = pretrain(config, *old, progress=progress)
    pre_acc = float(accuracy_and_loss(model, *old)[0][0])
    curves = finetune(config, model, old, new, progress=progress)
    return ToyMemoryResult(config, pre_acc, curves, time.perf_counter() - t0)


__all__ = ["PAPER_REPLAY_WEIGHTS", "StackedMLP", "ToyMemoryConfig", "ToyMemoryResult", "accuracy_and_loss",
           "finetune", "make_pairs", "pretrain", "run_toy_memory"]

"""The toy associative memory: its data and sampler follow their definitions, fine-tuning starts from the exact
pre-trained weights, and the stacked runs equal separate ``torch.nn`` runs with ``torch.optim.AdamW``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factlens.bios.data.samplers import Replay
from factlens.bios.toy_memory import (
    StackedMLP,
    ToyMemoryConfig,
    ToyMemoryResult,
    accuracy_and_loss,
    finetune,
    make_pairs,
    pretrain,
    run_toy_memory,
)
from factlens.errors import CheckpointError, ConfigError

SMALL = dict(dim=8, hidden=16, n_classes=4, n_pairs=64, pretrain_steps=40, batch_size=8, finetune_steps=12,
             new_sizes=(4, 16), replay_new=8, replay_weights=(2.0, 1 / 8), eval_every=10)


def test_keys_are_unit_norm_gaussian_and_values_balanced_in_every_prefix():
    keys, values = make_pairs(3000, 64, 30, torch.Generator().manual_seed(1))
    assert torch.allclose(keys.norm(dim=-1), torch.ones(3000), atol=1e-6)
    # direction of an isotropic Gaussian: each coordinate has mean 0 and variance 1/d
    assert abs(float(keys.mean())) < 5 / np.sqrt(3000 * 64)
    assert float(keys.pow(2).mean()) == pytest.approx(1 / 64, rel=1e-5)
    for n in (7, 30, 31, 1024, 3000):  # the new sets are prefixes of one pool: each must be balanced
        counts = torch.bincount(values[:n], minlength=30)
        assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize(("n_old", "n_new", "w"), [(8192, 128, 2.0), (8192, 128, 1 / 512), (100, 7, 0.3),
                                                    (64, 16, 0.0)])
def test_replay_share_of_old_pairs_is_the_definition(n_old, n_new, w):
    share = n_old * w / (n_old * w + n_new)  # the paper: each old pair weight w, each new pair weight 1
    sampler = Replay(n_old, n_new, w)
    p = sampler.probabilities(0)
    assert float(p[:n_old].sum()) == pytest.approx(share, abs=1e-12)
    assert np.allclose(p[n_old:], 1 / (n_old * w + n_new))
    draws = sampler(0, 200_000, np.random.default_rng(0))
    old = draws < n_old
    assert abs(old.mean() - share) <= 5 * np.sqrt(share * (1 - share) / 200_000) + 1e-12
    assert draws.min() >= 0 and draws.max() < n_old + n_new
    if w > 0:  # old draws are uniform over old pairs, new draws uniform over new pairs
        assert len(np.unique(draws[old])) > 0.9 * min(n_old, old.sum())
    assert len(np.unique(draws[~old])) == n_new


def test_config_runs_and_eval_schedule():
    cfg = ToyMemoryConfig()
    assert cfg.runs()[:6] == [(k, 0.0) for k in (32, 64, 128, 256, 512, 1024)]
    assert [w for _, w in cfg.runs()[6:]] == [2.0 ** -k for k in range(-1, 10)]  # 2 ... 1/512
    steps = cfg.eval_steps()
    assert steps[0] == 0 and steps[-1] == 4000 and 10 in steps and 1000 in steps and 1050 not in steps
    with pytest.raises(ConfigError, match="replay_weights"):
        ToyMemoryConfig(replay_weights=(-1.0,))
    with pytest.raises(ConfigError, match="unknown toy preset"):
        ToyMemoryConfig.preset("huge")


def test_finetuning_starts_from_the_exact_pretrained_weights():
    cfg = ToyMemoryConfig(**SMALL)
    g = torch.Generator().manual_seed(0)
    old, new = make_pairs(cfg.n_pairs, cfg.dim, cfg.n_classes, g), make_pairs(cfg.n_new_pool, cfg.dim,
                                                                               cfg.n_classes, g)
    model = pretrain(cfg, *old, progress=False)
    copies = model.copies(len(cfg.runs()))
    for p, q in zip(model.parameters(), copies.parameters()):
        assert torch.equal(q, p.expand_as(q)) and q.data_ptr() != p.data_ptr()
    acc, loss = accuracy_and_loss(model, *old)
    curves = finetune(cfg, model, old, new, progress=False)
    start = curves[curves["step"] == 0]
    assert len(start) == len(cfg.runs())
    assert (start["old_acc"] == float(acc[0])).all() and (start["old_loss"] == float(loss[0])).all()
    # the pre-trained model itself is untouched by fine-tuning
    assert torch.equal(accuracy_and_loss(model, *old)[1], loss)


def _reference_run(cfg, model, old, new, r, n_new, w):
    """One fine-tuning run as plain torch.nn + torch.optim.AdamW on the same batches."""
    net = torch.nn.Sequential(torch.nn.Linear(cfg.dim, cfg.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(cfg.hidden, cfg.n_classes))
    with torch.no_grad():
        net[0].weight.copy_(model.w1[0].T), net[0].bias.copy_(model.b1[0])
        net[2].weight.copy_(model.w2[0].T), net[2].bias.copy_(model.b2[0])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    keys, values = torch.cat([old[0], new[0]]), torch.cat([old[1], new[1]])
    sampler, rng = Replay(len(old[0]), n_new, w), np.random.default_rng([cfg.seed, 1, r])
    losses = {}
    for step in range(cfg.finetune_steps + 1):
        if step in cfg.eval_steps():
            with torch.no_grad():
                losses[step] = float(F.cross_entropy(net(old[0]), old[1]))
        if step == cfg.finetune_steps:
            break
        i = torch.from_numpy(sampler(step, cfg.batch_size, rng))
        loss = F.cross_entropy(net(keys[i]), values[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_stacked_runs_equal_separate_torch_runs():
    cfg = ToyMemoryConfig(**SMALL)
    g = torch.Generator().manual_seed(0)
    old, new = make_pairs(cfg.n_pairs, cfg.dim, cfg.n_classes, g), make_pairs(cfg.n_new_pool, cfg.dim,
                                                                               cfg.n_classes, g)
    model = pretrain(cfg, *old, progress=False)
    curves = finetune(cfg, model, old, new, progress=False)
    for r, (n_new, w) in enumerate(cfg.runs()):
        ref = _reference_run(cfg, model, old, new, r, n_new, w)
        mine = curves[curves["run"] == r].set_index("step")["old_loss"]
        assert list(mine.index) == sorted(ref)
        assert np.allclose(mine.to_numpy(), [ref[s] for s in sorted(ref)], rtol=1e-5, atol=1e-6)
        assert mine.iloc[-1] != mine.iloc[0]  # it did train


def test_pretraining_learns_and_result_round_trips(tmp_path):
    result = run_toy_memory(ToyMemoryConfig.preset("tiny"), progress=False)
    chance = 1 / result.config.n_classes
    assert result.pretrain_acc > 2 * chance
    final = result.final()
    assert len(final) == len(result.config.runs())
    fig = result.plot()
    assert len(fig.data) == len(result.config.new_sizes) + 2
    result.save(tmp_path)
    back = ToyMemoryResult.load(tmp_path, result.config)
    assert back.config == result.config and back.pretrain_acc == result.pretrain_acc
    assert np.allclose(back.curves[["old_acc", "new_acc"]], result.curves[["old_acc", "new_acc"]])
    with pytest.raises(CheckpointError, match="another config"):
        ToyMemoryResult.load(tmp_path, ToyMemoryConfig.preset("tiny", seed=1))
    with pytest.raises(CheckpointError, match="factlens bios toy"):
        ToyMemoryResult.load(tmp_path / "nothing")


def test_stacked_mlp_init_is_torch_linear_default():
    mlp = StackedMLP.init(3, 5, 7, 2, seed=4)
    torch.manual_seed(4)
    first = torch.nn.Linear(5, 7)
    assert torch.equal(mlp.w1[2], first.weight.T) and torch.equal(mlp.b1[0], first.bias)


def test_cli_toy_writes_result_and_figure(tmp_path, capsys):
    from factlens.cli import main

    assert main(["bios", "toy", "--preset", "tiny", "--new-sizes", "4", "--replay-weights", "1", "--out",
                 str(tmp_path), "--quiet"]) == 0
    assert {"toy.json", "toy_curves.csv", "toy.html"} <= {p.name for p in tmp_path.iterdir()}
    result = ToyMemoryResult.load(tmp_path)
    assert result.config.new_sizes == (4,) and result.config.replay_weights == (1.0,)
    assert "pre-training accuracy" in capsys.readouterr().out

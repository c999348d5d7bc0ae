# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data curricula and hallucinations (Zucchet et al. 2025)
#
# The order and frequency in which people appear changes how fast facts are learned. This notebook trains the
# same model on the same biographies with four samplers: **uniform**, an **inverse power law** (α = 0.6), a
# **celebrities** distribution (a few people seen 8× more often) and a **warm-up** (first only a small subset,
# then everyone), and compares their learning curves. It then looks at what the models say about people they
# never saw: hallucinations grow as knowledge is acquired.
#
# Set `FACTLENS_TINY=1` for a smoke run (tiny model, 30 steps per sampler: the numbers mean nothing); by
# default each run uses the `demo` preset (a few minutes per run on 2 CPU cores).

# %% tags=["parameters"]
import os
from pathlib import Path

TINY = os.environ.get("FACTLENS_TINY", "0") not in ("", "0", "false", "False")
OUT = Path(os.environ.get("FACTLENS_OUT", "out/examples")) / "curricula_and_hallucinations"
OUT.mkdir(parents=True, exist_ok=True)

# %%
import shutil

import pandas as pd

from factlens.bios import TrainConfig, make_sampler, train
from factlens.bios.history import compare_runs
from factlens.figures import notebook_renderer, png_support, write_png

base = TrainConfig.preset("tiny", steps=30, checkpoint_every=10) if TINY else TrainConfig.preset("demo")
n, steps, bs = base.n_people, base.steps, base.batch_size
SAMPLERS = {
    "uniform": {"kind": "uniform"},
    "power law (α=0.6)": {"kind": "power_law", "alpha": 0.6},
    # as in the paper: 1/16 of the people are celebrities, each seen 8x as often as anyone else
    "celebrities": {"kind": "celebrities", "n_celebrities": max(1, n // 16), "weight": 8},
    # as in the paper: 1/8 of the people first, for about the first 10% of training
    "warm-up": {"kind": "warmup", "n_warmup": max(1, n // 8), "epochs": 0.1 * steps * bs / n},
}
for name, spec in SAMPLERS.items():
    print(f"{name:18s} {make_sampler(spec, n=n, batch_size=bs).describe()}")
RUNS = OUT / "runs"
shutil.rmtree(RUNS, ignore_errors=True)  # start from scratch (train() would otherwise resume)

notebook_renderer()  # figures carry plotly.js: they survive saving and `jupyter nbconvert --to html`


def show(fig, name):
    """Show a figure and save it as HTML under OUT."""
    fig.show()
    fig.write_html(OUT / f"{name}.html")
    return fig


# %% [markdown]
# ## 1. Train one run per sampler
# Everything but the sampler is identical: model initialisation, population, templates, evaluation set.

# %%
histories = {}
for i, (name, spec) in enumerate(SAMPLERS.items()):
    config = TrainConfig.from_dict({**base.to_dict(), "sampler": spec})
    histories[name] = train(config, RUNS / f"run{i}_{spec['kind']}", progress=False)

# %% [markdown]
# ## 2. Final knowledge
# Attribute loss (nats) and accuracy on held-out templates of the training people at the end of training.
# In the paper, imbalanced distributions (power law, warm-up) shorten the plateau at equal compute.

# %%
final = pd.DataFrame({name: {"attr_loss": h.final["attr_loss"], "attr_acc": h.final["attr_acc"],
                             "plateau_end": h.plateau_end()} for name, h in histories.items()}).T
final.round(3)

# %% [markdown]
# ## 3. Learning curves
# Attribute loss (log scale) and accuracy against training step for the four samplers; the dashed line is the
# no-knowledge baseline (the loss of a model that knows the pools but not the people).

# %%
curves = compare_runs(histories, title="Knowledge acquisition under four data distributions")
main_fig = show(curves, "learning_curves")

# %% [markdown]
# ## 4. Hallucinations on unseen people
# Biographies of people never seen in training: the loss on their attributes (high = the model cannot know),
# the probability of its top prediction (confidence) and the entropy of its prediction. A model that
# becomes confident about people it never saw is hallucinating.

# %%
halluc = pd.DataFrame({name: {"unseen_attr_loss": h.final["unseen_attr_loss"],
                              "unseen_top_prob": h.final["unseen_top_prob"],
                              "unseen_entropy": h.final["unseen_entropy"]} for name, h in histories.items()}).T
hfig = compare_runs(histories, metrics=("unseen_attr_loss", "unseen_top_prob", "unseen_entropy"),
                    title="Hallucination metrics on unseen people")
show(hfig, "hallucinations")
halluc.round(3)

# %% [markdown]
# ## Static export
# A PNG of the learning curves, where this machine can export PNGs (the `png` extra and a Chrome or
# Chromium browser; `png_support()` says what is missing otherwise).

# %%
ok, why = png_support()
if ok:
    print("wrote", write_png(main_fig, OUT / "learning_curves.png"))
else:
    print(why)

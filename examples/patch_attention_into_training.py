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
# # Patching attention into a training run (Zucchet et al. 2025)
#
# A small transformer trained on synthetic biographies first drops to the "no-knowledge" loss, sits on a
# **plateau**, then acquires the facts. The paper shows that the plateau is the time it takes to build the
# attention circuits: a fresh run whose attention patterns are patched in from a post-plateau checkpoint of a
# reference run skips it.
#
# Set `FACTLENS_TINY=1` for a seconds-long smoke run (tiny model, 40 steps: no plateau to see); by default
# the `demo` preset runs (a few minutes on 2 CPU cores).

# %% tags=["parameters"]
import os
from pathlib import Path

TINY = os.environ.get("FACTLENS_TINY", "0") not in ("", "0", "false", "False")
OUT = Path(os.environ.get("FACTLENS_OUT", "out/examples")) / "patch_attention_into_training"
OUT.mkdir(parents=True, exist_ok=True)

# %%
import shutil

from factlens.bios import PatchConfig, TrainConfig, train
from factlens.bios.history import TrainingHistory
from factlens.bios.patching.circuits import attention_to_name
from factlens.checkpoints import list_checkpoints
from factlens.figures import notebook_renderer, png_support, write_png

if TINY:
    config = TrainConfig.preset("tiny", steps=40, checkpoint_every=10, n_people=64)
else:
    config = TrainConfig.preset("demo")
RUNS = OUT / "runs"
shutil.rmtree(RUNS, ignore_errors=True)  # start from scratch (train() would otherwise resume)

notebook_renderer()  # figures carry plotly.js: they survive saving and `jupyter nbconvert --to html`


def show(fig, name):
    """Show a figure and save it as HTML under OUT."""
    fig.show()
    fig.write_html(OUT / f"{name}.html")
    return fig


# %% [markdown]
# ## 1. The reference run
# An ordinary run with checkpoints every `checkpoint_every` steps. Its learning curve shows the initial drop,
# the plateau near the no-knowledge baseline (dashed) and knowledge emergence.

# %%
reference = train(config, RUNS / "reference", progress=False)
print(f"final attribute loss {reference.final['attr_loss']:.3f} nats, accuracy {reference.final['attr_acc']:.3f}; "
      f"plateau ends at step {reference.plateau_end()}")
show(reference.plot("Reference run"), "reference_curves")

# %% [markdown]
# ## 2. A fresh run with attention patched from the last checkpoint
# Same initial weights and data stream; from step 0 (`start_patching=0`) every layer's attention pattern is
# replaced by the one the reference's last (post-plateau) checkpoint computes on the same batch.

# %%
ref_step = list_checkpoints(RUNS / "reference" / "checkpoints")[-1]
patched_config = TrainConfig.from_dict(config.to_dict())
patched_config.patch = PatchConfig(reference=str(RUNS / "reference"), reference_step=ref_step, start_patching=0)
patched = train(patched_config, RUNS / "patched", progress=False)
print(f"patched from step {ref_step}: final attribute loss {patched.final['attr_loss']:.3f} nats, "
      f"accuracy {patched.final['attr_acc']:.3f}")

# %% [markdown]
# ## 3. The two learning curves
# Attribute loss on held-out templates against training step. With patched attention the plateau shrinks
# or disappears: the model only has to learn the MLP-side associations. (In tiny mode the two curves are a
# smoke run and show nothing; the CPU-scale patching figure in docs/reproduction.md comes from
# `factlens bios reproduce --scale cpu`.)

# %%
# a tiny-mode run is a smoke test (a 2 x 32 model, 40 steps, no plateau): its title says so
title = ("Smoke run (FACTLENS_TINY: tiny model, 40 steps, no plateau; not a result)" if TINY
         else f"Attention patched from step {ref_step} of the reference run vs the reference itself (demo preset)")
curves = reference.compare(patched, labels=["reference", f"patched from step {ref_step}"], title=title)
main_fig = show(curves, "learning_curves")

# %% [markdown]
# ## 4. Attention to the name over the reference run
# The circuits the patch transplants: name grouping (layer 0, the first, attends from the name's last token
# to its first tokens) and extraction (the last layer attends from the attribute position to the name). Their
# attention mass rises as the plateau ends. Layers are numbered from 0, as in TransformerLens.

# %%
atn = attention_to_name(RUNS / "reference", n_sequences=32 if TINY else 256, progress=False)
show(atn.plot(), "attention_to_name")
atn.to_dataframe().pivot_table(index="step", columns=["circuit", "layer"], values="attention").round(3)

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

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
# # Country → capital recall in GPT-2 (Lv et al. 2024)
#
# This notebook walks through the paper's analysis of zero-shot factual recall ("The capital of France is")
# with `factlens.capitals`: where the answer appears (logit lens), which components carry it (path patching,
# mover heads), what the last MLP adds (decomposition), and how the final layer's anti-overconfidence
# mechanism can be switched off (mitigations).
#
# Set `FACTLENS_TINY=1` to run on a random-weight GPT-2 twin (offline, seconds; numbers are meaningless but
# every step runs). By default the real GPT-2 small is loaded from the Hugging Face hub.

# %% tags=["parameters"]
import os
from pathlib import Path

TINY = os.environ.get("FACTLENS_TINY", "0") not in ("", "0", "false", "False")
OUT = Path(os.environ.get("FACTLENS_OUT", "out/examples")) / "capitals_zero_shot"
OUT.mkdir(parents=True, exist_ok=True)
SHOTS = [0] if TINY else [0, 1, 2]
FOLDS = 3 if TINY else 5

# %%
import pandas as pd

import factlens
from factlens import capitals, recall
from factlens.figures import notebook_renderer, png_support, write_png

model = factlens.tiny("gpt2", compat=True) if TINY else factlens.load("gpt2")
model.eval()
print("tiny random twin" if TINY else "GPT-2 small", f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads")

notebook_renderer()  # figures carry plotly.js: they survive saving and `jupyter nbconvert --to html`


def show(fig, name):
    """Show a figure and save it as HTML under OUT."""
    fig.show()
    fig.write_html(OUT / f"{name}.html")
    return fig


# %% [markdown]
# ## 1. The dataset
# `dataset_for` builds the country → capital prompts with the paper's tokenizer convention for this model
# family (GPT-2: raw BPE, no BOS). Each prompt ends at the position `end` where the capital should be predicted.

# %%
ds = capitals.dataset(model)
print(len(ds), "prompts")

# %% [markdown]
# ## 2. Logit lens
# P(answer) and the answer's rank after every layer, read through the final LayerNorm and the unembedding.
# In GPT-2 the capital only becomes likely in the last few layers.

# %%
lens = recall.logit_lens(model, ds)
show(lens.plot(), "logit_lens")

# %% [markdown]
# ## 3. Path patching
# Each head's and MLP's path to the final residual stream is patched with its activation on a counterfactual
# prompt (another country); the heat-map shows the % change in the answer logit. Large negative cells are the
# components that carry the fact.

# %%
pp = recall.path_patch(model, ds, progress=False)
main_fig = show(pp.plot(), "path_patching")
pp.top(10)

# %% [markdown]
# ## 4. Mover heads
# A mover head attends from `end` to the subject (the country) and writes its identity into the residual: its
# attention to the subject correlates with the projection of its output onto the subject's unembedding.

# %%
movers = recall.mover_scores(model, ds)
show(movers.plot(), "movers")
movers.top(5)

# %% [markdown]
# ## 5. Decomposing the last MLP
# The last MLP's output is regressed on the last layer's head outputs: `mlp_out ≈ Σ β·head + c`. The
# intercept `c` is the same for every prompt; read in the vocabulary it promotes generic, frequent tokens
# rather than any capital.

# %%
dec = recall.decompose_mlp(model, ds, layer=-1)
print(f"R² = {dec.r2:.3f}")
show(dec.plot(), "mlp_decomposition")
dec.intercept_table().head(10)

# %% [markdown]
# ## 6. What the final layer does
# P(answer) before and after the last layer, and each last-layer component's direct effect on the answer
# logit. In GPT-2 the final layer *lowers* the answer's probability: an anti-overconfidence mechanism.

# %%
effect = recall.final_layer_effect(model, ds)
print(effect.summary())
show(effect.plot(), "final_layer_effect")

# %% [markdown]
# ## 7. Mitigations
# (a) the last layer's heads attend only to themselves at `end`; (b) the MLP intercept `c` is subtracted
# (fitted on held-out templates, k folds); (a)+(b) both. The table compares recall accuracy with the baseline.

# %%
table = capitals.mitigation_table(model, shots=SHOTS, folds=FOLDS, progress=False)
show(table.plot(), "mitigation_table")
table.to_dataframe()

# %% [markdown]
# ## Static export
# A PNG of the main figure (path patching), where this machine can export PNGs (the `png` extra and a Chrome or
# Chromium browser; `png_support()` says what is missing otherwise).

# %%
ok, why = png_support()
if ok:
    print("wrote", write_png(main_fig, OUT / "path_patching.png", width=900, height=600))
else:
    print(why)

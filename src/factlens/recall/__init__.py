"""Lv et al. (2024), *Interpreting key mechanisms of factual recall*: the recall analyses for any relation.

- :mod:`~factlens.recall.relations` and :mod:`~factlens.recall.datasets`: relations (country→capital and any
  other) and their tokenized prompt datasets with the named positions ``N``, ``N-1``, ``R``, ``end``.
- :mod:`~factlens.recall.forward`: the forward pass at ``end`` every analysis reads (:func:`run_at_end`,
  :class:`EndRun`) and how the model's parameters are read (unembedding, head outputs).
- :mod:`~factlens.recall.metrics`: the metrics at ``end`` (P, rank, logit differences, TL-style metric
  callables); :mod:`~factlens.recall.lens`: the logit lens.
- :mod:`~factlens.recall.path_patching`: heads/MLPs → final residual path patching, batched.
- :mod:`~factlens.recall.movers`: the mover-head check (attention to the subject vs. its unembedding).
- :mod:`~factlens.recall.mlp_decomposition` (the model side) and :mod:`~factlens.recall.regression` (the
  pure-torch fit): ``mlp_out ≈ Σ β_j head_j + c`` and the intercept's vocabulary.
- :mod:`~factlens.recall.final_layer`: what the last layer does to the answer (Lv et al.'s detection and an
  exact split); :mod:`~factlens.recall.mitigation`: mitigations (a)/(b) and their table.
- :mod:`~factlens.recall.report`: :func:`analyze`, everything above from one shared pass, written to a folder.

Each analysis declares the hooks it reads (``*_hooks(model)``) and takes a shared ``run=`` holding them.
:mod:`factlens.capitals` is the country→capital entry point on top of this package.

Example:
    >>> import factlens
    >>> from factlens import recall
    >>> model = factlens.tiny("gpt2")
    >>> ds = recall.dataset_for(model)                     # country→capital by default
    >>> res = recall.path_patch(model, ds, progress=False)
    >>> res.values.shape[0] == model.cfg.n_layers
    True
"""


from factlens.recall.datasets import (
    PromptSpec,
    RelationDataset,
    dataset_for,
    make_dataset,
    make_prompt_dataset,
)
from factlens.recall.final_layer import (
    FinalLayerEffect,
    FinalLayerSplit,
    final_layer_effect,
    final_layer_hooks,
    final_layer_split,
)
from factlens.recall.forward import EndRun, require_eval, run_at_end, unembed_params
from factlens.recall.lens import LogitLensResult, logit_lens, logit_lens_hooks
from factlens.recall.metrics import (
    answer_logprob,
    answer_prob,
    answer_rank,
    end_logits,
    is_correct,
    logit_diff,
    metric,
)
from factlens.recall.mitigation import (
    METHODS,
    PAPER_REFERENCE,
    MitigationTable,
    check_intercept,
    evaluate,
    fit_intercept,
    mitigate,
    mitigation_hooks,
    mitigation_table,
    template_folds,
)
from factlens.recall.mlp_decomposition import (
    MLPActivations,
    MLPDecompositionResult,
    capture_mlp_activations,
    decompose_from_activations,
    decompose_mlp,
    mlp_activation_hooks,
)
from factlens.recall.movers import MoverResult, mover_hooks, mover_scores, pearson
from factlens.recall.path_patching import PathPatchingResult, path_patch, path_patch_hooks
from factlens.recall.regression import (
    Decomposition,
    GroupedDecomposition,
    VocabProjection,
    fit_decomposition,
    fit_per_group,
    project_to_vocab,
)
from factlens.recall.relations import CAPITALS, CAPITALS_APPENDIX, Relation, make_relation
from factlens.recall.report import CapitalsReport, analyze, shared_hooks

__all__ = ["CAPITALS", "CAPITALS_APPENDIX", "METHODS", "PAPER_REFERENCE", "CapitalsReport", "Decomposition",
    "EndRun", "FinalLayerEffect", "FinalLayerSplit", "GroupedDecomposition", "LogitLensResult", "MLPActivations",
    "MLPDecompositionResult", "MitigationTable", "MoverResult", "PathPatchingResult", "PromptSpec", "Relation",
    "RelationDataset", "VocabProjection", "analyze", "answer_logprob", "answer_prob", "answer_rank",
    "capture_mlp_activations", "check_intercept", "dataset_for", "decompose_from_activations", "decompose_mlp",
    "end_logits", "evaluate", "final_layer_effect", "final_layer_hooks", "final_layer_split", "fit_decomposition",
    "fit_intercept", "fit_per_group", "is_correct", "logit_diff", "logit_lens", "logit_lens_hooks", "make_dataset",
    "make_prompt_dataset", "make_relation", "metric", "mitigate", "mitigation_hooks", "mitigation_table",
    "mlp_activation_hooks", "mover_hooks", "mover_scores", "path_patch", "path_patch_hooks", "pearson",
    "project_to_vocab", "require_eval", "run_at_end", "shared_hooks", "template_folds", "unembed_params"]

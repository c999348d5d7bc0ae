"""Lv et al. (2024), *Interpreting key mechanisms of factual recall*: the recall analyses for any relation.

- :mod:`~factlens.recall.relations` and :mod:`~factlens.recall.datasets`: relations (country→capital and any
  other) and their tokenized prompt datasets with the named positions ``N``, ``N-1``, ``R``, ``end``.
- :mod:`~factlens.recall.metrics`: metrics at ``end`` (P, rank, logit differences, TL-style metric callables)
  and the shared forward-pass helper; :mod:`~factlens.recall.logit_lens`: the logit lens.
- :mod:`~factlens.recall.path_patching`: heads/MLPs → final residual path patching, batched, plus the
  literal one-sender-at-a-time reference.
- :mod:`~factlens.recall.movers`: the mover-head check (attention to the subject vs. its unembedding).
- :mod:`~factlens.recall.decompose` (the regression) and :mod:`~factlens.recall.mlp_decomposition`:
  ``mlp_out ≈ Σ β_j head_j + c`` and the intercept's vocabulary.
- :mod:`~factlens.recall.mitigate`: the final-layer anti-overconfidence mechanism and mitigations (a)/(b).
- :mod:`~factlens.recall.report`: :func:`analyze`, everything above written to a folder.

:mod:`factlens.capitals` is the same API under the name of its country→capital preset.

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
from factlens.recall.decompose import (
    Decomposition,
    GroupedDecomposition,
    VocabProjection,
    fit_decomposition,
    fit_per_group,
    project_to_vocab,
)
from factlens.recall.logit_lens import LogitLensResult, logit_lens
from factlens.recall.metrics import (
    EndRun,
    answer_logprob,
    answer_prob,
    answer_rank,
    end_logits,
    is_correct,
    logit_diff,
    metric,
    require_eval,
    run_at_end,
    unembed_params,
)
from factlens.recall.mitigate import (
    METHODS,
    PAPER_REFERENCE,
    FinalLayerEffect,
    MitigationTable,
    check_intercept,
    evaluate,
    final_layer_effect,
    fit_intercept,
    mitigate,
    mitigation_table,
    template_folds,
)
from factlens.recall.mlp_decomposition import (
    MLPActivations,
    MLPDecompositionResult,
    capture_mlp_activations,
    decompose_from_activations,
    decompose_mlp,
)
from factlens.recall.movers import MoverResult, mover_scores, pearson
from factlens.recall.path_patching import PathPatchingResult, path_patch, path_patch_reference
from factlens.recall.relations import CAPITALS, CAPITALS_APPENDIX, Relation, make_relation
from factlens.recall.report import CapitalsReport, analyze

__all__ = [
    "CAPITALS",
    "CAPITALS_APPENDIX",
    "METHODS",
    "PAPER_REFERENCE",
    "CapitalsReport",
    "Decomposition",
    "EndRun",
    "FinalLayerEffect",
    "GroupedDecomposition",
    "LogitLensResult",
    "MLPActivations",
    "MLPDecompositionResult",
    "MitigationTable",
    "MoverResult",
    "PathPatchingResult",
    "PromptSpec",
    "Relation",
    "RelationDataset",
    "VocabProjection",
    "analyze",
    "answer_logprob",
    "answer_prob",
    "answer_rank",
    "capture_mlp_activations",
    "check_intercept",
    "dataset_for",
    "decompose_from_activations",
    "decompose_mlp",
    "end_logits",
    "evaluate",
    "final_layer_effect",
    "fit_decomposition",
    "fit_intercept",
    "fit_per_group",
    "is_correct",
    "logit_diff",
    "logit_lens",
    "make_dataset",
    "make_prompt_dataset",
    "make_relation",
    "metric",
    "mitigate",
    "mitigation_table",
    "mover_scores",
    "path_patch",
    "path_patch_reference",
    "pearson",
    "project_to_vocab",
    "require_eval",
    "run_at_end",
    "template_folds",
    "unembed_params",
]

"""Lv et al. (2024) country → capital analysis on TransformerLens bridges (GPT-2 and OPT).

- :mod:`~factlens.capitals.recall`: metrics at ``end`` (P, rank, logit differences, TL-style metric
  callables) and the logit lens.
- :mod:`~factlens.capitals.path_patching`: heads/MLPs → final residual path patching, batched, plus the
  literal one-sender-at-a-time reference.
- :mod:`~factlens.capitals.movers`: the mover-head check (attention to the subject vs. its unembedding).
- :mod:`~factlens.capitals.mlp_decomposition`: ``mlp_out ≈ Σ β_j head_j + c`` and the intercept's vocabulary.
- :mod:`~factlens.capitals.mitigate`: the final-layer anti-overconfidence mechanism and mitigations (a)/(b).
- :mod:`~factlens.capitals.report`: :func:`analyze`, everything above written to a folder.

Example:
    >>> import factlens
    >>> from factlens import capitals
    >>> model = factlens.tiny("gpt2")
    >>> ds = capitals.dataset_for(model)
    >>> res = capitals.path_patch(model, ds, progress=False)
    >>> table = capitals.mitigation_table(model, shots=[0], folds=3, progress=False)
"""

from factlens.capitals.mitigate import (
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
from factlens.capitals.mlp_decomposition import (
    MLPActivations,
    MLPDecompositionResult,
    capture_mlp_activations,
    decompose_from_activations,
    decompose_mlp,
)
from factlens.capitals.movers import MoverResult, mover_scores, pearson
from factlens.capitals.path_patching import PathPatchingResult, path_patch, path_patch_reference
from factlens.capitals.recall import (
    EndRun,
    LogitLensResult,
    answer_logprob,
    answer_prob,
    answer_rank,
    dataset_for,
    end_logits,
    is_correct,
    logit_diff,
    logit_lens,
    metric,
    require_eval,
    run_at_end,
    unembed_params,
)
from factlens.capitals.report import CapitalsReport, analyze

__all__ = [
    "METHODS",
    "PAPER_REFERENCE",
    "CapitalsReport",
    "EndRun",
    "FinalLayerEffect",
    "LogitLensResult",
    "MLPActivations",
    "MLPDecompositionResult",
    "MitigationTable",
    "MoverResult",
    "PathPatchingResult",
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
    "fit_intercept",
    "is_correct",
    "logit_diff",
    "logit_lens",
    "metric",
    "mitigate",
    "mitigation_table",
    "mover_scores",
    "path_patch",
    "path_patch_reference",
    "pearson",
    "require_eval",
    "run_at_end",
    "template_folds",
    "unembed_params",
]

"""Country→capital recall, the relation Lv et al. (2024) study: its prompts, its analysis and its mitigation table.

A thin entry point over :mod:`factlens.recall`, where every analysis lives and is documented; this module fixes
the relation to the paper's :data:`~factlens.recall.relations.CAPITALS` (15 countries × 15 lead-ins, 225
zero-shot prompts; ``shots=k`` adds k demonstrations; ``appendix=True`` takes the appendix templates
``[N]'s capital is``). For any other relation, or for one analysis at a time (``path_patch``,
``decompose_mlp``, ``final_layer_effect``...), use :mod:`factlens.recall`.

Example:
    >>> import factlens
    >>> from factlens import capitals
    >>> model = factlens.tiny("gpt2")
    >>> len(capitals.dataset(model))
    225
    >>> table = capitals.mitigation_table(model, shots=[0], folds=3, progress=False)
    >>> table.cell(0, "a+b") >= 0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factlens.recall import __all__ as _RECALL_NAMES
from factlens.recall.datasets import RelationDataset, dataset_for
from factlens.recall.mitigation import MitigationTable
from factlens.recall.mitigation import mitigation_table as _mitigation_table
from factlens.recall.relations import CAPITALS, CAPITALS_APPENDIX
from factlens.recall.report import CapitalsReport
from factlens.recall.report import analyze as _analyze

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def _relation(appendix: bool):
    return CAPITALS_APPENDIX if appendix else CAPITALS


def dataset(model: TransformerBridge, shots: int = 0, *, appendix: bool = False, n: int | None = None,
            seed: int = 0) -> RelationDataset:
    """The paper's country→capital prompts, tokenized for ``model``, with the positions ``N``, ``N-1``, ``R``, ``end``.

    Args:
        shots: Demonstrations (``The capital of X is Y.``) before each prompt.
        appendix: The appendix templates (``[N]'s capital is``) instead of the main ones.
        n: A seeded subset of this many prompts (None: all).

    Example:
        >>> import factlens
        >>> from factlens import capitals
        >>> model = factlens.tiny("gpt2")
        >>> ds = capitals.dataset(model, shots=1, n=4)
        >>> len(ds), ds.answers[0] in ds.prompts[0]                   # the demonstration is another country
        (4, False)
    """
    return dataset_for(model, _relation(appendix), shots=shots, n=n, seed=seed)


def analyze(model: TransformerBridge, shots: int = 0, out_dir: str | Path | None = None, *, appendix: bool = False,
            **options: Any) -> CapitalsReport:
    """The whole Lv et al. analysis of country→capital recall (:func:`factlens.recall.analyze` on
    :data:`~factlens.recall.relations.CAPITALS`); ``options`` are that function's (``n``, ``folds``, ``top_k``,
    ``seed``, ``max_batch``, ``patch_batch``, ``progress``).

    Example:
        >>> import tempfile, factlens
        >>> from factlens import capitals
        >>> report = capitals.analyze(factlens.tiny("gpt2"), out_dir=tempfile.mkdtemp(), n=45, folds=3,
        ...                           progress=False)
        >>> report.path_patching.values.shape
        torch.Size([2, 4])
    """
    return _analyze(model, _relation(appendix), shots=shots, out_dir=out_dir, **options)


def mitigation_table(model: TransformerBridge, shots: Sequence[int] = (0, 1, 2), *, appendix: bool = False,
                     **options: Any) -> MitigationTable:
    """Lv et al.'s mitigation table for country→capital recall, beside the paper's published numbers where the
    model is one the paper ran (:func:`factlens.recall.mitigation_table` on
    :data:`~factlens.recall.relations.CAPITALS`; ``options`` are that function's: ``folds``, ``heads``,
    ``coeff``, ``pooled``, ``n``...).

    Example:
        >>> import factlens
        >>> from factlens import capitals
        >>> table = capitals.mitigation_table(factlens.tiny("gpt2"), shots=[0], folds=3, n=45, progress=False)
        >>> list(table.rows["method"])
        ['baseline', 'a', 'b', 'a+b']
    """
    return _mitigation_table(model, _relation(appendix), shots=shots, **options)


def __getattr__(name: str):
    if name in _RECALL_NAMES:
        raise AttributeError(f"factlens.capitals has only the country→capital entry points (dataset, analyze, "
                             f"mitigation_table); {name} is in factlens.recall: from factlens.recall import {name}")
    raise AttributeError(f"module 'factlens.capitals' has no attribute {name!r}")


__all__ = ["analyze", "dataset", "mitigation_table"]

"""Recall metrics read at ``end`` (Lv et al. 2024 §2.3, §6 detection): the one definition of each metric kind.

Every metric takes logits of a whole dataset, either ``[n, pos, vocab]`` (the model's output, read at each
prompt's ``dataset.end``) or ``[n, vocab]`` (already at ``end``), and returns one value per prompt. Ranks
are 0-based (0 = the answer is the argmax), as in :mod:`factlens.recall.regression`.

The metric kinds (:data:`METRIC_KINDS`) are defined once, in :func:`kind_values`; :func:`linear_kind` is the
part of it for the kinds linear in the logits (``iw``, ``n``, ``iw-n``, ``logit``), which path patching
evaluates from three unembedding columns instead of the whole vocabulary.

Example:
    >>> import factlens
    >>> from factlens.recall.datasets import dataset_for
    >>> from factlens.recall.forward import run_at_end
    >>> from factlens.recall.metrics import answer_prob
    >>> model = factlens.tiny("gpt2")
    >>> ds = dataset_for(model)
    >>> answer_prob(run_at_end(model, ds).logits, ds).shape
    torch.Size([225])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float, Int

from factlens.errors import ConfigError, ShapeError
from factlens.inputs import at_least_fp32
from factlens.recall.datasets import RelationDataset

LogitDiffVariant = Literal["iw", "n", "iw-n"]
LINEAR_KINDS = ("iw", "n", "iw-n", "logit")
METRIC_KINDS = ("iw", "n", "iw-n", "prob", "logprob", "logit")
Metric = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------- metrics
def end_logits(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> Float[torch.Tensor, "n vocab"]:
    """Logits at ``end``: ``[n, pos, vocab]`` is indexed at ``dataset.end``; ``[n, vocab]`` is returned as is."""
    if logits.ndim not in (2, 3) or logits.shape[0] != len(dataset):
        raise ShapeError(f"logits of shape {tuple(logits.shape)} for a dataset of {len(dataset)} prompts; pass "
                         "[n, pos, vocab] model output or [n, vocab] logits at end, in dataset order")
    tag = getattr(logits, "_factlens_dataset", None)
    if tag is not None and tag != dataset.fingerprint:
        raise ShapeError(f"these logits come from another dataset (fingerprint {tag} vs {dataset.fingerprint}); "
                         "score each dataset's logits with a metric built for it: metric(dataset, kind).")
    if logits.ndim == 3 and logits.shape[1] != dataset.tokens.shape[1]:
        raise ShapeError(f"logits have {logits.shape[1]} positions but the dataset's prompts are "
                         f"{dataset.tokens.shape[1]} tokens wide: they come from other tokens (another dataset?). "
                         "Run the model on this dataset's tokens (model(dataset.tokens)), or build the metric for "
                         "the dataset you ran: metric(dataset, kind).")
    if logits.ndim == 2:
        return logits
    ends = dataset.end.to(logits.device)
    if int(ends.max()) >= logits.shape[1]:
        raise ShapeError(f"dataset.end reaches {int(ends.max())} but logits have {logits.shape[1]} positions; run "
                         "the model on dataset.tokens")
    return logits[torch.arange(logits.shape[0], device=logits.device), ends]


def _ids(ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return ids.to(like.device)[:, None]


def answer_logprob(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> Float[torch.Tensor, " n"]:
    """log P(first answer token) at ``end``."""
    return per_prompt("logprob", logits, dataset)


def answer_prob(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> Float[torch.Tensor, " n"]:
    """P(first answer token) at ``end`` (Lv et al.'s ``probs(type="IW")`` before averaging).

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.metrics import answer_prob
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> p = answer_prob(model(ds.tokens), ds).mean()   # the paper's "correct-answer probability"
    """
    return per_prompt("prob", logits, dataset)


def answer_rank(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> Int[torch.Tensor, " n"]:
    """Rank of the answer token at ``end`` (0 = argmax; ties are not counted against it)."""
    el = end_logits(logits, dataset)
    a = el.gather(1, _ids(dataset.answer_ids, el))
    return (el > a).sum(-1)


def is_correct(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> torch.Tensor:
    """Whether the answer token is the argmax at ``end`` (``answer_rank == 0``)."""
    return answer_rank(logits, dataset) == 0


def logit_diff(logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset,
               variant: LogitDiffVariant = "iw") -> Float[torch.Tensor, " n"]:
    """Lv et al.'s ``logit_diff`` at ``end``: ``'iw'`` answer − mean logit, ``'n'`` subject − mean logit,
    ``'iw-n'`` answer − subject.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.metrics import logit_diff
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> logit_diff(model(ds.tokens), ds, "iw-n").shape
        torch.Size([225])
    """
    if variant not in ("iw", "n", "iw-n"):
        raise ConfigError(f"unknown logit_diff variant {variant!r}; use 'iw', 'n' or 'iw-n'")
    return per_prompt(variant, logits, dataset)


def linear_kind(kind: str, answer: Float[torch.Tensor, " r"], subject: Float[torch.Tensor, " r"],
                mean: Float[torch.Tensor, " r"]) -> Float[torch.Tensor, " r"]:
    """A kind linear in the logits, from the answer's and the subject's logit and the mean logit.

    ``'iw'`` answer − mean, ``'n'`` subject − mean, ``'iw-n'`` answer − subject, ``'logit'`` the answer's logit.

    Example:
        >>> import torch
        >>> from factlens.recall.metrics import linear_kind
        >>> float(linear_kind("iw-n", torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5]))[0])
        2.0
    """
    if kind == "iw":
        return answer - mean
    if kind == "n":
        return subject - mean
    if kind == "iw-n":
        return answer - subject
    if kind == "logit":
        return answer
    raise ConfigError(f"{kind!r} is not one of the linear metric kinds {LINEAR_KINDS}")


def kind_values(kind: str, logits: Float[torch.Tensor, "r vocab"], answer_ids: Int[torch.Tensor, " r"],
                subject_ids: Int[torch.Tensor, " r"]) -> Float[torch.Tensor, " r"]:
    """Metric ``kind`` (one of :data:`METRIC_KINDS`) of rows of logits at ``end``, given each row's token ids.

    Example:
        >>> import torch
        >>> from factlens.recall.metrics import kind_values
        >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
        >>> float(kind_values("iw", logits, torch.tensor([1]), torch.tensor([2]))[0])
        1.0
    """
    if kind not in METRIC_KINDS:
        raise ConfigError(f"unknown metric {kind!r}; use one of {METRIC_KINDS} or pass a callable")
    el = at_least_fp32(logits)
    if kind in ("prob", "logprob"):
        lp = torch.log_softmax(el, dim=-1).gather(1, _ids(answer_ids, el))[:, 0]
        return lp.exp() if kind == "prob" else lp
    answer = el.gather(1, _ids(answer_ids, el))[:, 0]
    subject = el.gather(1, _ids(subject_ids, el))[:, 0]
    return linear_kind(kind, answer, subject, el.mean(-1))


def per_prompt(kind: str, logits: Float[torch.Tensor, "n *pos vocab"], dataset: RelationDataset) -> Float[torch.Tensor, " n"]:
    """Metric ``kind`` (one of :data:`METRIC_KINDS`) per prompt of ``dataset``."""
    return kind_values(kind, end_logits(logits, dataset), dataset.answer_ids, dataset.subject_ids)


def metric(dataset: RelationDataset, kind: str = "iw", reduce: Literal["mean", "none"] = "mean") -> Metric:
    """A TransformerLens-style metric ``logits -> scalar`` (``reduce="mean"``) or ``-> [n]`` (``"none"``).

    The callable accepts ``[n, pos, vocab]`` or ``[n, vocab]`` logits of ``dataset``'s prompts, in order,
    so it works with ``transformer_lens.patching`` and with :func:`factlens.recall.path_patch`.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.metrics import metric
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> m = metric(ds, "iw")
        >>> float(m(model(ds.tokens)))                                     # doctest: +SKIP
    """
    if kind not in METRIC_KINDS:
        raise ConfigError(f"unknown metric {kind!r}; use one of {METRIC_KINDS}")
    if reduce not in ("mean", "none"):
        raise ConfigError(f"reduce={reduce!r}; use 'mean' or 'none'")

    def fn(logits: Float[torch.Tensor, "n *pos vocab"]) -> torch.Tensor:
        values = per_prompt(kind, logits, dataset)
        return values.mean() if reduce == "mean" else values

    fn.__name__ = f"metric_{kind}"
    fn.factlens_dataset = dataset.fingerprint  # consumers refuse it for another dataset (check_metric)
    return fn


def check_metric(fn, dataset: RelationDataset) -> None:
    """Refuse a metric built (by :func:`metric`) for another dataset than the one it is asked to score."""
    bound = getattr(fn, "factlens_dataset", None)
    if bound is not None and bound != dataset.fingerprint:
        raise ConfigError(f"the metric {getattr(fn, '__name__', fn)!r} was built for another dataset (fingerprint "
                          f"{bound} vs {dataset.fingerprint}): it reads that dataset's answers and positions. Build "
                          "it for this one: metric(dataset, kind), or pass the metric's name (e.g. 'iw').")


__all__ = ["LINEAR_KINDS", "METRIC_KINDS", "answer_logprob", "answer_prob", "answer_rank", "check_metric", "end_logits",
           "is_correct", "kind_values", "linear_kind", "logit_diff", "metric", "per_prompt"]

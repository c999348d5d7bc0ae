"""Knowledge metrics of Zucchet et al. (2025, §2): attribute loss, accuracy, hallucination statistics.

All are pure functions of next-token ``logits`` ``[batch, pos, vocab]`` and a
:class:`~factlens.bios.data.batches.BiographyBatch`; the logit at position ``p - 1`` predicts the token at ``p``.

- **Attribute loss**: summed cross-entropy over all tokens of each attribute value, i.e.
  ``-log p(value | context)`` under teacher forcing, averaged over the ``6 × batch`` values (not over
  tokens, so it is comparable with the no-knowledge baseline of ~6.785 nats).
- **Attribute accuracy**: a value counts only if *every* one of its tokens is the argmax.
- **Hallucination metrics**: attribute loss, mean top-token probability and mean predictive entropy (nats)
  over value-token positions (compare them on seen and unseen people). Pooled over batches,
  each metric is weighted by what it averages (values or value tokens): :meth:`AttributeMetrics.combine`.

The phases read from a loss curve (plateau end, drop end) are in :mod:`factlens.bios.phases`.

Example:
    >>> import numpy as np, torch
    >>> from factlens.bios import BiosVocab, Population, make_batch
    >>> from factlens.bios import attribute_loss
    >>> vocab = BiosVocab.default()
    >>> batch = make_batch(Population.generate(10, seed=0), vocab, np.arange(2), seq_len=128)
    >>> logits = torch.zeros(2, 128, vocab.size)  # uniform predictions
    >>> per_value = batch.value_len.sum() / 12 * np.log(vocab.size)
    >>> bool(torch.isclose(attribute_loss(logits, batch), per_value.float()))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from factlens.bios.data.batches import BiographyBatch
from factlens.bios.data.pools import ATTRIBUTES, N_ATTR
from factlens.display import ResultDisplay
from factlens.errors import EmptyDatasetError, ShapeError


@dataclass(frozen=True)
class _ValueTokens:
    """The value-token targets of a batch, flattened: one row per value token."""

    logits: Float[torch.Tensor, "m vocab"]  # logits that predict each value token
    targets: Int[torch.Tensor, " m"]
    slot: Int[torch.Tensor, " m"]  # sequence * 6 + attribute
    batch_size: int


def _value_tokens(logits: torch.Tensor, batch: BiographyBatch) -> _ValueTokens:
    if logits.ndim != 3 or logits.shape[:2] != batch.tokens.shape:
        raise ShapeError(
            f"logits have shape {tuple(logits.shape)} but the batch tokens are "
            f"{tuple(batch.tokens.shape)}; pass logits [batch, pos, vocab] of the same batch"
        )
    value_attr = batch.value_attr.to(logits.device)
    b_idx, p_idx = torch.nonzero(value_attr[:, 1:] >= 0, as_tuple=True)  # p_idx: predicting position
    targets = batch.tokens.to(logits.device)[b_idx, p_idx + 1]
    slot = b_idx * N_ATTR + value_attr[b_idx, p_idx + 1]
    return _ValueTokens(logits[b_idx, p_idx].float(), targets, slot, int(batch.tokens.shape[0]))


def value_nll(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> Float[torch.Tensor, "batch 6"]:
    """``-log p(value)`` of every sequence × attribute: summed cross-entropy over the value's tokens.

    Example:
        >>> # value_nll(logits, batch).mean() == attribute_loss(logits, batch)
    """
    v = _value_tokens(logits, batch)
    nll = F.cross_entropy(v.logits, v.targets, reduction="none")  # [m]
    out = torch.zeros(v.batch_size * N_ATTR, device=nll.device, dtype=nll.dtype)
    return out.index_add(0, v.slot, nll).view(v.batch_size, N_ATTR)


def attribute_loss(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> Float[torch.Tensor, ""]:
    """Summed value cross-entropy divided by ``6 × batch`` (differentiable scalar, nats per value)."""
    return value_nll(logits, batch).mean()


def per_attribute_loss(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> Float[torch.Tensor, " 6"]:
    """Attribute loss of each attribute (mean over sequences); their mean is :func:`attribute_loss`."""
    return value_nll(logits, batch).mean(0)


def value_correct(logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch) -> torch.Tensor:
    """``[batch, 6]`` bool: every token of the value is the teacher-forced argmax."""
    v = _value_tokens(logits, batch)
    wrong = (v.logits.argmax(-1) != v.targets).long()
    count = torch.zeros(v.batch_size * N_ATTR, device=wrong.device, dtype=torch.long)
    return (count.index_add(0, v.slot, wrong) == 0).view(v.batch_size, N_ATTR)


def attribute_accuracy(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> Float[torch.Tensor, ""]:
    """Fraction of the ``6 × batch`` values whose every token is predicted exactly (teacher forced)."""
    return value_correct(logits, batch).float().mean()


@dataclass
class AttributeMetrics(ResultDisplay):
    """Per-attribute knowledge and confidence metrics of one or more batches.

    Attributes:
        loss: ``[attribute]`` mean ``-log p(value)`` (nats per value).
        accuracy: ``[attribute]`` exact-match accuracy of the values.
        top_prob: ``[attribute]`` mean probability of the top token at value-token positions.
        entropy: ``[attribute]`` mean predictive entropy (nats) at value-token positions.
        n_sequences: Number of sequences averaged over.
        n_tokens: ``[attribute]`` number of value-token positions averaged over.
    """

    loss: Float[torch.Tensor, " attribute"]
    accuracy: Float[torch.Tensor, " attribute"]
    top_prob: Float[torch.Tensor, " attribute"]
    entropy: Float[torch.Tensor, " attribute"]
    n_sequences: int
    n_tokens: Int[torch.Tensor, " attribute"]
    axis_names: tuple[str, ...] = ("attribute",)

    @property
    def attribute_loss(self) -> float:
        """Mean over the 6 attributes (the paper's attribute loss)."""
        return float(self.loss.mean())

    @property
    def attribute_accuracy(self) -> float:
        return float(self.accuracy.mean())

    @property
    def mean_top_prob(self) -> float:
        """Mean top-token probability over all value-token positions."""
        return float((self.top_prob * self.n_tokens).sum() / self.n_tokens.sum())

    @property
    def mean_entropy(self) -> float:
        """Mean predictive entropy (nats) over all value-token positions."""
        return float((self.entropy * self.n_tokens).sum() / self.n_tokens.sum())

    @staticmethod
    def combine(parts: Sequence[AttributeMetrics]) -> AttributeMetrics:
        """Pool metrics of several batches, each by what it averages over: sum and count, then divide.

        ``loss`` and ``accuracy`` are means over values (one per sequence and attribute), so they are pooled by
        sequences; ``top_prob`` and ``entropy`` are means over value tokens, so they are pooled by tokens. The
        pooled numbers therefore equal the metrics of all the batches' values and value tokens at once, however
        unequal the batches (float64 throughout).

        Example:
            >>> import torch
            >>> from factlens.bios import AttributeMetrics
            >>> ones = torch.ones(6, dtype=torch.float64)
            >>> a = AttributeMetrics(ones, ones, 0.9 * ones, ones, n_sequences=1, n_tokens=torch.full((6,), 1))
            >>> b = AttributeMetrics(ones, ones, 0.5 * ones, ones, n_sequences=1, n_tokens=torch.full((6,), 3))
            >>> round(AttributeMetrics.combine([a, b]).mean_top_prob, 6)   # (0.9 + 3 * 0.5) / 4, not 0.7
            0.6
        """
        if not parts:
            raise EmptyDatasetError("no metrics to combine; pass at least one AttributeMetrics")
        seqs = torch.tensor([p.n_sequences for p in parts], dtype=torch.float64)  # [k]
        toks = torch.stack([p.n_tokens for p in parts]).double()  # [k, 6]

        def pooled(name: str, weight: torch.Tensor) -> torch.Tensor:  # weight [k, 6]: count behind each mean
            total = (torch.stack([getattr(p, name) for p in parts]).double() * weight).sum(0)  # [6] sums
            return total / weight.sum(0).clamp(min=1)

        return AttributeMetrics(
            loss=pooled("loss", seqs[:, None].expand_as(toks)),
            accuracy=pooled("accuracy", seqs[:, None].expand_as(toks)),
            top_prob=pooled("top_prob", toks),
            entropy=pooled("entropy", toks),
            n_sequences=int(seqs.sum()),
            n_tokens=toks.sum(0).long(),
        )

    def summary(self) -> dict[str, float]:
        """The headline numbers: ``attr_loss``, ``attr_acc``, ``top_prob``, ``entropy`` (nats)."""
        return {
            "attr_loss": self.attribute_loss,
            "attr_acc": self.attribute_accuracy,
            "top_prob": self.mean_top_prob,
            "entropy": self.mean_entropy,
        }

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per attribute × metric (columns ``attribute, metric, value``)."""
        rows = [
            {"attribute": attr, "metric": metric, "value": float(getattr(self, metric)[a])}
            for metric in ("loss", "accuracy", "top_prob", "entropy")
            for a, attr in enumerate(ATTRIBUTES)
        ]
        return pd.DataFrame(rows)

    def plot(self):
        """Grouped bar chart of every metric per attribute (plotly figure)."""
        import plotly.express as px

        df = self.to_dataframe()
        units = {
            "loss": "nats per value",
            "accuracy": "fraction",
            "top_prob": "probability",
            "entropy": "nats",
        }
        df["unit"] = df["metric"].map(units)
        fig = px.bar(
            df,
            x="attribute",
            y="value",
            color="attribute",
            facet_col="metric",
            hover_data=["unit"],
            title=f"Attribute metrics over {self.n_sequences} sequences",
        )
        fig.update_yaxes(matches=None, showticklabels=True, title_text="value (see hover for unit)")
        fig.update_xaxes(title_text="attribute")
        return fig


def attribute_metrics(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> AttributeMetrics:
    """Loss, accuracy, top-token probability and entropy per attribute for one batch (no gradients)."""
    with torch.no_grad():
        v = _value_tokens(logits, batch)
        logp = torch.log_softmax(v.logits, -1)  # [m, V]
        p = logp.exp()
        nll = -logp.gather(-1, v.targets[:, None]).squeeze(-1)
        top_prob, top = p.max(-1)
        entropy = -(p * logp).nan_to_num().sum(-1)
        attr = v.slot % N_ATTR
        b = v.batch_size
        zeros = dict(device=nll.device, dtype=nll.dtype)  # the logits' dtype, whatever the default dtype is
        per_value_nll = torch.zeros(b * N_ATTR, **zeros).index_add(0, v.slot, nll).view(b, N_ATTR)
        wrong = torch.zeros(b * N_ATTR, **zeros).index_add(0, v.slot, (top != v.targets).to(nll.dtype))
        n_tok = torch.zeros(N_ATTR, **zeros).index_add(0, attr, torch.ones_like(nll))

        def tok_mean(x: torch.Tensor) -> torch.Tensor:  # [m] per value token -> [6] means (float64 sums)
            sums = torch.zeros(N_ATTR, device=x.device, dtype=torch.float64).index_add(0, attr, x.double())
            return sums / n_tok.double().clamp(min=1)

        return AttributeMetrics(
            loss=per_value_nll.double().mean(0).cpu(),
            accuracy=(wrong.view(b, N_ATTR) == 0).double().mean(0).cpu(),
            top_prob=tok_mean(top_prob).cpu(),
            entropy=tok_mean(entropy).cpu(),
            n_sequences=b,
            n_tokens=n_tok.long().cpu(),
        )


def hallucination_metrics(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: BiographyBatch
) -> dict[str, float]:
    """Attribute loss, accuracy, mean top-token probability and mean entropy (nats) over value tokens.

    Evaluate it on a batch of unseen people
    (:meth:`Population.unseen <factlens.bios.data.population.Population.unseen>`) to measure over-confidence
    (Zucchet et al. 2025 §4). Returns ``{"attr_loss", "attr_acc", "top_prob", "entropy"}`` as floats; top
    probability and entropy are means over all value-token positions of the batch. For per-attribute numbers
    and pooling over batches use :func:`attribute_metrics` and :meth:`AttributeMetrics.combine`.
    """
    return attribute_metrics(logits, batch).summary()


__all__ = [
    "AttributeMetrics",
    "attribute_accuracy",
    "attribute_loss",
    "attribute_metrics",
    "hallucination_metrics",
    "per_attribute_loss",
    "value_correct",
    "value_nll",
]

"""Reference implementations the biography tests compare factlens against (plain loops, float64)."""

from __future__ import annotations

import math

import torch


def hand_value_token_stats(logits_and_batches) -> dict[str, float]:
    """Reference: loop over every value token of every batch; float64 softmax by hand; plain means."""
    top, ent, nll, correct = [], [], [], []
    for logits, batch in logits_and_batches:
        for b in range(len(batch)):
            value_ok = {}
            value_nll = {}
            for p in range(1, batch.tokens.shape[1]):
                a = int(batch.value_attr[b, p])
                if a < 0:
                    continue
                z = logits[b, p - 1].double()
                prob = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
                target = int(batch.tokens[b, p])
                top.append(float(prob.max()))
                ent.append(float(-(prob * prob.log()).sum()))
                value_nll[a] = value_nll.get(a, 0.0) - math.log(float(prob[target]))
                value_ok[a] = value_ok.get(a, True) and int(z.argmax()) == target
            nll += list(value_nll.values())
            correct += list(value_ok.values())
    return {"attr_loss": sum(nll) / len(nll), "attr_acc": sum(correct) / len(correct),
            "top_prob": sum(top) / len(top), "entropy": sum(ent) / len(ent), "n_tokens": len(top)}


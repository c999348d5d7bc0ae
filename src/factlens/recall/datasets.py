"""Relation datasets: tokenized prompts with named positions, answers and counterfactuals.

:func:`make_dataset` turns a :class:`~factlens.recall.relations.Relation` (country→capital or any other) into a
:class:`RelationDataset` with the official tokenization conventions of Lv et al. (GPT-2 without BOS, OPT with
its BOS, right padding, per-prompt last index) and the named positions ``N`` (subject), ``N-1``, ``R``
(relation word), ``end``; :func:`make_prompt_dataset` does the same for explicit (prompt, subject, answer)
triples such as biography relations. Both are re-exported by :mod:`factlens.recall.relations`.

Example:
    >>> from factlens.recall.relations import CAPITALS
    >>> from factlens.recall.datasets import make_dataset
    >>> from factlens.tokenizers import gpt2_tokenizer
    >>> ds = make_dataset(CAPITALS, gpt2_tokenizer())
    >>> len(ds), int(ds.answer_ids[ds.subjects.index("France")])
    (225, 6342)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from factlens.display import ResultDisplay
from factlens.errors import ConfigError, EmptyDatasetError, TokenizationError
from factlens.inputs import check_seed
from factlens.models import family_of
from factlens.recall.relations import CAPITALS, PromptSpec, Relation, contains_subject, nfc, subject_pattern

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


# ---------------------------------------------------------------------------------------------- tokenizing
def _ids(tokenizer: Any, text: str, strip: bool = False) -> list[int]:
    """Ids without special tokens; ``strip`` drops leading whitespace-only pieces (SentencePiece "▁")."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    while strip and len(ids) > 1 and not tokenizer.decode([ids[0]]).strip():
        ids = ids[1:]
    return ids


def _find(seq: list[int], sub: list[int], start: int = 0) -> list[int]:
    return [i for i in range(start, len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub] if sub else []


def _char_span(tokenizer: Any, ids: list[int], start: int, width: int, at: int) -> bool:
    """Whether tokens ``start..start+width`` decode to the text that begins at character ``at`` (the slot)."""
    before = len(tokenizer.decode(ids[:start]))
    span = tokenizer.decode(ids[start:start + width])
    lead = len(span) - len(span.lstrip())
    return before + lead == at


def _first_id(tokenizer: Any, word: str, what: str, rel: Relation, multi_ok: bool) -> int:
    """First token of ``" " + word``; TokenizationError naming the fix when it is several and not allowed."""
    pieces = _ids(tokenizer, " " + word, strip=True)
    if len(pieces) != 1 and not (multi_ok and pieces):
        strs = [tokenizer.decode([p]) for p in pieces]
        raise TokenizationError(
            f"{what} {word!r} of relation {rel.name!r} is {len(pieces)} tokens {strs} for this tokenizer, "
            f"but the metric scores one token; pass first_piece=True to score its first piece "
            f"{(strs or [''])[0]!r}, or drop the pair")
    return pieces[0]


def _positions(tokenizer: Any, rel: Relation, spec: PromptSpec, first_piece: bool) -> dict[str, Any]:
    """Model ids (with the tokenizer's own BOS) and named positions of one prompt, by token matching."""
    shots_text, query = rel.render(spec)
    text = shots_text + query
    plain, full = _ids(tokenizer, text), list(tokenizer(text)["input_ids"])
    off = next(iter(_find(full, plain)), None)  # special tokens the tokenizer prepends (BOS)
    if off is None:
        raise TokenizationError(f"the tokenizer's special-token wrapping of {text!r} does not contain its "
                                "plain tokenization; use a tokenizer whose special tokens are only a BOS")
    q = 0  # first token of the query = end of the demos' common token prefix
    pre = _ids(tokenizer, shots_text.rstrip()) if shots_text.strip() else []
    while q < min(len(pre), len(plain)) and pre[q] == plain[q]:
        q += 1
    at = len(shots_text) + rel.templates[spec.template_idx].index("{subject}")
    cands = [_ids(tokenizer, " " + spec.subject), _ids(tokenizer, " " + spec.subject, strip=True),
             _ids(tokenizer, spec.subject)]
    hits = [(h, len(c)) for c in (cands if at and text[at - 1].isspace() else cands[::-1])
            for h in _find(plain, c, q)]
    # the span that starts at the template's {subject} slot, not the first match: " Niger" is also the first
    # token of " Nigeria" earlier in the prompt
    at_slot = [(h, w) for h, w in hits if _char_span(tokenizer, plain, h, w, at)]
    hits = at_slot or hits
    if not hits:
        raise TokenizationError(f"subject {spec.subject!r} is not found as tokens in the query of {text!r}; "
                                "put a space or punctuation before and after '{subject}' in the template")
    n0, width = hits[0]
    if width > 1 and not (first_piece or rel.multi_token_subjects):
        raise TokenizationError(f"subject {spec.subject!r} is {width} tokens inside {text!r}; pass "
                                "first_piece=True (N = its first token) or use multi_token_subjects=True")
    row = dict(ids=full[:off] + plain, N=n0 + off, N_last=n0 + width - 1 + off, end=off + len(plain) - 1,
               text=text, answer_id=_first_id(tokenizer, spec.answer, "answer", rel, first_piece),
               subject_id=_first_id(tokenizer, spec.subject, "subject", rel,
                                    first_piece or rel.multi_token_subjects))
    if rel.relation_word is not None:
        word = rel.relation_word
        ends = [h[-1] + len(c) - 1 for c in (_ids(tokenizer, " " + word), _ids(tokenizer, word))
                if (h := _find(plain, c, q))]  # last token of the last occurrence in the query
        if not ends:
            raise TokenizationError(f"relation word {word!r} is not in the query of {text!r}; put it in "
                                    "every template or build the relation with relation_word=None")
        row["R"] = ends[0] + off
    return row


def _build(rel: Relation, tokenizer: Any, specs: Sequence[PromptSpec], *, shots: int, seed: int,
           first_piece: bool, variant: str) -> RelationDataset:
    """Tokenize ``specs`` (right padding) and collect their named positions."""
    if not specs:
        raise EmptyDatasetError(f"no prompts to build for relation {rel.name!r}; pass a non-empty list")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    rows = [_positions(tokenizer, rel, spec, first_piece) for spec in specs]
    lengths = torch.tensor([len(r["ids"]) for r in rows], dtype=torch.long)  # [b]
    tokens = torch.full((len(rows), int(lengths.max())), int(pad), dtype=torch.long)  # [b, p]
    for i, r in enumerate(rows):
        tokens[i, :len(r["ids"])] = torch.tensor(r["ids"], dtype=torch.long)
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()  # [b, p]
    col = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.long)  # noqa: E731
    names = ["N", "N_last", "end"] + (["R"] if rel.relation_word is not None else [])
    positions = {k: col(k) for k in names} | {"starts": torch.zeros(len(rows), dtype=torch.long)}
    if bool((positions["N"] > 0).all()):
        positions["N-1"] = positions["N"] - 1
    return RelationDataset(
        relation=rel, specs=tuple(specs), prompts=[r["text"] for r in rows], tokens=tokens,
        attention_mask=mask, lengths=lengths, positions=positions, answer_ids=col("answer_id"),
        subject_ids=col("subject_id"), shots=shots, seed=seed, first_piece=first_piece, variant=variant,
        n_special_prefix=len(rows[0]["ids"]) - len(_ids(tokenizer, rows[0]["text"])), tokenizer=tokenizer)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary (every token and its id, added tokens included): its identity by content.

    Example:
        >>> from factlens.tokenizers import gpt2_tokenizer, opt_style_tokenizer
        >>> from factlens.recall.datasets import tokenizer_fingerprint
        >>> tokenizer_fingerprint(gpt2_tokenizer()) == tokenizer_fingerprint(opt_style_tokenizer())
        False
    """
    if tokenizer is None:
        return "none"
    cached = getattr(tokenizer, "_factlens_fingerprint", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    with contextlib.suppress(AttributeError):
        tokenizer._factlens_fingerprint = (len(tokenizer), digest)
    return digest


def check_dataset(model: TransformerBridge, dataset: RelationDataset, where: str = "this analysis") -> None:
    """Refuse a dataset tokenized for another model: another vocabulary, or the wrong BOS convention.

    The check is by content: the dataset's tokenizer vocabulary must be the model's (ids mean the same tokens),
    and on OPT, which is always run with its BOS, the prompts must start with it.
    """
    if not isinstance(dataset, RelationDataset):
        raise ConfigError(f"{where} needs a RelationDataset, got {type(dataset).__name__}; build one with "
                          "factlens.recall.dataset_for(model)")
    mine = getattr(model, "tokenizer", None)
    if mine is None or dataset.tokenizer is None:
        return
    if tokenizer_fingerprint(dataset.tokenizer) != tokenizer_fingerprint(mine):
        raise TokenizationError(
            f"{where}: the dataset was tokenized with another tokenizer ({len(dataset.tokenizer)} tokens) than the "
            f"model's ({len(mine)} tokens), so its ids mean other tokens here. Build it with this model's tokenizer: "
            "factlens.recall.dataset_for(model) (or make_dataset(relation, model.tokenizer)).")
    if family_of(model) == "opt" and dataset.n_special_prefix < 1:
        raise TokenizationError(
            f"{where}: the dataset's prompts have no BOS, but OPT is always run with its BOS (</s>) first: without "
            "it the model sees other inputs than in training. Build it with factlens.recall.dataset_for(model).")


# ---------------------------------------------------------------------------------------------- the dataset
@dataclass
class RelationDataset(ResultDisplay):
    """Tokenized relation prompts with named positions (see :func:`make_dataset`).

    ``tokens`` ``[batch, pos]`` are right-padded and include the tokenizer's own BOS (``n_special_prefix``
    tokens: 0 for GPT-2, 1 for OPT); ``prompts`` are the strings (no BOS) ending right before the answer.
    ``positions`` (each ``[batch]``): ``N`` first subject token in the query, ``N_last`` last subject token,
    ``N-1`` (absent when a subject is the very first token), ``R`` last relation-word token (only with a
    ``relation_word``), ``end`` last real token, ``starts`` 0. ``answer_ids``/``subject_ids``: first token
    of ``" " + answer``/``" " + subject``.

    Example:
        >>> from factlens.recall.relations import CAPITALS
        >>> from factlens.tokenizers import opt_style_tokenizer
        >>> from factlens.recall import make_dataset
        >>> ds = make_dataset(CAPITALS, opt_style_tokenizer(), shots=1, seed=0)
        >>> ds.tokens[0, 0].item(), ds.tokenizer.decode(ds.tokens[0, ds.positions["R"][0]])
        (50257, ' capital')
    """

    relation: Relation
    specs: tuple[PromptSpec, ...]
    prompts: list[str]
    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    lengths: Int[torch.Tensor, " batch"]
    positions: dict[str, Int[torch.Tensor, " batch"]]
    answer_ids: Int[torch.Tensor, " batch"]
    subject_ids: Int[torch.Tensor, " batch"]
    shots: int
    seed: int
    first_piece: bool
    variant: str
    n_special_prefix: int
    tokenizer: Any = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.specs)

    subjects = property(lambda self: [s.subject for s in self.specs], doc="Query subject of each prompt.")
    answers = property(lambda self: [s.answer for s in self.specs], doc="Gold answer of each prompt.")
    end = property(lambda self: self.positions["end"], doc="Last real token (the answer is predicted there).")

    @property
    def template_ids(self) -> Int[torch.Tensor, " batch"]:
        """Index into ``relation.templates`` of each prompt."""
        return torch.tensor([s.template_idx for s in self.specs], dtype=torch.long)

    @property
    def fingerprint(self) -> str:
        """A hash of what the dataset is: its token ids, answers, subjects, ends and its tokenizer's vocabulary.

        Metrics (:func:`factlens.recall.metrics.metric`) and shared runs (:func:`~factlens.recall.metrics.run_at_end`)
        carry it, and refuse another dataset's logits or activations.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            import hashlib

            h = hashlib.sha256()
            for t in (self.tokens, self.answer_ids, self.subject_ids, self.end):
                h.update(t.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
            h.update(tokenizer_fingerprint(self.tokenizer).encode())
            cached = self.__dict__["_fingerprint"] = h.hexdigest()[:16]
        return cached

    def position(self, name: str) -> Int[torch.Tensor, " batch"]:
        """A named position, with an error naming the fix when it is not defined for these prompts."""
        if name in self.positions:
            return self.positions[name]
        fixes = {"N-1": "a subject is the first token; start templates with a lead-in or use a BOS tokenizer",
                 "R": f"relation {self.relation.name!r} has no relation_word; build it with one"}
        raise ConfigError(f"position {name!r} is undefined: "
                          f"{fixes.get(name, f'pick one of {sorted(self.positions)}')}")

    def select(self, indices: Sequence[int] | Int[torch.Tensor, " k"]) -> RelationDataset:
        """The prompts at ``indices`` (re-tokenized, so padding is trimmed)."""
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else indices
        return _build(self.relation, self.tokenizer, [self.specs[int(i)] for i in idx], shots=self.shots,
                      seed=self.seed, first_piece=self.first_piece, variant=self.variant)

    def subset(self, subject: str) -> RelationDataset:
        """All prompts about one subject ("all same country": every template for that country).

        Example:
            >>> from factlens.recall.relations import CAPITALS
            >>> from factlens.tokenizers import gpt2_tokenizer
            >>> from factlens.recall import make_dataset
            >>> len(make_dataset(CAPITALS, gpt2_tokenizer()).subset("France"))
            15
        """
        self.relation.answer_of(subject)  # ConfigError for unknown subjects
        idx = [i for i, s in enumerate(self.specs) if s.subject == subject]
        if not idx:
            raise EmptyDatasetError(f"no prompt in this dataset is about {subject!r}; build it with that "
                                    "subject included (subjects=None, n=None)")
        return self.select(idx)

    def counterfactual(self, seed: int = 0) -> RelationDataset:
        """D_new for path patching: same templates and demos, subject swapped for a random different one.

        The new subject is never the old one and never appears in the demos; answers become its answers.

        Example:
            >>> from factlens.recall.relations import CAPITALS
            >>> from factlens.tokenizers import gpt2_tokenizer
            >>> from factlens.recall import make_dataset
            >>> ds = make_dataset(CAPITALS, gpt2_tokenizer())
            >>> all(a != b for a, b in zip(ds.subjects, ds.counterfactual(seed=1).subjects))
            True
        """
        rng, out = np.random.default_rng(seed), []
        for spec in self.specs:
            shots_text = self.relation.render(spec)[0]
            cands = [s for s in self.relation.subjects
                     if s != spec.subject and not contains_subject(shots_text, s)]
            if not cands:
                raise ConfigError(f"no subject is left to swap into the prompt about {spec.subject!r} "
                                  f"with demos {spec.shot_subjects}; use fewer shots or add pairs")
            new = cands[int(rng.integers(len(cands)))]
            out.append(dataclasses.replace(spec, subject=new, answer=self.relation.answer_of(new)))
        return _build(self.relation, self.tokenizer, out, shots=self.shots, seed=self.seed,
                      first_piece=self.first_piece, variant=self.variant)

    def to(self, device: torch.device | str) -> RelationDataset:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device),
            lengths=self.lengths.to(device), positions={k: v.to(device) for k, v in self.positions.items()},
            answer_ids=self.answer_ids.to(device), subject_ids=self.subject_ids.to(device))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt: text, subject, answer, template, demos, token ids and named positions."""
        dec = lambda ids: [self.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
        df = pd.DataFrame({
            "prompt_idx": range(len(self)), "prompt": self.prompts, "subject": self.subjects,
            "answer": self.answers, "template_idx": self.template_ids.tolist(),
            "shot_subjects": [", ".join(s.shot_subjects) for s in self.specs],
            "n_tokens": self.lengths.tolist(), "answer_id": self.answer_ids.tolist(),
            "answer_token": dec(self.answer_ids), "subject_id": self.subject_ids.tolist(),
            "subject_token": dec(self.subject_ids)})
        for name, pos in self.positions.items():
            df[f"pos_{name}"] = pos.tolist()
        return df


# ---------------------------------------------------------------------------------------------- constructors
def _draw_shots(rel: Relation, subject: str, query: str, k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """k distinct demo subjects: never the query subject, never a string already in the prompt."""
    chosen: list[str] = []
    text, pool = query, rel.subjects
    def ok(s: str) -> bool:
        return (s != subject and s not in chosen and not contains_subject(text, s)
                and not contains_subject(rel.demo(s), subject))

    for _ in range(k):
        pick = next((s for s in (pool[int(i)] for i in rng.integers(len(pool), size=16)) if ok(s)), None)
        if pick is None:  # rejection sampling failed: scan the pool
            cands = [s for s in pool if ok(s)]
            if not cands:
                raise ConfigError(f"only {len(chosen)} demonstrations fit the prompt about {subject!r} (the "
                                  f"others share text with it); pass shots <= {len(chosen)} or add pairs")
            pick = cands[int(rng.integers(len(cands)))]
        chosen.append(pick)
        text = rel.demo(pick) + text
    return tuple(reversed(chosen))  # last drawn is outermost, as repeated add_a_shot() does


def _check_shots(rel: Relation, shots: int) -> None:
    if shots < 0 or (shots and rel.shot_template is None):
        raise ConfigError(f"shots={shots} for relation {rel.name!r}; pass shots >= 0 (shots > 0 needs a "
                          "shot_template such as 'The capital of {subject} is {answer}. ')")
    if shots > len(rel.pairs) - 1:
        raise ConfigError(f"shots={shots} but relation {rel.name!r} has only {len(rel.pairs) - 1} other "
                          f"subjects to use as demonstrations; pass shots <= {len(rel.pairs) - 1}")


def make_dataset(
    relation: Relation,
    tokenizer: Any,
    shots: int = 0,
    n: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | str | None = None,
    first_piece: bool = False,
    variant: str = "main",
) -> RelationDataset:
    """All distinct (template, subject) prompts of a relation, tokenized with named positions.

    Zero-shot CAPITALS gives 15 templates × 15 countries = 225 prompts, subject-major. With ``shots=k``
    each gets k ``shot_template`` demos about other random subjects (seeded). ``n`` samples that many
    distinct prompts in random order (with shots, several demo draws per (template, subject) if needed).

    Args:
        relation: The relation, e.g. :data:`CAPITALS`.
        tokenizer: HF tokenizer; its own BOS behaviour is used (GPT-2 none, OPT ``</s>``).
        shots: Demonstrations per prompt (at most the number of other subjects).
        n: Number of prompts (None: one per (template, subject)).
        seed: Seed for demo choice and sampling.
        subjects: Restrict the query subjects (demos still come from every pair).
        first_piece: Score the first token of multi-token answers/subjects instead of raising.
        variant: Template set, "main" or one of ``relation.variants`` (CAPITALS has "appendix").

    Example:
        >>> from factlens.recall.relations import CAPITALS
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> from factlens.recall import make_dataset
        >>> ds = make_dataset(CAPITALS, gpt2_tokenizer(), shots=1, n=4, seed=0)
        >>> ds.prompts[0].startswith("The capital of "), ds.tokens.shape[0]
        (True, 4)
    """
    check_seed(seed)
    rel = relation.variant(variant)
    _check_shots(rel, shots)
    chosen = (rel.subjects if subjects is None else (subjects,) if isinstance(subjects, str)
              else tuple(subjects))
    if not chosen or (n is not None and n < 1):
        raise EmptyDatasetError(f"subjects={subjects!r}, n={n} select no prompts; pass a non-empty subject "
                                "list (or None for all) and n >= 1 (or None for all)")
    answers = {s: rel.answer_of(s) for s in chosen}
    rng = np.random.default_rng(seed)
    base = [(t, s) for s in chosen for t in range(len(rel.templates))]
    target, specs, seen = len(base) if n is None else n, [], set()
    for _ in range(50 if shots else 1):
        for i in range(len(base)) if n is None else rng.permutation(len(base)):
            t, s = base[int(i)]
            demo = _draw_shots(rel, s, rel.templates[t].replace("{subject}", s), shots, rng) if shots else ()
            if (t, s, demo) not in seen and len(specs) < target:
                seen.add((t, s, demo))
                specs.append(PromptSpec(t, s, answers[s], demo))
        if len(specs) == target:
            return _build(rel, tokenizer, specs, shots=shots, seed=seed, first_piece=first_piece,
                          variant=variant)
    raise ConfigError(f"only {len(specs)} distinct {shots}-shot prompts exist here; pass n <= {len(specs)}"
                      + ("" if shots else " or shots >= 1 for more"))


def dataset_for(model: TransformerBridge, relation: Relation = CAPITALS, shots: int = 0, **kwargs) -> RelationDataset:
    """``make_dataset`` with the tokenizer convention of Lv et al. for this model's family.

    Always the model's own tokenizer (a checkpoint on disk brings its own ids). GPT-2: with **no** BOS (the
    bridge's tokenizer prepends ``<|endoftext|>``; the official code does not). OPT: as it is, prepending
    ``</s>`` as the official code expects.

    Example:
        >>> import factlens
        >>> from factlens.recall import dataset_for
        >>> dataset_for(factlens.tiny("gpt2")).tokens[0, 0].item()       # "It", no BOS
        1026
    """
    tokenizer = model.tokenizer
    if family_of(model) == "gpt2":  # a BOS-free copy (the dataset keeps it), made once per tokenizer (~1 s)
        cached = getattr(tokenizer, "_factlens_no_bos", None)
        if cached is None or cached[0] != len(tokenizer):  # rebuilt when tokens were added since
            import copy

            tokenizer.__dict__.pop("_factlens_no_bos", None)
            no_bos = copy.deepcopy(tokenizer)
            no_bos.add_bos_token = False
            cached = tokenizer._factlens_no_bos = (len(tokenizer), no_bos)
        tokenizer = cached[1]
    return make_dataset(relation, tokenizer, shots=shots, **kwargs)


def make_prompt_dataset(
    items: Sequence[tuple[str, str, str]],
    tokenizer: Any,
    *,
    name: str = "prompts",
    shot_template: str | None = None,
    shots: int = 0,
    seed: int = 0,
    relation_word: str | None = None,
    first_piece: bool = False,
    multi_token_subjects: bool = True,
) -> RelationDataset:
    """A dataset from explicit ``(prompt, subject, answer)`` triples, e.g. biography relations.

    Each prompt (text right before the answer) must contain its subject; every occurrence becomes the
    ``{subject}`` slot, so :meth:`RelationDataset.counterfactual` can swap it. Multi-token subjects such as
    full names are allowed by default: ``N`` is the first and ``N_last`` the last token of the span.

    Example:
        >>> from factlens.recall.relations import CAPITALS
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> from factlens.recall import make_prompt_dataset
        >>> tok = gpt2_tokenizer()
        >>> ds = make_prompt_dataset([("Ada Lovelace was born in", "Ada Lovelace", "London"),
        ...                           ("Alan Turing was born in", "Alan Turing", "London")], tok)
        >>> tok.decode(ds.tokens[1, ds.positions["N"][1]:ds.positions["N_last"][1] + 1])
        'Alan Turing'
    """
    check_seed(seed)
    if not items:
        raise EmptyDatasetError("items is empty; pass at least one (prompt, subject, answer) triple")
    pairs: dict[str, str] = {}
    templates: dict[str, int] = {}
    raw = []
    for prompt, subject, answer in items:
        prompt, subject, answer = nfc(prompt), nfc(subject), nfc(answer)
        if "{subject}" not in prompt and not contains_subject(prompt, subject):
            inside = " (it occurs only inside a longer word)" if subject and subject in prompt else ""
            raise TokenizationError(f"prompt {prompt!r} does not contain its subject {subject!r} as a whole "
                                    f"word{inside}; include it or write '{{subject}}' where it goes")
        # whole words only: the subject "Niger" in "Unlike Nigeria, the capital of Niger is" is one slot
        template = prompt if "{subject}" in prompt else subject_pattern(subject).sub("{subject}", prompt)
        if pairs.setdefault(subject, answer) != answer:
            raise ConfigError(f"subject {subject!r} has two answers ({pairs[subject]!r}, {answer!r}); make "
                              "one dataset per relation")
        raw.append((templates.setdefault(template, len(templates)), subject, answer))
    rel = Relation(name, tuple(pairs.items()), tuple(templates), shot_template, (), relation_word,
                   multi_token_subjects)
    _check_shots(rel, shots)
    rng = np.random.default_rng(seed)
    specs = [PromptSpec(t, s, a, _draw_shots(rel, s, rel.templates[t].replace("{subject}", s), shots, rng)
                        if shots else ()) for t, s, a in raw]
    return _build(rel, tokenizer, specs, shots=shots, seed=seed, first_piece=first_piece, variant="main")


__all__ = ["PromptSpec", "RelationDataset", "dataset_for", "make_dataset", "make_prompt_dataset"]

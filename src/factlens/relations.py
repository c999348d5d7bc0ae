"""Relation-recall prompt datasets (country → capital and user relations), tokenized with named positions.

A :class:`Relation` is a set of (subject, answer) pairs plus query templates with a ``{subject}`` slot;
:func:`make_dataset` renders every distinct (template, subject) prompt, optionally behind k
``shot_template`` demonstrations, and tokenizes it with the tokenizer's own BOS convention (GPT-2: none,
OPT: ``</s>``), right-padded. Named positions follow Lv et al. (2024) ``word_idx``: ``N`` (first subject
token in the query), ``N-1``, ``R`` (last relation word, " capital"), ``end`` (last real token, " is")
and ``starts`` (0). Positions are found by matching token ids, so a prepended BOS shifts them correctly.

Example:
    >>> from factlens.relations import CAPITALS, make_dataset
    >>> from factlens.tokenizers import gpt2_tokenizer
    >>> tok = gpt2_tokenizer()
    >>> ds = make_dataset(CAPITALS, tok)
    >>> len(ds), ds.prompts[0]
    (225, "It's crucial to know that the capital of China is")
    >>> tok.decode(ds.tokens[0, ds.positions["N"][0]]), int(ds.answer_ids[0])
    (' China', 11618)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from factlens.errors import ConfigError, EmptyDatasetError, TokenizationError

CAPITAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("China", "Beijing"), ("USA", "Washington"), ("Russia", "Moscow"), ("England", "London"),
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Greece", "Athens"), ("Thailand", "Bangkok"),
)
CAPITAL_LEAD_INS: tuple[str, ...] = (
    "It's crucial to know that", "You are right to say that", "Therefore, it's correct to state that",
    "When asked, always remember that", "We confirm that", "Don't forget,", "Bear in mind,", "Keep in mind,",
    "Just a reminder,", "As we all know,", "According to the textbook,", "I am sure that", "Without a doubt,",
    "In case you didn't know,", "To emphasize,",
)
CAPITAL_SHOT_TEMPLATE = "The capital of {subject} is {answer}. "


def with_lead_in(lead_in: str, body: str) -> str:
    """Join a lead-in and a template body the way the official code does.

    A lead-in ending with a comma/colon/semicolon or with the word "that" is joined with a space; any other
    lead-in gets ", ". An empty lead-in capitalises the body.

    Example:
        >>> with_lead_in("We confirm that", "the capital of {subject} is")
        'We confirm that the capital of {subject} is'
        >>> with_lead_in("Don't forget,", "the capital of {subject} is")
        "Don't forget, the capital of {subject} is"
    """
    lead = lead_in.strip()
    if not lead:
        return body[:1].upper() + body[1:]
    if lead.endswith((",", ":", ";")) or lead.split()[-1].lower() == "that":
        return f"{lead} {body}"
    return f"{lead}, {body}"


def _check_template(template: str, where: str) -> None:
    if "{subject}" not in template:
        raise TokenizationError(f"{where} {template!r} has no '{{subject}}' slot; add one, e.g. "
                                "'the capital of {subject} is'")
    if "{answer}" in template:
        raise ConfigError(f"{where} {template!r} contains '{{answer}}'; a query template must stop right "
                          "before the answer (put demonstrations in shot_template)")
    if template != template.rstrip():
        raise ConfigError(f"{where} {template!r} ends with whitespace; strip it (the answer is scored as "
                          "the first token of ' ' + answer)")


@dataclass(frozen=True)
class Relation:
    """A relation: (subject, answer) pairs, query templates with ``{subject}``, a few-shot demo template.

    Attributes:
        name: Short name, e.g. "capitals".
        pairs: ``((subject, answer), ...)``; subjects are unique.
        templates: Query templates containing ``{subject}``, ending right before the answer.
        shot_template: Demonstration with ``{subject}`` and ``{answer}`` (None: no few-shot prompts).
        lead_ins: The lead-ins the templates were built from (informational).
        relation_word: Word whose last occurrence in the query is position ``R`` (None: no ``R``).
        multi_token_subjects: Allow subjects that are several tokens (position ``N`` starts the span).
        variants: Other template sets by name, selected with ``make_dataset(variant=...)``.

    Example:
        >>> CAPITALS.answer_of("France"), len(CAPITALS.templates)
        ('Paris', 15)
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    templates: tuple[str, ...]
    shot_template: str | None = None
    lead_ins: tuple[str, ...] = ()
    relation_word: str | None = None
    multi_token_subjects: bool = False
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple((str(s), str(a)) for s, a in self.pairs)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "lead_ins", tuple(self.lead_ins))
        object.__setattr__(self, "variants", tuple((k, tuple(v)) for k, v in self.variants))
        if not pairs:
            raise EmptyDatasetError(f"relation {self.name!r} has no (subject, answer) pairs; pass at least one")
        if not self.templates:
            raise EmptyDatasetError(f"relation {self.name!r} has no templates; pass at least one with "
                                    "'{subject}'")
        for s, a in pairs:
            if not s or not a or s != s.strip() or a != a.strip():
                raise ConfigError(f"pair {(s, a)!r} of relation {self.name!r} is empty or has surrounding "
                                  "whitespace; strip it (a leading space is added when tokenizing)")
        subjects = [s for s, _ in pairs]
        dup = sorted({s for s in subjects if subjects.count(s) > 1})
        if dup:
            raise ConfigError(f"relation {self.name!r} lists subjects {dup} more than once; keep one answer "
                              "per subject (split other answers into a separate relation)")
        for t in self.templates:
            _check_template(t, "template")
        for vname, vtemplates in self.variants:
            if not vtemplates:
                raise EmptyDatasetError(f"variant {vname!r} has no templates; pass at least one")
            for t in vtemplates:
                _check_template(t, f"variant {vname!r} template")
        if self.shot_template is not None:
            if "{subject}" not in self.shot_template:
                raise TokenizationError(f"shot_template {self.shot_template!r} has no '{{subject}}' slot; "
                                        "use e.g. 'The capital of {subject} is {answer}. '")
            if "{answer}" not in self.shot_template:
                raise ConfigError(f"shot_template {self.shot_template!r} has no '{{answer}}' slot; add one")

    @property
    def subjects(self) -> tuple[str, ...]:
        """The subjects, in pair order."""
        return tuple(s for s, _ in self.pairs)

    def answer_of(self, subject: str) -> str:
        """The answer paired with ``subject`` (ConfigError if unknown)."""
        for s, a in self.pairs:
            if s == subject:
                return a
        raise ConfigError(f"{subject!r} is not a subject of relation {self.name!r}; pick one of "
                          f"{list(self.subjects)}")

    def variant(self, name: str) -> Relation:
        """This relation with the template set ``name`` ("main" = the templates it has)."""
        if name == "main":
            return self
        for vname, vtemplates in self.variants:
            if vname == name:
                return dataclasses.replace(self, templates=vtemplates, variants=())
        raise ConfigError(f"relation {self.name!r} has no variant {name!r}; pick one of "
                          f"{['main', *(v for v, _ in self.variants)]}")

    def render(self, spec: PromptSpec) -> tuple[str, str]:
        """Render a prompt: ``(shots_prefix, query)``; the full prompt is their concatenation."""
        shots = "".join(self.shot_template.replace("{subject}", s).replace("{answer}", self.answer_of(s))
                        for s in spec.shot_subjects) if spec.shot_subjects else ""
        return shots, self.templates[spec.template_idx].replace("{subject}", spec.subject)


def make_relation(
    name: str,
    pairs: Mapping[str, str] | Sequence[tuple[str, str]],
    templates: str | Sequence[str],
    shot_template: str | None = None,
    *,
    lead_ins: Sequence[str] = (),
    relation_word: str | None = None,
    multi_token_subjects: bool = False,
) -> Relation:
    """Build a user relation; with ``lead_ins`` every template is a body combined with each lead-in.

    Example:
        >>> rel = make_relation("languages", {"France": "French", "Germany": "German"},
        ...                     "the official language of {subject} is",
        ...                     "The official language of {subject} is {answer}. ",
        ...                     lead_ins=["We confirm that", "As we all know,"], relation_word="language")
        >>> rel.templates[1]
        'As we all know, the official language of {subject} is'
    """
    pair_tuple = tuple(pairs.items()) if isinstance(pairs, Mapping) else tuple(tuple(p) for p in pairs)
    bodies = (templates,) if isinstance(templates, str) else tuple(templates)
    full = tuple(with_lead_in(li, b) for b in bodies for li in lead_ins) if lead_ins else bodies
    return Relation(name, pair_tuple, full, shot_template, tuple(lead_ins), relation_word,  # type: ignore[arg-type]
                    multi_token_subjects)


CAPITALS = make_relation("capitals", CAPITAL_PAIRS, "the capital of {subject} is", CAPITAL_SHOT_TEMPLATE,
                         lead_ins=CAPITAL_LEAD_INS, relation_word="capital")
CAPITALS = dataclasses.replace(
    CAPITALS, variants=(("appendix", tuple(with_lead_in(li, "{subject}'s capital is") for li in CAPITAL_LEAD_INS)),))
CAPITALS_APPENDIX = dataclasses.replace(CAPITALS.variant("appendix"), name="capitals-appendix")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt before tokenization: template index, subject, its answer, demo subjects (outermost first)."""

    template_idx: int
    subject: str
    answer: str
    shot_subjects: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- tokenizing
def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pieces(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, dropping leading whitespace-only pieces (SentencePiece)."""
    ids = _ids(tokenizer, text)
    while len(ids) > 1 and not tokenizer.decode([ids[0]]).strip():
        ids = ids[1:]
    return ids


def _find(seq: list[int], sub: list[int], start: int = 0) -> list[int]:
    m = len(sub)
    return [i for i in range(start, len(seq) - m + 1) if seq[i:i + m] == sub] if m else []


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[int], int]:
    """(model ids with the tokenizer's own BOS, ids without special tokens, number of leading specials)."""
    plain = _ids(tokenizer, text)
    full = list(tokenizer(text)["input_ids"])
    starts = _find(full, plain)
    if not starts:
        raise TokenizationError(f"the tokenizer's special-token wrapping of {text!r} does not contain its plain "
                                "tokenization; use a tokenizer whose add_special_tokens only prepends a BOS")
    return full[:starts[0]] + plain, plain, starts[0]


def _span(tokenizer: Any, plain: list[int], word: str, text: str, char_at: int, start: int) -> tuple[int, int]:
    spaced = char_at > 0 and text[char_at - 1].isspace()
    cands = [_ids(tokenizer, " " + word), _pieces(tokenizer, " " + word), _ids(tokenizer, word)]
    if not spaced:
        cands.reverse()
    for cand in cands:
        hits = _find(plain, cand, start)
        if hits:
            return hits[0], hits[0] + len(cand)
    return -1, -1


def _single(tokenizer: Any, word: str, what: str, relation: str, first_piece: bool, allow_multi: bool) -> int:
    pieces = _pieces(tokenizer, " " + word)
    if not pieces:
        raise TokenizationError(f"{what} {word!r} tokenizes to nothing; fix the pair in relation {relation!r}")
    if len(pieces) > 1 and not (first_piece or allow_multi):
        strs = [tokenizer.decode([p]) for p in pieces]
        raise TokenizationError(
            f"{what} {word!r} of relation {relation!r} is {len(pieces)} tokens {strs} for this tokenizer, but "
            f"the metric scores one token; pass first_piece=True to score its first piece {strs[0]!r}, or "
            "drop the pair")
    return pieces[0]


def _build(relation: Relation, tokenizer: Any, specs: Sequence[PromptSpec], *, shots: int, seed: int,
           first_piece: bool, variant: str) -> RelationDataset:
    """Tokenize ``specs`` and find their named positions."""
    if not specs:
        raise EmptyDatasetError(f"no prompts to build for relation {relation.name!r}; pass a non-empty "
                                "subject list / n >= 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    rows, prompts, n_special = [], [], 0
    for spec in specs:
        shots_text, query = relation.render(spec)
        text = shots_text + query
        ids, plain, n_special = _encode(tokenizer, text)
        qstart = 0
        if shots_text.strip():
            pre = _ids(tokenizer, shots_text.rstrip())
            while qstart < min(len(pre), len(plain)) and pre[qstart] == plain[qstart]:
                qstart += 1
        subj_char = len(shots_text) + relation.templates[spec.template_idx].index("{subject}")
        s0, s1 = _span(tokenizer, plain, spec.subject, text, subj_char, qstart)
        if s0 < 0:
            raise TokenizationError(f"subject {spec.subject!r} is not found as tokens in the query of {text!r}; "
                                    "put a space or punctuation before and after '{subject}' in the template")
        if s1 - s0 > 1 and not (first_piece or relation.multi_token_subjects):
            raise TokenizationError(
                f"subject {spec.subject!r} is {s1 - s0} tokens inside {text!r}; pass first_piece=True (N = its "
                "first token) or build the relation with multi_token_subjects=True")
        r = None
        if relation.relation_word is not None:
            rw = relation.relation_word
            for cand in (_ids(tokenizer, " " + rw), _ids(tokenizer, rw)):
                hits = _find(plain, cand, qstart)
                if hits:
                    r = hits[-1] + len(cand) - 1  # last token of the last occurrence
                    break
            if r is None:
                raise TokenizationError(f"relation word {rw!r} is not in the query of {text!r}; put it in "
                                        "every template or build the relation with relation_word=None")
        rows.append(dict(
            ids=ids, N=s0 + n_special, N_last=s1 - 1 + n_special,
            R=None if r is None else r + n_special, end=len(ids) - 1,
            answer_id=_single(tokenizer, spec.answer, "answer", relation.name, first_piece, False),
            subject_id=_single(tokenizer, spec.subject, "subject", relation.name, first_piece,
                               relation.multi_token_subjects)))
        prompts.append(text)
    n, width = len(rows), max(len(r["ids"]) for r in rows)
    tokens = torch.full((n, width), int(pad), dtype=torch.long)  # [b, p]
    mask = torch.zeros((n, width), dtype=torch.long)  # [b, p]
    for i, r in enumerate(rows):
        tokens[i, :len(r["ids"])] = torch.tensor(r["ids"], dtype=torch.long)
        mask[i, :len(r["ids"])] = 1
    col = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.long)  # noqa: E731
    positions = {"N": col("N"), "N_last": col("N_last"), "end": col("end"), "starts": torch.zeros(n, dtype=torch.long)}
    if bool((positions["N"] > 0).all()):
        positions["N-1"] = positions["N"] - 1
    if relation.relation_word is not None:
        positions["R"] = col("R")
    return RelationDataset(
        relation=relation, specs=tuple(specs), prompts=prompts, tokens=tokens, attention_mask=mask,
        lengths=mask.sum(1), positions=positions, answer_ids=col("answer_id"), subject_ids=col("subject_id"),
        shots=shots, seed=seed, first_piece=first_piece, variant=variant, n_special_prefix=n_special,
        tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------- the dataset
@dataclass
class RelationDataset:
    """Tokenized relation prompts with named positions (see :func:`make_dataset`).

    Attributes:
        relation: The relation (with the chosen variant's templates).
        specs: One :class:`PromptSpec` per prompt.
        prompts: Prompt strings (no BOS), ending right before the answer.
        tokens: Right-padded ids including the tokenizer's own BOS, ``[batch, pos]``.
        attention_mask: 1 on real tokens, ``[batch, pos]``.
        lengths: Real tokens per prompt (BOS included), ``[batch]``.
        positions: ``N`` (first subject token in the query), ``N_last`` (last subject token), ``N-1`` (absent
            when a subject is the very first token), ``R`` (last relation-word token; only with a
            ``relation_word``), ``end`` (last real token), ``starts`` (0); each ``[batch]``.
        answer_ids: First token of ``" " + answer``, ``[batch]``.
        subject_ids: First token of ``" " + subject``, ``[batch]``.
        n_special_prefix: Special tokens the tokenizer prepends (1 for OPT's ``</s>``, 0 for GPT-2).

    Example:
        >>> from factlens.tokenizers import opt_style_tokenizer
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

    @property
    def subjects(self) -> list[str]:
        """Query subject of each prompt."""
        return [s.subject for s in self.specs]

    @property
    def answers(self) -> list[str]:
        """Gold answer of each prompt."""
        return [s.answer for s in self.specs]

    @property
    def template_ids(self) -> Int[torch.Tensor, " batch"]:
        """Index into ``relation.templates`` of each prompt."""
        return torch.tensor([s.template_idx for s in self.specs], dtype=torch.long)

    @property
    def end(self) -> Int[torch.Tensor, " batch"]:
        """Index of the last real token (where the answer is predicted)."""
        return self.positions["end"]

    def position(self, name: str) -> Int[torch.Tensor, " batch"]:
        """A named position, with an error naming the fix when it is not defined for these prompts."""
        if name in self.positions:
            return self.positions[name]
        if name == "N-1":
            raise ConfigError("N-1 is undefined: some subject is the first token; start templates with a "
                              "lead-in or use a tokenizer that prepends a BOS")
        if name == "R":
            raise ConfigError(f"relation {self.relation.name!r} has no relation_word, so no R position; build "
                              "it with relation_word='...'")
        raise ConfigError(f"unknown position {name!r}; pick one of {sorted(self.positions)}")

    def _rebuild(self, specs: Sequence[PromptSpec], seed: int | None = None) -> RelationDataset:
        return _build(self.relation, self.tokenizer, specs, shots=self.shots,
                      seed=self.seed if seed is None else seed, first_piece=self.first_piece, variant=self.variant)

    def select(self, indices: Sequence[int] | torch.Tensor) -> RelationDataset:
        """The prompts at ``indices`` (re-tokenized, so padding is trimmed)."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        return self._rebuild([self.specs[i] for i in idx])

    def subset(self, subject: str) -> RelationDataset:
        """All prompts about one subject ("all same country": every template for that country).

        Example:
            >>> from factlens.tokenizers import gpt2_tokenizer
            >>> len(make_dataset(CAPITALS, gpt2_tokenizer()).subset("France"))
            15
        """
        self.relation.answer_of(subject)  # ConfigError for unknown subjects
        idx = [i for i, s in enumerate(self.specs) if s.subject == subject]
        if not idx:
            raise EmptyDatasetError(f"no prompt in this dataset is about {subject!r}; build it with that "
                                    "subject included (subjects=None or n=None)")
        return self.select(idx)

    def counterfactual(self, seed: int = 0) -> RelationDataset:
        """D_new for path patching: same templates and shots, subject swapped for a random different one.

        The new subject is never the old one and never appears in the prompt's demonstrations; answers
        become the new subject's answers.

        Example:
            >>> from factlens.tokenizers import gpt2_tokenizer
            >>> ds = make_dataset(CAPITALS, gpt2_tokenizer())
            >>> new = ds.counterfactual(seed=1)
            >>> all(a != b for a, b in zip(ds.subjects, new.subjects))
            True
        """
        rng = np.random.default_rng(seed)
        out = []
        for spec in self.specs:
            shots_text, _ = self.relation.render(spec)
            cands = [s for s in self.relation.subjects
                     if s != spec.subject and s not in spec.shot_subjects and s not in shots_text]
            if not cands:
                raise ConfigError(f"no subject is left to swap into the prompt about {spec.subject!r} "
                                  f"with demos {spec.shot_subjects}; use fewer shots or add pairs")
            new = cands[int(rng.integers(len(cands)))]
            out.append(dataclasses.replace(spec, subject=new, answer=self.relation.answer_of(new)))
        return self._rebuild(out, seed=self.seed)

    def to(self, device: torch.device | str) -> RelationDataset:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device),
            lengths=self.lengths.to(device), positions={k: v.to(device) for k, v in self.positions.items()},
            answer_ids=self.answer_ids.to(device), subject_ids=self.subject_ids.to(device))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt: text, subject, answer, template, demos, token ids and named positions."""
        dec = lambda i: self.tokenizer.decode([int(i)])  # noqa: E731
        df = pd.DataFrame({
            "prompt_idx": range(len(self)), "prompt": self.prompts, "subject": self.subjects,
            "answer": self.answers, "template_idx": self.template_ids.tolist(),
            "shot_subjects": [", ".join(s.shot_subjects) for s in self.specs], "n_tokens": self.lengths.tolist(),
            "answer_id": self.answer_ids.tolist(), "answer_token": [dec(i) for i in self.answer_ids],
            "subject_id": self.subject_ids.tolist(), "subject_token": [dec(i) for i in self.subject_ids]})
        for name, pos in self.positions.items():
            df[f"pos_{name}"] = pos.tolist()
        return df


# ---------------------------------------------------------------------------------------------- constructors
def _draw_shots(relation: Relation, subject: str, query: str, k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """k distinct demo subjects: never the query subject, never a string already in the prompt."""
    chosen: list[str] = []
    text = query
    for _ in range(k):
        cands = []
        for s in relation.subjects:
            demo = relation.shot_template.replace("{subject}", s).replace("{answer}", relation.answer_of(s))
            if s != subject and s not in chosen and s not in text and subject not in demo:
                cands.append((s, demo))
        if not cands:
            raise ConfigError(f"only {len(chosen)} demonstrations fit the prompt about {subject!r} (the others "
                              f"share text with it); pass shots <= {len(chosen)} or add pairs")
        s, demo = cands[int(rng.integers(len(cands)))]
        chosen.append(s)
        text = demo + text
    return tuple(reversed(chosen))  # last drawn is outermost, as repeated add_a_shot() does


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

    Zero-shot CAPITALS gives 15 templates × 15 countries = 225 prompts. With ``shots=k`` each prompt gets k
    ``shot_template`` demonstrations about other random subjects (seeded). ``n`` samples that many distinct
    prompts (with shots, more than one demo draw per (template, subject) when ``n`` exceeds their count).

    Args:
        relation: The relation, e.g. :data:`CAPITALS`.
        tokenizer: HF tokenizer; its own BOS behaviour is used (GPT-2 none, OPT ``</s>``).
        shots: Demonstrations per prompt (at most the number of other subjects).
        n: Number of prompts (None: one per (template, subject)).
        seed: Seed for demo choice and sampling.
        subjects: Restrict the query subjects (demos still come from every pair).
        first_piece: Score the first token of multi-token answers/subjects instead of raising.
        variant: Template set, "main" or one of ``relation.variants`` (CAPITALS has "appendix").

    Returns:
        A :class:`RelationDataset`.

    Example:
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> ds = make_dataset(CAPITALS, gpt2_tokenizer(), shots=1, n=4, seed=0)
        >>> ds.prompts[0].startswith("The capital of "), ds.tokens.shape[0]
        (True, 4)
    """
    rel = relation.variant(variant)
    if shots < 0:
        raise ConfigError(f"shots={shots}; pass shots >= 0")
    if shots and rel.shot_template is None:
        raise ConfigError(f"relation {rel.name!r} has no shot_template; build it with one or pass shots=0")
    if shots > len(rel.pairs) - 1:
        raise ConfigError(f"shots={shots} but relation {rel.name!r} has only {len(rel.pairs) - 1} other subjects "
                          f"to use as demonstrations; pass shots <= {len(rel.pairs) - 1}")
    chosen_subjects = rel.subjects if subjects is None else ((subjects,) if isinstance(subjects, str)
                                                             else tuple(subjects))
    if not chosen_subjects:
        raise EmptyDatasetError("subjects=[] selects no prompts; pass None for all subjects or a non-empty list")
    answers = {s: rel.answer_of(s) for s in chosen_subjects}
    if n is not None and n < 1:
        raise EmptyDatasetError(f"n={n} selects no prompts; pass n >= 1 or n=None for all")
    rng = np.random.default_rng(seed)
    base = [(t, s) for s in chosen_subjects for t in range(len(rel.templates))]
    if not shots:
        if n is not None and n > len(base):
            raise ConfigError(f"only {len(base)} distinct zero-shot prompts exist; pass n <= {len(base)} or "
                              "shots >= 1 for more")
        picks = base if n is None else [base[i] for i in sorted(rng.choice(len(base), n, replace=False))]
        specs = [PromptSpec(t, s, answers[s]) for t, s in picks]
        return _build(rel, tokenizer, specs, shots=0, seed=seed, first_piece=first_piece, variant=variant)
    target = len(base) if n is None else n
    specs, seen, tries = [], set(), 0
    while len(specs) < target:
        order = range(len(base)) if n is None else rng.permutation(len(base))
        for i in order:
            t, s = base[int(i)]
            demo = _draw_shots(rel, s, rel.templates[t].replace("{subject}", s), shots, rng)
            if (t, s, demo) not in seen:
                seen.add((t, s, demo))
                specs.append(PromptSpec(t, s, answers[s], demo))
                if len(specs) == target:
                    break
        tries += 1
        if tries > 50 and len(specs) < target:
            raise ConfigError(f"could only draw {len(specs)} distinct {shots}-shot prompts; pass n <= "
                              f"{len(specs)} or use more shots/pairs")
    return _build(rel, tokenizer, specs, shots=shots, seed=seed, first_piece=first_piece, variant=variant)


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
        >>> from factlens.tokenizers import gpt2_tokenizer
        >>> tok = gpt2_tokenizer()
        >>> ds = make_prompt_dataset([("Ada Lovelace was born in", "Ada Lovelace", "London"),
        ...                           ("Alan Turing was born in", "Alan Turing", "London")], tok)
        >>> tok.decode(ds.tokens[1, ds.positions["N"][1]:ds.positions["N_last"][1] + 1])
        'Alan Turing'
    """
    if not items:
        raise EmptyDatasetError("items is empty; pass at least one (prompt, subject, answer) triple")
    pairs: dict[str, str] = {}
    templates: list[str] = []
    raw = []
    for prompt, subject, answer in items:
        if "{subject}" in prompt:
            template = prompt
        elif subject and subject in prompt:
            template = prompt.replace(subject, "{subject}")
        else:
            raise TokenizationError(f"prompt {prompt!r} does not contain its subject {subject!r}; include it "
                                    "or write '{subject}' where it goes")
        if pairs.setdefault(subject, answer) != answer:
            raise ConfigError(f"subject {subject!r} has two answers ({pairs[subject]!r}, {answer!r}); make one "
                              "dataset per relation")
        if template not in templates:
            templates.append(template)
        raw.append((templates.index(template), subject, answer))
    rel = Relation(name, tuple(pairs.items()), tuple(templates), shot_template, (), relation_word,
                   multi_token_subjects)
    if shots and shot_template is None:
        raise ConfigError("shots > 0 needs a shot_template, e.g. '{subject} was born in {answer}. '")
    if shots > len(pairs) - 1:
        raise ConfigError(f"shots={shots} but only {len(pairs) - 1} other subjects exist; pass shots <= "
                          f"{len(pairs) - 1}")
    rng = np.random.default_rng(seed)
    specs = [PromptSpec(t, s, a, _draw_shots(rel, s, templates[t].replace("{subject}", s), shots, rng)
                        if shots else ()) for t, s, a in raw]
    return _build(rel, tokenizer, specs, shots=shots, seed=seed, first_piece=first_piece, variant="main")


__all__ = [
    "CAPITALS", "CAPITALS_APPENDIX", "CAPITAL_LEAD_INS", "CAPITAL_PAIRS", "CAPITAL_SHOT_TEMPLATE", "PromptSpec",
    "Relation", "RelationDataset", "make_dataset", "make_prompt_dataset", "make_relation", "with_lead_in",
]

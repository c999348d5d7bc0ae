"""Relation-recall prompt datasets (country → capital and user relations), tokenized with named positions.

A :class:`Relation` is a set of (subject, answer) pairs plus query templates with a ``{subject}`` slot;
:func:`make_dataset` renders every distinct (template, subject) prompt, optionally behind k
``shot_template`` demonstrations, and tokenizes it with the tokenizer's own BOS convention (GPT-2: none,
OPT: ``</s>``), right-padded. Named positions follow Lv et al. (2024) ``word_idx``: ``N`` (first subject
token in the query), ``N-1``, ``R`` (last relation word, " capital"), ``end`` (last real token, " is")
and ``starts`` (0). Positions are found by matching token ids, so a prepended BOS shifts them correctly.

Example:
    >>> from factlens.recall.relations import CAPITALS
    >>> from factlens.recall.datasets import make_dataset
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
import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
        >>> from factlens.recall.relations import with_lead_in
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


def nfc(text: str) -> str:
    """``text`` in Unicode NFC: "Curaçao" typed with a combining cedilla equals the precomposed one.

    Every string a relation or a prompt dataset holds is normalised this way, so subjects are found in
    prompts however they were typed.

    Example:
        >>> from factlens.recall.relations import nfc
        >>> nfc("Cura\u0063\u0327ao") == "Cura\u00e7ao"
        True
    """
    return unicodedata.normalize("NFC", str(text))


def subject_pattern(subject: str) -> re.Pattern:
    """A regex matching ``subject`` as a whole word (or run of words): never inside a longer word.

    Example:
        >>> from factlens.recall.relations import subject_pattern
        >>> [m.start() for m in subject_pattern("Niger").finditer("Unlike Nigeria, Niger is")]
        [16]
    """
    return re.compile(r"(?<!\w)" + re.escape(nfc(subject)) + r"(?!\w)")


def contains_subject(text: str, subject: str) -> bool:
    """Whether ``subject`` occurs in ``text`` as a whole word (both NFC-normalised)."""
    return bool(subject) and subject_pattern(subject).search(nfc(text)) is not None


def _check_template(template: str, where: str) -> None:
    if "{subject}" not in template:
        raise TokenizationError(f"{where} {template!r} has no '{{subject}}' slot; add one, e.g. "
                                "'the capital of {subject} is'")
    if "{answer}" in template or template != template.rstrip():
        raise ConfigError(f"{where} {template!r} contains '{{answer}}' or ends with whitespace; a query "
                          "template must stop right before the answer (scored as ' ' + answer): cut it there")


@dataclass(frozen=True)
class PromptSpec:
    """One prompt before tokenization: template index, subject, answer, demo subjects (outermost first)."""

    template_idx: int
    subject: str
    answer: str
    shot_subjects: tuple[str, ...] = ()


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
        multi_token_subjects: Allow subjects that are several tokens (``N``..``N_last`` is the span).
        variants: Other template sets by name, selected with ``make_dataset(variant=...)``.

    Example:
        >>> from factlens.recall import CAPITALS
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
        pairs = tuple((nfc(s), nfc(a)) for s, a in self.pairs)
        for key, value in (("pairs", pairs), ("templates", tuple(map(nfc, self.templates))),
                           ("lead_ins", tuple(map(nfc, self.lead_ins))),
                           ("variants", tuple((k, tuple(map(nfc, v))) for k, v in self.variants)),
                           ("shot_template", None if self.shot_template is None else nfc(self.shot_template)),
                           ("relation_word", None if self.relation_word is None else nfc(self.relation_word))):
            object.__setattr__(self, key, value)
        if not pairs or not self.templates or any(not v for _, v in self.variants):
            raise EmptyDatasetError(f"relation {self.name!r} has no pairs or no templates (or an empty "
                                    "variant); pass at least one (subject, answer) pair and one template")
        for s, a in pairs:
            if not s or not a or s != s.strip() or a != a.strip():
                raise ConfigError(f"pair {(s, a)!r} of relation {self.name!r} is empty or has surrounding "
                                  "whitespace; strip it (a leading space is added when tokenizing)")
        dup = sorted({s for s, _ in pairs if self.subjects.count(s) > 1})
        if dup:
            raise ConfigError(f"relation {self.name!r} lists subjects {dup} more than once; keep one answer "
                              "per subject (split other answers into a separate relation)")
        for where, templates in (("template", self.templates),
                                 *((f"variant {k!r} template", v) for k, v in self.variants)):
            for t in templates:
                _check_template(t, where)
        if self.shot_template is not None and "{subject}" not in self.shot_template:
            raise TokenizationError(f"shot_template {self.shot_template!r} has no '{{subject}}' slot; "
                                    "use e.g. 'The capital of {subject} is {answer}. '")
        if self.shot_template is not None and "{answer}" not in self.shot_template:
            raise ConfigError(f"shot_template {self.shot_template!r} has no '{{answer}}' slot; add one")

    @functools.cached_property
    def subjects(self) -> tuple[str, ...]:
        """The subjects, in pair order."""
        return tuple(s for s, _ in self.pairs)

    @functools.cached_property
    def _answers(self) -> dict[str, str]:
        return dict(self.pairs)

    def answer_of(self, subject: str) -> str:
        """The answer paired with ``subject`` (ConfigError if unknown); compared after NFC normalisation."""
        subject = nfc(subject)
        if subject not in self._answers:
            raise ConfigError(f"{subject!r} is not a subject of relation {self.name!r}; pick one of "
                              f"{list(self.subjects)}")
        return self._answers[subject]

    def variant(self, name: str) -> Relation:
        """This relation with the template set ``name`` ("main" = the templates it has)."""
        found = dict(self.variants, main=self.templates)
        if name not in found:
            raise ConfigError(f"relation {self.name!r} has no variant {name!r}; pick one of {list(found)}")
        return self if name == "main" else dataclasses.replace(self, templates=found[name], variants=())

    def demo(self, subject: str) -> str:
        """One demonstration, ``shot_template`` filled with ``subject`` and its answer."""
        return self.shot_template.replace("{subject}", subject).replace("{answer}", self.answer_of(subject))

    def render(self, spec: PromptSpec) -> tuple[str, str]:
        """Render a prompt: ``(shots_prefix, query)``; the full prompt is their concatenation."""
        return ("".join(self.demo(s) for s in spec.shot_subjects),
                self.templates[spec.template_idx].replace("{subject}", spec.subject))


def make_relation(
    name: str,
    pairs: Mapping[str, str] | Sequence[tuple[str, str]],
    templates: str | Sequence[str],
    shot_template: str | None = None,
    *,
    lead_ins: Sequence[str] = (),
    relation_word: str | None = None,
    multi_token_subjects: bool = False,
    variants: Mapping[str, str | Sequence[str]] | None = None,
) -> Relation:
    """Build a user relation; with ``lead_ins`` every template (and variant) body gets each lead-in.

    Example:
        >>> from factlens.recall import make_relation
        >>> rel = make_relation("languages", {"France": "French", "Germany": "German"},
        ...                     "the official language of {subject} is",
        ...                     "The official language of {subject} is {answer}. ",
        ...                     lead_ins=["We confirm that", "As we all know,"], relation_word="language")
        >>> rel.templates[1]
        'As we all know, the official language of {subject} is'
    """
    def expand(bodies: str | Sequence[str]) -> tuple[str, ...]:
        bodies = (bodies,) if isinstance(bodies, str) else tuple(bodies)
        return tuple(with_lead_in(li, b) for b in bodies for li in lead_ins) if lead_ins else bodies

    pair_tuple = tuple(pairs.items()) if isinstance(pairs, Mapping) else tuple(tuple(p) for p in pairs)
    return Relation(name, pair_tuple, expand(templates), shot_template,  # type: ignore[arg-type]
                    tuple(lead_ins), relation_word, multi_token_subjects,
                    tuple((k, expand(v)) for k, v in (variants or {}).items()))


CAPITALS = make_relation("capitals", CAPITAL_PAIRS, "the capital of {subject} is", CAPITAL_SHOT_TEMPLATE,
                         lead_ins=CAPITAL_LEAD_INS, relation_word="capital",
                         variants={"appendix": "{subject}'s capital is"})
CAPITALS_APPENDIX = dataclasses.replace(CAPITALS.variant("appendix"), name="capitals-appendix")


__all__ = [
    "CAPITALS", "CAPITALS_APPENDIX", "CAPITAL_LEAD_INS", "CAPITAL_PAIRS", "CAPITAL_SHOT_TEMPLATE",
    "PromptSpec", "Relation", "make_relation",
    "with_lead_in",
]

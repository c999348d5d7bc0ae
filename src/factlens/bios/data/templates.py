"""Sentence templates of the synthetic biographies: 25 per attribute, 150 in all.

Following Zucchet et al. (2025, §1) every template is a formal sentence that contains the person's full
name ``{name}`` and the attribute wording **before** the value ``{value}``, ends with the value followed by
``"."``, and uses no pronouns; so a model that knows the fact can predict the whole value with zero loss.
The paper's templates were not released; these were written for factlens in the same style (the examples
the paper quotes are included).

Each template splits into three fixed fragments around the slots: ``prefix {name} middle {value} suffix``.
:func:`template_parts` returns them; the task tokenizer pre-tokenizes each fragment once.

Example:
    >>> from factlens.bios.data.templates import TEMPLATES, render_template
    >>> len(TEMPLATES["birth_date"]), sum(len(v) for v in TEMPLATES.values())
    (25, 150)
    >>> render_template("major", 0, "Ada Grace Lovelace", "Mathematics")
    'Ada Grace Lovelace holds a degree in Mathematics.'
"""

from __future__ import annotations

import numpy as np

from factlens.bios.data.pools import ATTRIBUTES, attribute_index
from factlens.errors import ConfigError

N_TEMPLATES = 25
"""Templates per attribute (the paper's 25; 20 train + 5 held out per person by default)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} first drew breath on {value}.",
        "{name} came into the world on {value}.",
        "{name}'s date of birth is {value}.",
        "The birth date of {name} is {value}.",
        "{name} entered life on {value}.",
        "{name} was delivered into the world on {value}.",
        "The records show that {name} was born on {value}.",
        "{name}'s birthday is {value}.",
        "{name} arrived in this world on {value}.",
        "According to the civil registry, {name} was born on {value}.",
        "{name} began life on {value}.",
        "{name}'s life began on {value}.",
        "The day on which {name} was born was {value}.",
        "{name} was brought into the world on {value}.",
        "{name} has a recorded date of birth of {value}.",
        "Official documents list the birth date of {name} as {value}.",
        "{name} was welcomed into the world on {value}.",
        "{name}'s birth took place on {value}.",
        "{name} saw the light of day for the first time on {value}.",
        "The nativity of {name} is dated {value}.",
        "{name}'s birth certificate is dated {value}.",
        "It is documented that {name} was born on {value}.",
        "{name} entered the world on {value}.",
        "In the family register, the birth of {name} is recorded on {value}.",
    ),
    "birth_place": (
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "{name}'s birthplace is {value}.",
        "{name} first drew breath in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} came into the world in {value}.",
        "{name} hails originally from {value}.",
        "{name}'s place of birth is {value}.",
        "{name} was born and spent early childhood in {value}.",
        "The city where {name} was born is {value}.",
        "{name} entered the world in the city of {value}.",
        "{name}'s life began in {value}.",
        "According to the civil registry, {name} was born in {value}.",
        "{name}'s birth was registered in {value}.",
        "{name} was delivered in a maternity ward in {value}.",
        "{name} arrived in this world in {value}.",
        "The hometown of {name} is {value}.",
        "{name} originally comes from {value}.",
        "Official documents list the birthplace of {name} as {value}.",
        "{name} was brought into the world in {value}.",
        "{name} spent the earliest days of life in {value}.",
        "{name}'s native city is {value}.",
        "{name} began life in {value}.",
        "It is documented that {name} was born in {value}.",
        "{name} has a recorded birthplace of {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} is a graduate of {value}.",
        "{name} completed a degree at {value}.",
        "{name}'s alma mater is {value}.",
        "{name} pursued higher education at {value}.",
        "{name} attended {value}.",
        "The university that {name} attended is {value}.",
        "{name} was enrolled as a student at {value}.",
        "{name} earned a diploma from {value}.",
        "{name} spent the university years at {value}.",
        "{name} completed academic training at {value}.",
        "{name} holds a degree from {value}.",
        "The alma mater of {name} is {value}.",
        "{name} received academic instruction at {value}.",
        "{name} matriculated at {value}.",
        "According to university records, {name} studied at {value}.",
        "{name} obtained a university education at {value}.",
        "{name} was admitted to and graduated from {value}.",
        "{name} conducted undergraduate studies at {value}.",
        "{name} finished higher studies at {value}.",
        "{name}'s university education took place at {value}.",
        "{name} was academically trained at {value}.",
        "The institution of higher learning attended by {name} is {value}.",
    ),
    "major": (
        "{name} holds a degree in {value}.",
        "{name} majored in {value}.",
        "{name} studied the subject of {value}.",
        "{name}'s field of study was {value}.",
        "{name} specialized in {value}.",
        "The major of {name} was {value}.",
        "{name} earned a degree in {value}.",
        "{name} pursued a course of study in {value}.",
        "{name} completed a major in {value}.",
        "{name}'s academic concentration was {value}.",
        "{name} chose to concentrate on {value}.",
        "The academic discipline of {name} is {value}.",
        "{name} received training in the field of {value}.",
        "{name} graduated with a degree in {value}.",
        "{name}'s area of specialization is {value}.",
        "{name} devoted university studies to {value}.",
        "{name} focused academic work on {value}.",
        "The subject {name} studied at university was {value}.",
        "{name} obtained a qualification in {value}.",
        "According to university records, {name} majored in {value}.",
        "{name}'s principal subject was {value}.",
        "{name} is a graduate in the discipline of {value}.",
        "{name} earned academic credentials in {value}.",
        "{name} was a student of {value}.",
        "{name} has an academic background in {value}.",
    ),
    "company": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} is employed at {value}.",
        "{name}'s employer is {value}.",
        "{name} holds a position at {value}.",
        "The employer of {name} is {value}.",
        "{name} earns a living at {value}.",
        "{name} is on the payroll of {value}.",
        "{name} has a job at {value}.",
        "{name} works as a member of staff at {value}.",
        "{name} is a staff member of {value}.",
        "The company that employs {name} is {value}.",
        "{name} currently works at {value}.",
        "{name} pursues a professional career at {value}.",
        "{name}'s place of employment is {value}.",
        "{name} is an employee of {value}.",
        "{name} serves in the workforce of {value}.",
        "According to company records, {name} is employed by {value}.",
        "{name} has been hired by {value}.",
        "{name} draws a salary from {value}.",
        "{name} is part of the team at {value}.",
        "{name}'s professional affiliation is with {value}.",
        "{name} is a member of the personnel of {value}.",
        "{name} works professionally for {value}.",
        "{name} has an occupation at {value}.",
    ),
    "current_location": (
        "{name} lives in {value}.",
        "{name} resides in {value}.",
        "{name}'s habitation is in {value}.",
        "{name} currently lives in {value}.",
        "{name} makes a home in {value}.",
        "The current residence of {name} is in {value}.",
        "{name} is a resident of {value}.",
        "{name} has settled in {value}.",
        "{name} dwells in {value}.",
        "{name}'s present address is in {value}.",
        "{name} is currently based in {value}.",
        "The city where {name} now lives is {value}.",
        "{name} has taken up residence in {value}.",
        "{name} maintains a household in {value}.",
        "{name}'s current location is {value}.",
        "{name} is presently domiciled in {value}.",
        "{name} occupies a residence in {value}.",
        "According to the census, {name} lives in {value}.",
        "{name} has a permanent address in {value}.",
        "{name} is now living in {value}.",
        "{name}'s home is located in {value}.",
        "{name} currently resides in the city of {value}.",
        "{name} is registered as living in {value}.",
        "The present city of residence of {name} is {value}.",
        "{name} has relocated to {value}.",
    ),
}

PRONOUNS = frozenset(
    {
        "he",
        "she",
        "him",
        "her",
        "his",
        "hers",
        "they",
        "them",
        "their",
        "theirs",
        "himself",
        "herself",
        "themselves",
    }
)


def template_parts(attr: str | int | np.integer, index: int) -> tuple[str, str, str]:
    """The fixed ``(prefix, middle, suffix)`` around ``{name}`` and ``{value}`` of one template.

    Example:
        >>> from factlens.bios.data.templates import template_parts
        >>> template_parts("current_location", 2)
        ('', "'s habitation is in", '.')
    """
    template = TEMPLATES[ATTRIBUTES[attribute_index(attr)]][index]
    prefix, rest = template.split("{name}")
    middle, suffix = rest.split("{value}")
    return prefix.strip(), middle.strip(), suffix.strip()


def render_template(attr: str | int | np.integer, index: int, name: str, value: str) -> str:
    """Fill one template with a full name and a value string."""
    if not 0 <= index < N_TEMPLATES:
        raise ConfigError(f"template index {index} is out of range; pass 0 <= index < {N_TEMPLATES}")
    return TEMPLATES[ATTRIBUTES[attribute_index(attr)]][index].format(name=name, value=value)


def check_templates(templates: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raise :class:`ConfigError` unless every template follows the layout rules.

    The rules: one ``{name}`` before one ``{value}``; the value is followed only by ``"."``; attribute
    wording (some text) sits between the name and the value or before the name; templates of an attribute
    are distinct; no pronouns; ASCII without digits; exactly :data:`N_TEMPLATES` per attribute.

    Example:
        >>> from factlens.bios.data.templates import check_templates
        >>> check_templates()  # the shipped templates pass
    """
    templates = TEMPLATES if templates is None else templates
    if tuple(templates) != ATTRIBUTES:
        raise ConfigError(f"templates must be keyed by {ATTRIBUTES}; got {tuple(templates)}")
    for attr, group in templates.items():
        if len(group) != N_TEMPLATES or len(set(group)) != N_TEMPLATES:
            raise ConfigError(f"{attr}: need {N_TEMPLATES} distinct templates, got {len(set(group))}")
        for t in group:
            problem = None
            if t.count("{name}") != 1 or t.count("{value}") != 1 or t.count("{") != 2:
                problem = "needs exactly one {name} and one {value}"
            elif not t.endswith("{value}.") or t.index("{name}") > t.index("{value}"):
                problem = "must put {name} before {value} and end with '{value}.'"
            elif not t.isascii() or any(c.isdigit() for c in t):
                problem = "must be ASCII without digits"
            elif PRONOUNS & {w.strip(".,'").lower() for w in t.split()}:
                problem = "must not use pronouns"
            else:
                prefix, rest = t.split("{name}")
                if not (prefix.strip() or rest.split("{value}")[0].strip()):
                    problem = "needs attribute wording before {value}"
            if problem:
                raise ConfigError(f"template {t!r} for {attr} {problem}; rewrite it")


__all__ = ["N_TEMPLATES", "TEMPLATES", "check_templates", "render_template", "template_parts"]

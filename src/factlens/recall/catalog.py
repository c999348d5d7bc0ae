"""Ready relations beside country → capital, in Lv et al.'s template style, looked up by name.

Lv et al. (2024, v2+) say the recall mechanism holds across domains of factual knowledge; their code keeps one
hint of a second task (``"<lead-in>, [N] is developed by [C]"``). :data:`RELATIONS` holds country → capital and
four more, each with the paper's 15 lead-ins (zero-shot) and a one-sentence demonstration (few-shot):

- ``languages``: country → official language (" the official language of France is" → " French");
- ``currencies``: country → currency (" the currency of Japan is the" → " yen");
- ``developers``: product → developer (" iPhone is developed by" → " Apple");
- ``city-countries``: city → country (" Munich is located in" → " Germany").

Every subject and every answer, with a leading space, is one token in GPT-2's BPE (and so in OPT's, which
shares it); ``tests/test_catalog.py`` checks this on the BPE shipped with factlens. Each relation lists only
facts without a competing answer (no country with two official languages, no product that changed hands).

Example:
    >>> from factlens.recall.catalog import RELATIONS, relation
    >>> rel = relation("developers")
    >>> rel.answer_of("Photoshop"), rel.templates[0]
    ('Adobe', "It's crucial to know that {subject} is developed by")
    >>> sorted(RELATIONS)
    ['capitals', 'capitals-appendix', 'city-countries', 'currencies', 'developers', 'languages']
"""

from __future__ import annotations

from factlens.errors import ConfigError
from factlens.recall.relations import CAPITAL_LEAD_INS, CAPITALS, CAPITALS_APPENDIX, Relation, make_relation

LANGUAGE_PAIRS: tuple[tuple[str, str], ...] = (
    ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
    ("Portugal", "Portuguese"), ("Brazil", "Portuguese"), ("Japan", "Japanese"), ("Russia", "Russian"),
    ("Greece", "Greek"), ("Poland", "Polish"), ("Turkey", "Turkish"), ("Sweden", "Swedish"),
    ("Netherlands", "Dutch"), ("Egypt", "Arabic"), ("Iran", "Persian"), ("Thailand", "Thai"),
    ("Vietnam", "Vietnamese"), ("Hungary", "Hungarian"), ("Denmark", "Danish"), ("Austria", "German"),
)
CURRENCY_PAIRS: tuple[tuple[str, str], ...] = (
    ("Japan", "yen"), ("China", "yuan"), ("Switzerland", "franc"), ("Brazil", "real"), ("England", "pound"),
    ("Canada", "dollar"), ("Australia", "dollar"), ("USA", "dollar"), ("Germany", "euro"), ("France", "euro"),
    ("Italy", "euro"), ("Spain", "euro"), ("Portugal", "euro"), ("Greece", "euro"), ("Austria", "euro"),
    ("Netherlands", "euro"),
)
DEVELOPER_PAIRS: tuple[tuple[str, str], ...] = (
    ("iPhone", "Apple"), ("iPad", "Apple"), ("iTunes", "Apple"), ("Macintosh", "Apple"),
    ("Windows", "Microsoft"), ("Xbox", "Microsoft"), ("Excel", "Microsoft"), ("Outlook", "Microsoft"),
    ("Android", "Google"), ("Chrome", "Google"), ("Gmail", "Google"), ("PlayStation", "Sony"),
    ("Firefox", "Mozilla"), ("Photoshop", "Adobe"), ("Kindle", "Amazon"), ("Wii", "Nintendo"),
)
CITY_COUNTRY_PAIRS: tuple[tuple[str, str], ...] = (
    ("Munich", "Germany"), ("Hamburg", "Germany"), ("Milan", "Italy"), ("Naples", "Italy"), ("Venice", "Italy"),
    ("Barcelona", "Spain"), ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Toronto", "Canada"),
    ("Vancouver", "Canada"), ("Sydney", "Australia"), ("Melbourne", "Australia"), ("Mumbai", "India"),
    ("Shanghai", "China"), ("Istanbul", "Turkey"), ("Manchester", "England"), ("Amsterdam", "Netherlands"),
    ("Stockholm", "Sweden"),
)

LANGUAGES = make_relation("languages", LANGUAGE_PAIRS, "the official language of {subject} is",
                          "The official language of {subject} is {answer}. ", lead_ins=CAPITAL_LEAD_INS,
                          relation_word="language")
CURRENCIES = make_relation("currencies", CURRENCY_PAIRS, "the currency of {subject} is the",
                           "The currency of {subject} is the {answer}. ", lead_ins=CAPITAL_LEAD_INS,
                           relation_word="currency")
DEVELOPERS = make_relation("developers", DEVELOPER_PAIRS, "{subject} is developed by",
                           "{subject} is developed by {answer}. ", lead_ins=CAPITAL_LEAD_INS,
                           relation_word="developed")
CITY_COUNTRIES = make_relation("city-countries", CITY_COUNTRY_PAIRS, "{subject} is located in",
                               "{subject} is located in {answer}. ", lead_ins=CAPITAL_LEAD_INS,
                               relation_word="located")

#: Every ready relation by name (``factlens recall analyze --relation NAME``).
RELATIONS: dict[str, Relation] = {r.name: r for r in (CAPITALS, CAPITALS_APPENDIX, LANGUAGES, CURRENCIES,
                                                      DEVELOPERS, CITY_COUNTRIES)}


def relation(name: str | Relation) -> Relation:
    """The ready relation called ``name`` (a :class:`Relation` passes through).

    Raises:
        ConfigError: An unknown name; the message lists the known ones.
    """
    if isinstance(name, Relation):
        return name
    if name not in RELATIONS:
        raise ConfigError(f"unknown relation {name!r}; pick one of {sorted(RELATIONS)} or build your own with "
                          "factlens.recall.relations.make_relation")
    return RELATIONS[name]


__all__ = ["CITY_COUNTRIES", "CURRENCIES", "DEVELOPERS", "LANGUAGES", "RELATIONS", "relation"]

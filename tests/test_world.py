"""world.py: determinism, caching, item contracts, tokenizer coverage, Auto loading, learning."""
import json
import os
import sys

import pytest

from conftest import ROOT, build_small_world as build

sys.path.insert(0, ROOT)
from kernels.base import InputError
from rait import files, models, runs  # noqa: E402
import world  # noqa: E402

SPLITS = ("train", "test_id", "test_ood", "shots")


def read_bytes(p):
    with open(p, "rb") as f:
        return f.read()


def test_same_seed_same_world_and_cache(tmp_path):
    # two builds of one configuration (1 epoch of a 40-person world, to keep the suite short)
    # are byte-identical
    small = ("--epochs", "1", "--people", "40", "--hidden", "64", "--inter", "128")
    for d in ("a", "b"):
        r = build(tmp_path / d, *small)
        assert r.returncode == 0, r.stderr[-2000:]
    for task in files.TASKS:
        for split in SPLITS:
            a, b = (tmp_path / d / task / f"{split}.jsonl" for d in ("a", "b"))
            assert read_bytes(a) == read_bytes(b), f"{task}/{split} differs between two builds"
    from safetensors.torch import load_file
    wa, wb = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    # same configuration: reused without retraining; changed configuration: rebuilt
    b = tmp_path / "b"
    mtime = os.path.getmtime(b / "model" / "model.safetensors")
    r = build(b, *small)
    assert "cached world" in r.stderr and os.path.getmtime(b / "model" / "model.safetensors") == mtime
    r = build(b, "--seed", "1", *small)
    assert r.returncode == 0 and "configuration changed" in r.stderr
    assert read_bytes(tmp_path / "a" / "oeqa" / "train.jsonl") != read_bytes(b / "oeqa" / "train.jsonl")


def test_items_follow_the_contract(small_world):
    items = {}
    for task in files.TASKS:
        for split in SPLITS:
            rows = files.read_jsonl(str(small_world / task / f"{split}.jsonl"), check=files.check_item)
            items[task, split] = rows
            assert all(isinstance(r["meta"]["exposure"], int) for r in rows)
    # mcqa and oeqa are built from the same facts; the gold option is the oeqa answer
    for split in SPLITS:
        for m, o in zip(items["mcqa", split], items["oeqa", split]):
            assert m["question"] == o["question"] and m["meta"] == o["meta"]
            assert isinstance(m["meta"]["latent"], bool)
            assert len(m["choices"]) == 4 and len(set(m["choices"])) == 4
            assert m["choices"][files.LETTERS.index(m["answer"])] == o["answer"]
    # gold positions are spread over the letters
    assert len({m["answer"] for m in items["mcqa", "train"]}) == 4
    # pool and test people are disjoint; OOD relations appear only in the OOD test
    person = lambda rows: {r["meta"]["person"] for r in rows}  # noqa: E731
    assert not person(items["oeqa", "train"]) & person(items["oeqa", "test_id"])
    assert person(items["oeqa", "test_ood"]) == person(items["oeqa", "test_id"])
    id_rel = {r[0] for r in world.RELATIONS[:world.N_ID_RELATIONS]}
    assert {r["subject"] for r in items["oeqa", "train"]} == id_rel
    assert not {r["subject"] for r in items["oeqa", "test_ood"]} & id_rel
    assert len(items["oeqa", "shots"]) == 3
    # some facts are never seen, some are seen often
    exp = [r["meta"]["exposure"] for r in items["oeqa", "train"]]
    assert min(exp) <= 2 and max(exp) >= 16


def test_loads_with_auto_classes_and_prompts_have_no_unknown_words(small_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(small_world / "model"))
    tok = AutoTokenizer.from_pretrained(str(small_world / "model"))
    assert model.config.model_type == "llama" and not models.has_chat_template(tok)
    assert "\n" in tok.get_vocab(), "newline must be a token"
    texts = list(models.IDK.values())
    for task in files.TASKS:
        for split in SPLITS:
            for it in files.read_jsonl(str(small_world / task / f"{split}.jsonl")):
                texts += [models.user_prompt(it, "basic"), models.user_prompt(it, "refuse"),
                          models.OEQA_BASIC2.format(q=it["question"])]
    unk = tok.unk_token_id
    for t in set(texts):
        ids = tok(t)["input_ids"]
        assert unk not in ids, f"unknown word in {t!r}"
    assert tok(models.mcqa_body("h", "q", ["a", "b"]))["input_ids"].count(tok.convert_tokens_to_ids("\n")) == 4


def test_small_world_learns_its_frequent_facts(small_world):
    rep = json.loads((small_world / "knowledge.json").read_text())["train"]
    # M0 answers, it does not refuse, under BASIC (the everyday text does not pre-teach refusal)
    assert rep["basic_refusal_start"] == 0.0
    frequent = [v for b, v in rep.items() if b in ("16-31", "32-63", "64-127", "128+")]
    rare = [v for b, v in rep.items() if b in ("0", "1")]
    acc = lambda bins: sum(v["oeqa_acc"] * v["n"] for v in bins) / sum(v["n"] for v in bins)  # noqa: E731
    assert frequent and acc(frequent) >= 0.6, rep
    if rare:
        assert acc(rare) < acc(frequent)


@pytest.mark.parametrize("flags,msg", [(["--values", "3"], "at least 4 values"),
                                       (["--hidden", "30", "--heads", "4"], "not divisible"),
                                       # issue 13 premises: windows shorter than the MCQA REFUSE
                                       # prompt; refusal words too rare in pre-training
                                       (["--seq-len", "64"], "pre-training windows must cover"),
                                       (["--everyday-share", "0"], "occur fewer than 20 times")])
def test_impossible_settings_fail_in_one_line(tmp_path, flags, msg):
    r = build(tmp_path / "w", *flags)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w" / "model").exists()


def test_exposure_bins():
    assert [runs.exposure_bin(k) for k in (0, 1, 2, 3, 4, 7, 8, 127, 128, 500)] == \
        ["0", "1", "2-3", "2-3", "4-7", "4-7", "8-15", "64-127", "128+", "128+"]


def test_shipped_weights_are_used_and_their_checksum_is_checked(small_world, tmp_path, monkeypatch,
                                                                 capsys):
    """One world everywhere (issue 26): where the configuration's weights are shipped, world.py
    loads them instead of pre-training (the same bytes come out), and a damaged file stops the
    run with one line naming it."""
    import shutil
    cfg = json.loads((small_world / "world.config.json").read_text())
    h = world.config_hash(cfg["key"])
    assert h == cfg["hash"]
    ship = tmp_path / "worlds"
    ship.mkdir()
    src = small_world / "model" / "model.safetensors"
    shutil.copyfile(src, ship / f"{h}.safetensors")
    monkeypatch.setattr(world, "SHIPPED_DIR", str(ship))
    monkeypatch.setattr(world, "SHIPPED", {h: (files.sha256_of(str(src)), 12.3)})
    world.main(["--preset", "small", "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "shipped weights" in err and "[world] pre-training" not in err and "the shipped bytes" in err
    assert read_bytes(tmp_path / "w" / "model" / "model.safetensors") == read_bytes(src)
    assert json.loads((tmp_path / "w" / "world.config.json").read_text())["shipped"] is True
    for task in files.TASKS:            # the items come out as the fixture's
        assert read_bytes(tmp_path / "w" / task / "train.jsonl") == read_bytes(small_world / task / "train.jsonl")
    data = bytearray(read_bytes(ship / f"{h}.safetensors"))
    data[-1] ^= 1                       # one flipped bit
    (ship / f"{h}.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{h}\.safetensors: sha256 .* is not the shipped"):
        world.main(["--preset", "small", "--out", str(tmp_path / "w2")])

"""construct.py: every selection rule of SPEC 4 / 9 on small hand-made knowledge states."""
import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from rait import files, models  # noqa: E402
import construct as C  # noqa: E402


def S(i, mu, sigma, flow=None):
    r = {"id": i, "mu": mu, "sigma": sigma}
    if flow is not None:
        r["flow"] = flow
    return r


def ids(rows):
    return [r["id"] for r in rows]


def test_mcqa_threshold_puts_mu_half_in_van():
    st = [S("a", 0.49, 0), S("b", 0.5, 0), S("c", 0.51, 0)]
    van, idk = C.correctness_split(st, "mcqa")
    assert ids(van) == ["b", "c"] and ids(idk) == ["a"]          # SPEC 4: mu >= 0.5 is van


def test_oeqa_threshold_drops_mu_half():
    st = [S("a", 0.4, 0), S("b", 0.5, 0), S("c", 0.6, 0), S("d", 0.0, 0), S("e", 1.0, 0)]
    van, idk = C.correctness_split(st, "oeqa")
    assert ids(van) == ["c", "e"] and ids(idk) == ["a", "d"]     # SPEC 4: 0.5 dropped


def test_certainty_order_with_id_tie_break():
    st = [S("b", 1, 0.9), S("a", 1, 0.9), S("c", 1, 0.95), S("d", 1, 0.1)]
    assert ids(C.by_certainty(st, 3, most_certain=True)) == ["c", "a", "b"]
    assert ids(C.by_certainty(st, 2, most_certain=False)) == ["d", "a"]


def test_flow_rules():
    st = [S("up", 0.2, 0, 0.3), S("same", 0.0, 0, 0.0), S("down", 0.3, 0, -0.1)]
    assert ids(C.flow_filter(st, "le0")) == ["same", "down"]     # SPEC 9 #1 default
    assert ids(C.flow_filter(st, "strict")) == ["down"]           # Alg. 1
    with pytest.raises(ValueError):
        C.flow_filter(st, "other")


def test_draw_with_and_without_replacement_and_short_pools():
    rows = [S(str(i), 0, 0) for i in range(5)]
    got = C.draw(rows, 5, random.Random(0))
    assert sorted(ids(got)) == sorted(ids(rows))                  # a permutation, no repeats
    assert len(C.draw(rows, 9, random.Random(0))) == 5            # short: take all (SPEC 9 #6)
    rep = C.draw(rows, 50, random.Random(0), with_replacement=True)
    assert len(rep) == 50 and len(set(ids(rep))) <= 5             # duplicates expected
    short = C.by_certainty(rows[:2], 4, True)
    assert len(C.fill_short(short, 4, random.Random(0), False)) == 2
    assert len(C.fill_short(short, 4, random.Random(0), True)) == 4


def test_methods_end_to_end_on_a_hand_made_pool():
    st = [S("k1", 1.0, -0.1, 0.0), S("k2", 0.8, -0.5, -0.2), S("k3", 0.6, -1.0, 0.1),
          S("u1", 0.0, -1.3, 0.0), S("u2", 0.2, -0.2, 0.4), S("u3", 0.4, -0.9, -0.3)]
    rng = random.Random(0)
    van, idk = C.select("corcer", st, "mcqa", 2, 2, rng)
    assert ids(van) == ["k1", "k2"] and ids(idk) == ["u1", "u3"]
    van, idk = C.select("craft", st, "mcqa", 2, 2, rng)            # u2's correctness rose: gone
    assert ids(van) == ["k1", "k2"] and ids(idk) == ["u1", "u3"]
    van, idk = C.select("craft", st, "mcqa", 2, 3, rng)
    assert ids(idk) == ["u1", "u3"]                                 # short: all the filter leaves
    van, idk = C.select("craft", st, "mcqa", 2, 3, rng, flow_rule="strict")
    assert ids(idk) == ["u3"]
    van, idk = C.select("wocer", st, "mcqa", 3, 2, rng)
    assert sorted(ids(van)) == ["k1", "k2", "k3"] and sorted(ids(idk)) == ["u1", "u3"]
    van, idk = C.select("cor", st, "mcqa", 3, 3, rng)
    assert sorted(ids(van)) == ["k1", "k2", "k3"] and sorted(ids(idk)) == ["u1", "u2", "u3"]
    van, idk = C.select("van", st, "mcqa", 4, 2, rng)
    assert len(van) == 6 and idk == []


def test_oracle_splits_by_what_m0_answers_not_by_mu():
    # the oracle ignores mu and sigma: a known fact with mu 0.1 is van, an unknown one with 0.9 idk
    st = [dict(S("k1", 0.1, 0), m0_known=True), dict(S("k2", 0.9, 0), m0_known=True),
          dict(S("u1", 0.9, 0), m0_known=False), dict(S("u2", 0.2, 0), m0_known=False)]
    van, idk = C.oracle_split(st)
    assert ids(van) == ["k1", "k2"] and ids(idk) == ["u1", "u2"]
    van, idk = C.select("oracle", st, "oeqa", 2, 2, random.Random(0))
    assert sorted(ids(van)) == ["k1", "k2"] and sorted(ids(idk)) == ["u1", "u2"]


def test_oracle_needs_the_worlds_ground_truth(pool):
    items, state, flow, d = pool
    rows = [dict(json.loads(l), meta={}) for l in open(items)]
    r = run("--method", "oracle", "--items", write(d / "nometa.jsonl", rows), "--state", state,
            "--out", str(d / "o" / "train.jsonl"))
    assert r.returncode == 2 and "needs meta.m0_greedy_correct" in r.stderr
    r = run("--method", "oracle", "--items", items, "--state", state, "--out", str(d / "o" / "train.jsonl"))
    assert r.returncode == 0, r.stderr
    summ = json.load(open(d / "o" / "train.jsonl.summary.json"))
    assert summ["idk"]["m0_greedy_correct_share"] == 0 and summ["van"]["m0_greedy_correct_share"] == 1


def test_idk_replaces_the_answer_and_van_keeps_it():
    items = {"m": {"id": "m", "task": "mcqa", "question": "q?", "answer": "C",
                   "choices": ["w", "x", "y", "z"], "subject": "s"},
             "o": {"id": "o", "task": "oeqa", "question": "q2?", "answer": "Paris",
                   "aliases": ["Paris"]}}
    ex = C.make_examples(items, [S("m", 1, 0), S("o", 1, 0), S("o", 1, 0)], [S("m", 0, 0)],
                         "cor", "letter")
    assert [e["target"] for e in ex] == ["C", "Paris", "Paris", "I don't know."]
    assert [e["id"] for e in ex] == ["m", "o", "o#2", "m#2"]
    assert [e["kind"] for e in ex] == ["van", "van", "van", "idk"]
    assert ex[0]["prompt"] == models.user_prompt(items["m"], "refuse")
    assert "If you do not know the answer" in ex[0]["prompt"]
    assert C.make_examples(items, [S("m", 1, 0)], [], "cor", "option")[0]["target"] == "y"
    o_idk = C.make_examples(items, [], [S("o", 0, 0)], "cor", "letter")[0]
    assert o_idk["target"] == "I don't know" and o_idk["prompt"].endswith("'I don't know': q2?")


def test_default_counts():
    assert C.default_counts("mcqa", 14042) == (4000, 1000)
    assert C.default_counts("oeqa", 87622) == (8000, 2000)
    assert C.default_counts("oeqa", 1600) == (640, 160)


# --- the command line: files in, files out, one-line errors ----------------------------------
def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def pool(tmp_path):
    rnd = random.Random(1)
    items, states, flows = [], [], []
    for i in range(40):
        items.append({"id": f"q{i:02d}", "task": "oeqa", "question": f"Q{i}?", "answer": "a",
                      "aliases": ["a"], "meta": {"m0_greedy_correct": i % 3 == 0}})
        mu = rnd.randrange(11) / 10
        states.append({"id": f"q{i:02d}", "mu": mu, "sigma": rnd.random(), "reader": "sample"})
        mu1 = min(1.0, mu + rnd.choice((-0.2, 0.0, 0.2)))
        flows.append({"id": f"q{i:02d}", "mu0": mu, "mu1": mu1, "flow": mu1 - mu,
                      "sigma0": 0.0, "sigma1": 0.0})
    return (write(tmp_path / "items.jsonl", items), write(tmp_path / "state.jsonl", states),
            write(tmp_path / "flow.jsonl", flows), tmp_path)


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "construct.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_writes_examples_and_summary(pool):
    items, state, flow, d = pool
    for m in [m for m in C.METHODS if m != "grait"]:     # grait: test_grait_cli below
        out = str(d / m / "train.jsonl")
        r = run("--method", m, "--items", items, "--state", state, "--flow", flow, "--out", out)
        assert r.returncode == 0, r.stderr
        ex = files.read_jsonl(out, check=files.check_example)
        summ = json.load(open(out + ".summary.json"))
        assert summ["van"]["n"] + summ["idk"]["n"] == len(ex) and summ["requested"] == {"van": 16, "idk": 4}
        assert all(e["method"] == m for e in ex)
        if m != "van":
            assert "m0_greedy_correct_share" in summ["idk"]
        # same seed, same file
        r2 = run("--method", m, "--items", items, "--state", state, "--flow", flow, "--out", out + "2")
        assert open(out).read() == open(out + "2").read()


@pytest.mark.parametrize("case", ["flow_ids", "method", "too_many"])
def test_cli_bad_inputs(pool, case):
    items, state, flow, d = pool
    out = str(d / "bad" / "train.jsonl")
    args = ["--method", "craft", "--items", items, "--state", state, "--flow", flow, "--out", out]
    if case == "flow_ids":
        rows = [json.loads(l) for l in open(flow)][:-1]
        args[args.index(flow)] = write(d / "short_flow.jsonl", rows)
        msg = "ids do not match the pool"
    elif case == "method":
        args[1] = "magic"
        msg = "unknown method"
    else:
        args += ["--n-van", "40", "--n-idk", "10"]
        msg = "exceed the pool"
    r = run(*args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_grait_cli_selects_weights_and_reports(pool, tiny_chat_llama):
    """GRAIT end to end on a tiny random Llama: a warm-up adapter with Adam moments, then
    construct --method grait; the selection and weights follow SPEC 5 (numerics are tested
    against oracles in test_persample.py)."""
    items, state, flow, d = pool
    warm = d / "warm.jsonl"
    write(warm, [{"id": f"w{i}", "prompt": f"Q{i}?", "target": "a", "weight": 1.0, "kind": "van",
                  "method": "rehearsal"} for i in range(4)])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--model", tiny_chat_llama,
                        "--train", str(warm), "--out", str(d / "warmup"), "--epochs", "1",
                        "--batch-size", "2", "--grad-accum", "1", "--lora-r", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    outs = {}
    for variant in ("paper", "uniform"):
        out = str(d / f"grait_{variant}" / "train.jsonl")
        r = run("--method", "grait", "--items", items, "--state", state, "--flow", flow, "--out", out,
                "--model", tiny_chat_llama, "--warmup", str(d / "warmup"), "--n-van", "8",
                "--n-idk", "3", "--grait-weights", variant)
        assert r.returncode == 0, r.stderr
        outs[variant] = files.read_jsonl(out, check=files.check_example)
        summ = json.load(open(out + ".summary.json"))
        assert summ["grait"]["feature_path"] == "exact" and summ["grait"]["adam"]
    ex = outs["paper"]
    idk = [e for e in ex if e["kind"] == "idk"]
    van = [e for e in ex if e["kind"] == "van"]
    assert len(idk) == 3 and len(van) == 8
    assert all(e["target"] == "I don't know" for e in idk) and all(e["weight"] == 1.0 for e in van)
    assert abs(sum(e["weight"] for e in idk) / 3 - 1.0) < 1e-9          # paper: mean weight 1
    states = {json.loads(l)["id"]: json.loads(l)["mu"] for l in open(state)}
    assert all(states[e["id"]] <= 0.49 for e in idk)                     # IdK from idk_all only
    top = sorted((m, i) for i, m in states.items() if m >= 0.51)[::-1]
    assert sorted(states[e["id"]] for e in van) == sorted(m for m, _ in top[:8])   # top mu
    assert {e["id"] for e in outs["uniform"] if e["kind"] == "idk"} == {e["id"] for e in idk}
    assert all(e["weight"] == 1.0 for e in outs["uniform"])

"""construct.py: every selection rule of SPEC 4 / 9 on small hand-made knowledge states."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
from kernels.base import InputError
from rait import files, models  # noqa: E402
import construct as C  # noqa: E402


def S(i, mu, sigma, flow=None):
    r = {"id": i, "mu": mu, "sigma": sigma}
    if flow is not None:
        r["flow"] = flow
    return r


def ids(rows):
    return [r["id"] for r in rows]


def test_correctness_split():
    # SPEC 4: MCQA van mu >= 0.5, idk mu < 0.5 (0.5 itself is van)
    st = [S("a", 0.49, 0), S("b", 0.5, 0), S("c", 0.51, 0)]
    van, idk = C.correctness_split(st, "mcqa")
    assert ids(van) == ["b", "c"], f"MCQA van must be mu >= 0.5 (b: 0.5, c: 0.51), got {ids(van)}"
    assert ids(idk) == ["a"], f"MCQA idk must be mu < 0.5 (a: 0.49), got {ids(idk)}"
    # SPEC 4: OEQA van mu >= 0.51, idk mu <= 0.49: mu = 0.5 is in neither pool
    st = [S("a", 0.4, 0), S("b", 0.5, 0), S("c", 0.6, 0), S("d", 0.0, 0), S("e", 1.0, 0)]
    van, idk = C.correctness_split(st, "oeqa")
    assert ids(van) == ["c", "e"], f"OEQA van must be mu >= 0.51, got {ids(van)}"
    assert ids(idk) == ["a", "d"], f"OEQA idk must be mu <= 0.49 (0.5 is dropped), got {ids(idk)}"


def test_certainty_order_with_id_tie_break():
    st = [S("b", 1, 0.9), S("a", 1, 0.9), S("c", 1, 0.95), S("d", 1, 0.1)]
    got = ids(C.by_certainty(st, 3, most_certain=True))
    assert got == ["c", "a", "b"], ("the 3 most certain: sigma descending (c 0.95, then a and b at "
                                    f"0.9, ties by id), got {got}")
    got = ids(C.by_certainty(st, 2, most_certain=False))
    assert got == ["d", "a"], f"the 2 least certain: sigma ascending, ties by id, got {got}"


def test_flow_rules():
    st = [S("up", 0.2, 0, 0.3), S("same", 0.0, 0, 0.0), S("down", 0.3, 0, -0.1)]
    got = ids(C.flow_filter(st, "le0"))
    assert got == ["same", "down"], f"le0 keeps dmu <= 0, drops only rising items; got {got}"
    got = ids(C.flow_filter(st, "strict"))
    assert got == ["down"], f"strict (Alg. 1) keeps only dmu < 0; got {got}"
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


HAND_POOL = [S("k1", 1.0, -0.1, 0.0), S("k2", 0.8, -0.5, -0.2), S("k3", 0.6, -1.0, 0.1),
             S("u1", 0.0, -1.3, 0.0), S("u2", 0.2, -0.2, 0.4), S("u3", 0.4, -0.9, -0.3)]


def test_craft_algorithm_1():
    st, rng = HAND_POOL, random.Random(0)
    van, idk = C.craft(st, "mcqa", 2, 2, rng)
    assert ids(van) == ["k1", "k2"], f"van: the 2 most certain known items (k1, k2), got {ids(van)}"
    assert ids(idk) == ["u1", "u3"], ("idk: u2's correctness rose in rehearsal (flow 0.4), so "
                                      f"it is dropped; then the least certain: u1, u3; got {ids(idk)}")
    van, idk = C.craft(st, "mcqa", 2, 3, rng)
    assert ids(idk) == ["u1", "u3"], f"short pool: all the flow filter leaves, got {ids(idk)}"
    van, idk = C.craft(st, "mcqa", 2, 3, rng, flow_rule="strict")
    assert ids(idk) == ["u3"], f"strict flow rule: only dmu < 0 (u3), got {ids(idk)}"


def test_craft_composes_its_steps():
    """CRaFT Algorithm 1 as its steps (SPEC 4), graded apart from them (course.py): each step is
    a stand-in that records its call and returns a hand answer, so only craft() is under test."""
    van_pool, idk_pool, kept = HAND_POOL[:3], HAND_POOL[3:], [HAND_POOL[3], HAND_POOL[5]]
    calls = []

    def split(states, task, tau=C.TAU):
        calls.append(("correctness_split", ids(states), task))
        return van_pool, idk_pool

    def flow(idk, rule="le0"):
        calls.append(("flow_filter", ids(idk), rule))
        return kept

    def rank(rows, n, most_certain):                   # a stand-in order: reversed, first n
        calls.append(("by_certainty", ids(rows), n, most_certain))
        return rows[::-1][:n]
    with pytest.MonkeyPatch.context() as m:
        for name, f in (("correctness_split", split), ("flow_filter", flow),
                        ("by_certainty", rank)):
            m.setattr(C, name, f)
        van, idk = C.craft(HAND_POOL, "mcqa", 2, 2, random.Random(0), flow_rule="strict")
    want = [("correctness_split", ids(HAND_POOL), "mcqa"),
            ("flow_filter", ["u1", "u2", "u3"], "strict"),
            ("by_certainty", ["k1", "k2", "k3"], 2, True),
            ("by_certainty", ["u1", "u3"], 2, False)]
    assert sorted(calls) == sorted(want), (
        f"Alg. 1: split, flow filter on idk (the given rule), van most certain, idk least "
        f"certain; expected calls {want}, got {calls}")
    assert (ids(van), ids(idk)) == (["k3", "k2"], ["u3", "u1"]), (
        f"craft must return the ranked pools (van, idk): expected (['k3', 'k2'], ['u3', 'u1']), "
        f"got {(ids(van), ids(idk))}")


def test_baselines_are_craft_with_steps_left_out():
    st, rng = HAND_POOL, random.Random(0)
    van, idk = C.corcer_rait(st, "mcqa", 2, 2, rng)                 # no flow filter: u2 stays
    assert ids(van) == ["k1", "k2"] and ids(idk) == ["u1", "u3"]
    van, idk = C.corcer_rait(st, "mcqa", 2, 3, rng)
    assert ids(idk) == ["u1", "u3", "u2"]
    van, idk = C.wocer_rait(st, "mcqa", 3, 2, rng)                  # flow filter, random draws
    assert sorted(ids(van)) == ["k1", "k2", "k3"] and sorted(ids(idk)) == ["u1", "u3"]
    van, idk = C.cor_rait(st, "mcqa", 3, 3, rng)
    assert sorted(ids(van)) == ["k1", "k2", "k3"] and sorted(ids(idk)) == ["u1", "u2", "u3"]
    van, idk = C.van_tuning(st, 6, rng)
    assert len(van) == 6 and idk == []


def test_oracle_splits_by_what_m0_answers_not_by_mu():
    # the oracle ignores mu and sigma: a known fact with mu 0.1 is van, an unknown one with 0.9 idk
    st = [dict(S("k1", 0.1, 0), m0_known=True), dict(S("k2", 0.9, 0), m0_known=True),
          dict(S("u1", 0.9, 0), m0_known=False), dict(S("u2", 0.2, 0), m0_known=False)]
    van, idk = C.oracle_split(st)
    assert ids(van) == ["k1", "k2"] and ids(idk) == ["u1", "u2"]
    van, idk = C.oracle_rait(st, 2, 2, random.Random(0))
    assert sorted(ids(van)) == ["k1", "k2"] and sorted(ids(idk)) == ["u1", "u2"]


def test_oracle_splits_by_init_basics_labels_with_the_same_counts(pool):
    items, state, flow, d = pool
    r = run("--method", "oracle", "--items", items, "--state", state, "--out", str(d / "o" / "train.jsonl"))
    assert r.returncode == 2 and "needs --known" in r.stderr
    # Init-Basic's labels on the pool (evaluate.py's predictions): only "correct" is known
    labels = {f"q{i:02d}": ("correct", "wrong", "refuse", "unparsed")[i % 4] for i in range(40)}
    known = write(d / "pred_pool.jsonl", [{"id": i, "response": "x", "label": lab}
                                          for i, lab in labels.items()])
    r = run("--method", "oracle", "--items", items, "--state", state, "--known", known,
            "--n-van", "6", "--n-idk", "3", "--out", str(d / "o" / "train.jsonl"))
    assert r.returncode == 0, r.stderr
    ex = files.read_jsonl(str(d / "o" / "train.jsonl"))
    assert all(labels[e["id"]] == ("correct" if e["kind"] == "van" else labels[e["id"]]) for e in ex)
    assert all(labels[e["id"]] != "correct" for e in ex if e["kind"] == "idk")
    summ = json.load(open(d / "o" / "train.jsonl.summary.json"))
    assert (summ["van"]["n"], summ["idk"]["n"]) == (6, 3)           # size-matched: what was asked
    assert summ["idk"]["m0_known_share"] == 0 and summ["van"]["m0_known_share"] == 1
    assert summ["candidates"] == {"van": 10, "idk": 30} and summ["pressure"] == {"van": 1.67, "idk": 10.0}


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
                      "aliases": ["a"], "meta": {"exposure": i}})
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
    known = write(d / "pred_pool.jsonl", [{"id": f"q{i:02d}", "response": "x",
                                           "label": "correct" if i % 3 == 0 else "wrong"}
                                          for i in range(40)])
    for m in [m for m in C.METHODS if m != "grait"]:     # grait: test_grait_cli below
        out = str(d / m / "train.jsonl")
        r = run("--method", m, "--items", items, "--state", state, "--flow", flow, "--out", out,
                *(["--known", known] if m == "oracle" else []))
        assert r.returncode == 0, r.stderr
        ex = files.read_jsonl(out, check=files.check_example)
        summ = json.load(open(out + ".summary.json"))
        assert summ["van"]["n"] + summ["idk"]["n"] == len(ex) and summ["requested"] == {"van": 16, "idk": 4}
        assert all(e["method"] == m for e in ex)
        assert set(summ["pressure"]) == {"van", "idk"}
        # same seed, same file
        r2 = run("--method", m, "--items", items, "--state", state, "--flow", flow, "--out", out + "2",
                 *(["--known", known] if m == "oracle" else []))
        assert r2.returncode == 0, r2.stderr
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
    for variant in ("inferred", "uniform"):
        out = str(d / f"grait_{variant}" / "train.jsonl")
        r = run("--method", "grait", "--items", items, "--state", state, "--flow", flow, "--out", out,
                "--model", tiny_chat_llama, "--warmup", str(d / "warmup"), "--n-van", "8",
                "--n-idk", "3", "--grait-weights", variant)
        assert r.returncode == 0, r.stderr
        outs[variant] = files.read_jsonl(out, check=files.check_example)
        summ = json.load(open(out + ".summary.json"))
        assert summ["grait"]["feature_path"] == "exact" and summ["grait"]["adam"]
        assert (summ["grait"]["weight_sign"], summ["grait"]["weight_scale"]) == (
            (-1, 0.5) if variant == "inferred" else (None, None))
    ex = outs["inferred"]
    idk = [e for e in ex if e["kind"] == "idk"]
    van = [e for e in ex if e["kind"] == "van"]
    assert len(idk) == 3 and len(van) == 8
    assert all(e["target"] == "I don't know" for e in idk) and all(e["weight"] == 1.0 for e in van)
    assert abs(sum(e["weight"] for e in idk) / 3 - 0.5) < 1e-9          # inferred: mean 0.5
    states = {json.loads(l)["id"]: json.loads(l)["mu"] for l in open(state)}
    assert all(states[e["id"]] <= 0.49 for e in idk)                     # IdK from idk_all only
    top = sorted((m, i) for i, m in states.items() if m >= 0.51)[::-1]
    assert sorted(states[e["id"]] for e in van) == sorted(m for m, _ in top[:8])   # top mu
    assert {e["id"] for e in outs["uniform"] if e["kind"] == "idk"} == {e["id"] for e in idk}
    assert all(e["weight"] == 1.0 for e in outs["uniform"])


# ----------------------------------------------------------------------------------------------
# GRAIT's selection (SPEC 5.4) and weights (SPEC 5.5) on hand-made Gram matrices
def test_grait_delta_equals_dense_means():
    torch.manual_seed(3)
    z_sel, z_ik, z_idk = torch.randn(5, 8), torch.randn(9, 8), torch.randn(7, 8)
    want = (z_sel @ z_ik.T).double().mean(1) - (z_sel @ z_idk.T).double().mean(1)
    got = C.grait_delta(z_sel, z_ik, z_idk)
    assert torch.allclose(got, want, atol=1e-6), (
        f"mean_k <z_i, z_ik> - mean_k <z_i, z_idk>: expected {want.tolist()}, got {got}")


# ----------------------------------------------------------------------------------------------
# GRAIT selection (SPEC 5.4) and weights (SPEC 5.5)
def objective(S, Kiv, Kii):
    """F(S) = sum_{j in S} sum_{k in V} K_iv[j,k] + sum_{j<m in S} K_ii[j,m]."""
    return (sum(float(Kiv[j].sum()) for j in S)
            + sum(float(Kii[S[a], S[b]]) for a in range(len(S)) for b in range(a + 1, len(S))))


def brute_force_greedy(Kiv, Kii, k):
    S = []
    for _ in range(k):
        rest = [j for j in range(Kii.shape[0]) if j not in S]
        gains = [objective(S + [j], Kiv, Kii) for j in rest]
        S.append(rest[max(range(len(rest)), key=lambda i: (gains[i], -i))])
    return S


def test_greedy_select_equals_brute_force_greedy():
    for seed in range(5):
        greedy_case(seed)


def greedy_case(seed):
    g = torch.Generator().manual_seed(seed)
    n, nv, k = 12, 5, 6
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Kii, Kiv = (A + A.T) / 2, torch.randn(n, nv, generator=g, dtype=torch.float64)
    picked, s = C.greedy_select(Kiv.sum(1), lambda j: Kii[:, j], k)
    want = brute_force_greedy(Kiv, Kii, k)
    assert picked == want, ("each pick must maximise F(S) given the earlier picks (SPEC 5.4): "
                            f"brute force picks {want}, greedy_select picked {picked}")
    want = Kiv.sum(1) + Kii[:, picked].sum(1)
    assert torch.allclose(s, want), f"final scores s0 + the picked columns: expected {want}, got {s}"
    assert len(set(picked)) == k, f"{k} distinct picks expected, got {picked}"


def test_greedy_ties_go_to_the_lowest_index():
    picked, _ = C.greedy_select(torch.zeros(5), lambda j: torch.zeros(5), 3)
    assert picked == [0, 1, 2], f"all tied: expected the lowest indices [0, 1, 2], got {picked}"


# Four candidates with 2-d IDK-view features and one van item k1 with van feature (1, 0):
# s0 = <z_j, (1, 0)> = (1, 0, 0, 0.6); K_ii = Z Z^T.
Z4 = torch.tensor([[1, 0], [0, 1], [0, -1], [0.6, 0.8]], dtype=torch.float64)


def test_released_select_hand_case_and_definition():
    """SPEC 5.4 quirk (b): exactly k greedy picks, then the min(k, n - k) lowest-scoring
    remaining candidates, ascending, ties by index."""
    score0 = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    zero = lambda j: torch.zeros(5)                             # noqa: E731
    # greedy takes 4 then 0; the rest {1, 2, 3} have scores 1, 2, 1 -> lowest two, ties by index
    assert C.released_select(score0, zero, 2) == [1, 3]
    # k = 3 of n = 4 (min(k, n - k) = 1): greedy picks 0 (s = 1), then s += K_ii[:, 0] =
    # (1, 0, 0, 0.6) -> (2, 0, 0, 1.2): 3; s += K_ii[:, 3] = (0.6, 0.8, -0.8, 1) ->
    # (2.6, 0.8, -0.8, 2.2): 1. Candidate 2 is all that remains. (Only min(k, n - k) = 1 greedy
    # pick, the old call, would leave {1, 2, 3} with scores (0, 0, 1.2) and return [1].)
    got = C.released_select(Z4 @ torch.tensor([1.0, 0.0], dtype=torch.float64),
                            lambda j: Z4 @ Z4[j], 3)
    assert got == [2], f"3 greedy picks (0, 3, 1) leave candidate 2 alone, got {got}"
    g = torch.Generator().manual_seed(9)
    A = torch.randn(10, 10, generator=g, dtype=torch.float64)
    Kii, s0 = A + A.T, torch.randn(10, generator=g, dtype=torch.float64)
    for k in (3, 6):                                              # 7 and 4 remain
        picked, s = C.greedy_select(s0, lambda j: Kii[:, j], k)
        rest = sorted((j for j in range(10) if j not in picked), key=lambda j: (float(s[j]), j))
        assert C.released_select(s0, lambda j: Kii[:, j], k) == rest[:k]


def test_released_select_keeps_the_lowest_remaining():
    """released_select alone (course.py): greedy_select is a stand-in that picks in the fixed
    order 4, 0, 2, 3, 1, 5 and returns final scores s, so only what released_select does with
    the greedy result is under test (SPEC 5.4 quirk (b))."""
    s = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 0.5], dtype=torch.float64)
    asked = []

    def greedy(score0, col_fn, k):
        asked.append(k)
        return [4, 0, 2, 3, 1, 5][:k], s.clone()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(C, "greedy_select", greedy)
        got2 = C.released_select(s, lambda j: torch.zeros(6), 2)
        got4 = C.released_select(s, lambda j: torch.zeros(6), 4)
    assert asked == [2, 4], f"exactly k greedy picks (k = 2, then 4), got greedy_select(k={asked})"
    # k = 2: greedy took 4, 0; remaining 1, 2, 3, 5 score 1, 2, 1, 0.5 -> the 2 lowest: 5, 1
    assert got2 == [5, 1], f"k = 2: expected [5, 1] (lowest remaining, ties by index), got {got2}"
    # k = 4: greedy took 4, 0, 2, 3; remaining 1, 5 score 1, 0.5 -> min(4, 6 - 4) = 2 items
    assert got4 == [5, 1], f"k = 4: expected [5, 1] (min(k, n - k) = 2 items), got {got4}"


def test_grait_weights_each_variant_equals_its_formula():
    """w = scale * N * softmax(sign * delta / T) (SPEC 5.5, 9 #8), by hand with N = 4:
    delta / T = ln 2 * (0, 0, 1, 2), so exp(+delta/T) = (1, 1, 2, 4) (sum 8) and
    exp(-delta/T) = (1, 1, 1/2, 1/4) (sum 11/4)."""
    T = 0.05
    delta = T * math.log(2) * torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    assert C.WEIGHT_VARIANTS == {"inferred": (-1, 0.5), "code": (1, 0.5), "uniform": None}
    want = {
        # inferred: softmax(-delta/T) = (4, 4, 2, 1) / 11, times 0.5 * N = 2: sum 2 = N/2
        "inferred": [8 / 11, 8 / 11, 4 / 11, 2 / 11],
        # code: softmax(+delta/T) = (1, 1, 2, 4) / 8, times 0.5 * N = 2: sum 2 = N/2
        "code": [1 / 4, 1 / 4, 1 / 2, 1],
        # inferred with --grait-weight-scale 1 (the former `paper`): N softmax(-delta/T), mean 1
        ("inferred", None, 1.0): [16 / 11, 16 / 11, 8 / 11, 4 / 11],
        # inferred with --grait-weight-sign 1: the released formula
        ("inferred", 1, None): [1 / 4, 1 / 4, 1 / 2, 1],
        # code with sign -1 and scale 0.25: 0.25 * 4 * (4, 4, 2, 1) / 11
        ("code", -1, 0.25): [4 / 11, 4 / 11, 2 / 11, 1 / 11],
    }
    for case, w in want.items():
        variant, sign, scale = (case, None, None) if isinstance(case, str) else case
        got = C.grait_weights(delta, T, *C.weight_params(variant, sign, scale))
        assert torch.allclose(got, torch.tensor(w, dtype=torch.float64)), (
            f"{case}: want scale * N * softmax(sign * delta / T) = {w}, got {got.tolist()}")
    assert torch.allclose(C.grait_weights(delta, T), torch.tensor(want["inferred"],
                                                                  dtype=torch.float64))
    d = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.05
    for variant in ("inferred", "code"):                          # sum N/2 = 500, as released
        w = C.grait_weights(d, C.GRAIT_T, *C.WEIGHT_VARIANTS[variant])
        assert math.isclose(float(w.sum()), 500.0, rel_tol=1e-12), f"{variant}: sum {w.sum()}"
    w = C.grait_weights(d)
    assert w[d.argmax()] == w.min()                           # inferred: larger delta, less weight


def test_weight_params_overrides_and_errors():
    assert C.weight_params("inferred") == (-1, 0.5) and C.weight_params("code") == (1, 0.5)
    assert C.weight_params("code", sign=-1) == (-1, 0.5)
    assert C.weight_params("inferred", scale=2.0) == (-1, 2.0)
    assert C.weight_params("uniform") is None
    for args, msg in ((("paper",), "renamed"), (("other",), "unknown GRAIT weight variant"),
                      (("uniform", 1), "do not apply"), (("uniform", None, 1.0), "do not apply"),
                      (("inferred", 0), "sign must be"), (("inferred", None, 0.0), "finite and > 0"),
                      (("inferred", None, -1.0), "finite and > 0"),
                      (("code", None, math.nan), "finite and > 0"),
                      (("code", None, math.inf), "finite and > 0")):
        with pytest.raises(ValueError, match=msg):
            C.weight_params(*args)


GRAIT_ARGS = ["--method", "grait", "--items", "i.jsonl", "--state", "s.jsonl", "--out", "o.jsonl",
              "--model", "m", "--warmup", "w"]


@pytest.mark.parametrize("flags, msg", [
    (["--grait-weights", "paper"], "renamed"),
    (["--grait-weights", "uniform", "--grait-weight-sign", "1"], "do not apply"),
    (["--grait-weight-scale", "0"], "--grait-weight-scale must be finite and > 0"),
    (["--grait-weight-scale", "nan"], "--grait-weight-scale must be finite and > 0"),
    (["--grait-weight-scale", "inf"], "--grait-weight-scale must be finite and > 0"),
    (["--grait-weight-sign", "2"], "invalid choice"),
    (["--grait-temperature", "nan"], "--grait-temperature must be finite and > 0")])
def test_grait_weight_flag_errors(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(GRAIT_ARGS + flags)
    assert e.value.code == 2 and msg in capsys.readouterr().err.strip().splitlines()[-1]


# The hand pool of test_grait_hand_case: 2-d unit features, by hand (SPEC 5.2-5.5)
HAND_STATES = [S("k1", 0.9, 0), S("k2", 0.8, 0), S("u1", 0.1, 0), S("u2", 0.2, 0), S("u3", 0.3, 0)]
HAND_Z = {"idk": {"k1": (1, 0), "k2": (1, 0), "u1": (1, 0), "u2": (0, 1), "u3": (0.6, 0.8)},
          "van": {"k1": (1, 0), "k2": (0, 1)}}


def hand_features(rows, view):
    return torch.tensor([HAND_Z[view][r["id"]] for r in rows], dtype=torch.float64)


def hand_grait(states, n_van, n_idk, features=hand_features, weights="inferred", **kw):
    """GRAIT as run_grait runs it, with hand features: step 1 (grait_split), step 2a
    (by_correctness), the three feature matrices, then grait() (steps 2b-3).
    Returns (van, idk, weights)."""
    ik_all, idk_all = C.grait_split(states, "mcqa")
    van = C.by_correctness(ik_all, n_van)
    z = {"idk": features(idk_all, "idk"), "van": features(van, "van") if van else None,
         "ik": features(ik_all, "idk") if ik_all else None}
    return (van, *C.grait(idk_all, van, z, n_idk, params=C.weight_params(weights), **kw))


def fake_features(monkeypatch, seen=None):
    """run_grait with HAND_Z in place of the model's gradients: no model, each view's rows
    encoded as (id, view), example_features looks them up (and records its keywords)."""
    from kernels import persample
    tok = type("Tok", (), {"pad_token_id": 0})()
    monkeypatch.setattr(C, "load_warmup", lambda *a, **k: (None, tok, None, "sketch"))
    monkeypatch.setattr(C, "encode_view", lambda rows, view, tok, items, reader, fmt: (
        (seen if seen is not None else {}).update(fmt=fmt), [(r["id"], view) for r in rows])[1])
    monkeypatch.setattr(persample, "example_features", lambda model, enc, pad, **k: (
        torch.tensor([HAND_Z[view][i] for i, view in enc], dtype=torch.float64), "exact"))


# delta = mean over ik_all (k1, k2) - mean over idk_all (u1, u2, u3) of <z_i, z_k> (SPEC 5.5)
HAND_D1, HAND_D3 = 1.0 - (1 + 0 + 0.6) / 3, 0.6 - (0.6 + 0.8 + 1.0) / 3      # u1, u3


def test_grait_hand_case():
    """GRAIT end to end on 2-d unit features, by hand (SPEC 5.2-5.5)."""
    van, idk, w = hand_grait(HAND_STATES, 1, 2, T=1.0)
    assert ids(van) == ["k1"], f"D_ik_sel: the known item with the highest mu (k1), got {ids(van)}"
    # s = <z_j, z_van(k1)> = (1, 0, 0.6): u1 first; then s += K_ii[:, u1] = (., 0, 0.6): u3 (1.2)
    assert ids(idk) == ["u1", "u3"], f"greedy IdK picks: u1 then u3, got {ids(idk)}"
    e1, e3 = math.exp(-HAND_D1), math.exp(-HAND_D3)
    want = {"u1": 0.5 * 2 * e1 / (e1 + e3), "u3": 0.5 * 2 * e3 / (e1 + e3)}
    assert w == pytest.approx(want), f"weights {w}, want N/2 * softmax(-delta / T) = {want}"
    assert hand_grait(HAND_STATES, 1, 2, weights="uniform")[2] == {
        "u1": 1.0, "u3": 1.0}


def test_grait_composes_its_steps():
    """GRAIT's steps in order (SPEC 5.2-5.5), graded apart from them (course.py): greedy_select,
    released_select, grait_delta and grait_weights are stand-ins that record their calls and
    return hand answers, so only grait() is under test. Features: HAND_Z."""
    calls = {}

    def greedy(score0, col_fn, k):
        calls["greedy_select"] = (score0.tolist(), col_fn(0).tolist(), k)
        return [2, 0], None

    def released(score0, col_fn, k):
        calls["released_select"] = (score0.tolist(), k)
        return [1]

    def delta(z_sel, z_ik, z_idk):
        calls["grait_delta"] = (z_sel.tolist(), z_ik.tolist(), z_idk.tolist())
        return torch.tensor([0.1, 0.2], dtype=torch.float64)[:z_sel.shape[0]]

    def weights(d, T=C.GRAIT_T, sign=-1, scale=0.5):
        calls["grait_weights"] = (d.tolist(), T, sign, scale)
        return torch.tensor([0.7, 0.3], dtype=torch.float64)[:len(d)]
    with pytest.MonkeyPatch.context() as m:
        for name, f in (("greedy_select", greedy), ("released_select", released),
                        ("grait_delta", delta), ("grait_weights", weights)):
            m.setattr(C, name, f)
        van, idk, w = hand_grait(HAND_STATES, 1, 2, T=1.0)
        assert (ids(van), ids(idk), w) == (["k1"], ["u3", "u1"], {"u3": 0.7, "u1": 0.3}), (
            "expected van ['k1'] (top mu), idk ['u3', 'u1'] (greedy picks 2, 0), weights "
            f"{{'u3': 0.7, 'u1': 0.3}} (from grait_weights); got {ids(van)}, {ids(idk)}, {w}")
        # s_j = <z_j, z_van(k1)> over the candidates u1, u2, u3; K_ii[:, 0] = <z_j, z_u1>
        want = ([1.0, 0.0, 0.6], [1.0, 0.0, 0.6], 2)
        got = calls.pop("greedy_select")
        assert got == want, f"greedy_select(score0, K_ii[:, 0], k): expected {want}, got {got}"
        want = ([[0.6, 0.8], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]],
                [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        got = calls.pop("grait_delta")
        assert got == want, ("grait_delta(IDK-view z of the picks, of all known, of all "
                             f"candidates): expected {want}, got {got}")
        got = calls.pop("grait_weights")
        assert got == ([0.1, 0.2], 1.0, -1, 0.5), (
            "grait_weights(delta, T, sign, scale) with `inferred` = (-1, 0.5): expected "
            f"([0.1, 0.2], 1.0, -1, 0.5), got {got}")
        assert not calls, f"`greedy` must not call released_select: {calls}"
        van, idk, w = hand_grait(HAND_STATES, 1, 2, select="released", weights="code")
        assert (ids(idk), w) == (["u2"], {"u2": 0.7}), (
            f"select=released: released_select's pick u2 expected, got {ids(idk)}, {w}")
        assert calls["grait_weights"][2:] == (1, 0.5), (
            f"weights=code: sign +1, scale 0.5 expected, got {calls['grait_weights'][2:]}")
        calls.clear()
        w = hand_grait(HAND_STATES, 1, 2, weights="uniform")[2]
        assert w == {"u3": 1.0, "u1": 1.0} and "grait_delta" not in calls, (
            f"weights=uniform: every weight 1, no delta; got {w}, calls {sorted(calls)}")


def test_grait_released_hand_case():
    """--grait-select released through grait(): k = 3 greedy picks of the 4 candidates of Z4
    (u1, u4, u2), then the one remaining, u3 (see test_released_select_hand_case_and_definition).
    The old call made min(k, n - k) = 1 greedy pick and returned u2. One item: weight 0.5."""
    st = [S("k1", 0.9, 0)] + [S(f"u{i + 1}", 0.1, 0) for i in range(4)]
    z = {"idk": {"k1": Z4[0], **{f"u{i + 1}": Z4[i] for i in range(4)}}, "van": {"k1": Z4[0]}}

    def features(rows, view):
        return torch.stack([z[view][r["id"]] for r in rows])
    van, idk, w = hand_grait(st, 1, 3, features, select="released")
    assert ids(van) == ["k1"] and ids(idk) == ["u3"], (
        f"released: 3 greedy picks (u1, u4, u2), then the remaining u3; got {ids(idk)}")
    assert w == pytest.approx({"u3": 0.5}), f"inferred, N = 1: 0.5 * 1 * softmax = 0.5, got {w}"


@pytest.mark.parametrize("flags, sign, scale", [
    ([], -1, 0.5),
    (["--grait-weights", "code"], 1, 0.5),
    (["--grait-weights", "inferred", "--grait-weight-sign", "1", "--grait-weight-scale", "1"], 1, 1.0),
    (["--grait-weights", "code", "--grait-weight-scale", "0.25"], 1, 0.25),
    (["--grait-weights", "uniform"], None, None),
    (["--grait-select", "released"], -1, 0.5)])
def test_grait_weight_flags_reach_grait(flags, sign, scale, monkeypatch):
    """The command line's --grait-select/--grait-weights/--grait-weight-sign/-scale reach grait()
    (run_grait with the hand features in place of the model's gradients) and the summary."""
    fake_features(monkeypatch)
    a = C.parse_args(GRAIT_ARGS + ["--grait-temperature", "1"] + flags)
    van, idk, w, extra = C.run_grait(a, {}, HAND_STATES, "mcqa", 1, 2)
    if "released" in flags:              # 2 greedy picks (u1, u3) leave u2 alone
        assert w == pytest.approx({"u2": 0.5}), w
    elif sign is None:
        assert w == {"u1": 1.0, "u3": 1.0}
    else:
        e1, e3 = math.exp(sign * HAND_D1), math.exp(sign * HAND_D3)
        want = {"u1": scale * 2 * e1 / (e1 + e3), "u3": scale * 2 * e3 / (e1 + e3)}
        assert w == pytest.approx(want), f"{flags}: weights {w}, want {want}"
    assert (extra["grait"]["weight_sign"], extra["grait"]["weight_scale"]) == (sign, scale)


def test_grait_views_follow_the_warmups_training_format(tmp_path, monkeypatch):
    """SPEC 5.3 step 2 (our decision): the feature views are rendered in the format the warm-up
    was trained in, read from finetune.py's <warmup>.config.json (chat without one; an adapter
    from before --format existed was chat); --warmup-format must agree with the record. The
    resolved format reaches the views' encoding (encode_view) and the construct config."""
    warm = tmp_path / "adapter"
    assert C.warmup_format(str(warm)) == "chat" and C.warmup_format(str(warm), "tulu") == "tulu"
    cfg = tmp_path / "adapter.config.json"
    cfg.write_text(json.dumps({"args": {"lr": 2e-4}}))                    # before --format
    assert C.warmup_format(str(warm) + "/") == "chat"
    cfg.write_text(json.dumps({"args": {"format": "tulu"}}))
    assert C.warmup_format(str(warm)) == "tulu" == C.warmup_format(str(warm), "tulu")
    with pytest.raises(InputError, match=r"^--warmup-format chat: the warm-up .* was "
                       r"trained with --format tulu"):
        C.warmup_format(str(warm), "chat")
    seen = {}
    fake_features(monkeypatch, seen)
    a = C.parse_args(GRAIT_ARGS[:-1] + [str(warm)])
    C.run_grait(a, {}, HAND_STATES, "mcqa", 1, 2)
    assert seen["fmt"] == "tulu" and a.warmup_format == "tulu"


def test_crss_hand_case():
    """CRSS (SPEC 7): the share of IdK items whose max cosine to any van item exceeds tau."""
    van = [[1.0, 0.0], [0.0, 1.0]]
    # cosines with the nearest van item: 1.0 (same direction, other length), 0.9806 (angle
    # atan(0.2) = 11.3 deg from [1, 0]), 0.7071 (45 deg from both)
    idk = [[3.0, 0.0], [1.0, 0.2], [1.0, 1.0]]
    assert C.crss(idk, van, tau=0.97) == pytest.approx(2 / 3)
    assert C.crss(idk, van, tau=0.99) == pytest.approx(1 / 3)
    assert C.crss(idk, van, tau=0.5) == pytest.approx(1.0)
    assert C.crss([], van) is None and C.crss(idk, []) is None


def test_candidates_are_each_methods_pools():
    st = [dict(S("a", 0.9, 0.1), flow=0.0), dict(S("b", 0.1, 0.2), flow=0.3),
          dict(S("c", 0.2, 0.3), flow=-0.1), dict(S("d", 0.5, 0.3), flow=0.0)]
    assert [len(x) for x in C.candidates("cor", st, "mcqa")] == [2, 2]      # mu 0.5 is van
    assert [len(x) for x in C.candidates("craft", st, "mcqa")] == [2, 1]    # b rose: dropped
    assert [len(x) for x in C.candidates("grait", st, "mcqa")] == [1, 2]    # mu = 0.5 excluded
    assert [len(x) for x in C.candidates("van", st, "mcqa")] == [4, 0]


def test_certainty_ties_within_float_noise_go_by_id():
    """Sigmas that differ only in float32's last bits (another CPU's sums) are ties, by id, so a
    CRaFT set is the same on every machine (issue 26)."""
    rows = [S("b", 0, 1.0 - 1e-7), S("a", 0, 1.0), S("c", 0, 0.9)]
    assert ids(C.by_certainty(rows, 2, most_certain=True)) == ["a", "b"]
    rows = [S("b", 0, 1.0), S("a", 0, 1.0 - 1e-7), S("c", 0, 0.9)]
    assert ids(C.by_certainty(rows, 2, most_certain=True)) == ["a", "b"]
    assert ids(C.by_certainty(rows, 1, most_certain=False)) == ["c"]

"""rehearse.py: the rehearsal filter, the fill-up rule, knowledge flow and its summary (SPEC 3)."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import rehearse as R  # noqa: E402
from kernels.base import InputError


def mc(i, answer="B", exposure=None):
    it = {"id": i, "task": "mcqa", "question": "q", "answer": answer, "choices": list("wxyz")}
    if exposure is not None:
        it["meta"] = {"exposure": exposure}
    return it


def oe(i):
    return {"id": i, "task": "oeqa", "question": "q", "answer": "a", "aliases": ["a"]}


def test_mcqa_filter_uses_raw_gold_probability():
    # renormalised mu is 1.0 in both, but only the first has raw p(gold) > 0.99 (SPEC 3)
    assert R.qualifies({"mu": 1.0, "sigma": 0, "probs": [0, 0.995, 0, 0]}, mc("a"))
    assert not R.qualifies({"mu": 1.0, "sigma": 0, "probs": [0, 0.5, 0, 0]}, mc("b"))
    # the option reader keeps summed log-likelihoods: raw p = exp(loglik of the gold option)
    assert R.qualifies({"mu": 1, "sigma": 0, "probs": [0, 1, 0, 0],
                        "logliks": [-9, -0.001, -9, -9]}, mc("c"))
    assert not R.qualifies({"mu": 1, "sigma": 0, "probs": [0, 1, 0, 0],
                            "logliks": [-9, -0.2, -9, -9]}, mc("d"))


def test_oeqa_filter_needs_all_samples_correct_and_certain():
    assert R.qualifies({"mu": 1.0, "sigma": 0.999}, oe("a"))
    assert not R.qualifies({"mu": 0.9, "sigma": 1.0}, oe("b"))
    assert not R.qualifies({"mu": 1.0, "sigma": 0.99}, oe("c"))


def pool_of_six():
    """6 OEQA items of which q0 and q1 pass the SPEC 3 filter, and their states."""
    states = {"q0": {"mu": 1.0, "sigma": 1.0}, "q1": {"mu": 1.0, "sigma": 1.0},
              "q2": {"mu": 0.9, "sigma": 0.5}, "q3": {"mu": 0.9, "sigma": 0.8},
              "q4": {"mu": 0.1, "sigma": 0.9}, "q5": {"mu": 1.0, "sigma": 0.2}}
    return [oe(i) for i in states], states


def test_selection_draws_from_qualified_and_fills_up_when_short():
    items, states = pool_of_six()
    chosen, n_ok = R.select_rehearsal(items, states, 2, seed=0)
    assert n_ok == 2 and sorted(chosen) == ["q0", "q1"]
    chosen, _ = R.select_rehearsal(items, states, 5, seed=0)
    # the 2 qualified ones, then the best of the rest by mu, then sigma: q5, q3, q2
    assert sorted(chosen[:2]) == ["q0", "q1"] and chosen[2:] == ["q5", "q3", "q2"]
    assert R.select_rehearsal(items, states, 2, seed=0) == R.select_rehearsal(items, states, 2, seed=0)


def test_rehearsal_makeup_counts_passed_items_and_fill_ups():
    """Issue 27: the qualified items come first in the chosen list, the fill-ups after them."""
    items, states = pool_of_six()
    chosen, n_ok = R.select_rehearsal(items, states, 5, seed=0)        # fill-ups q5, q3, q2
    m = R.rehearsal_makeup(chosen, n_ok, states, 5)
    assert (m["qualified"], m["used"], m["passed_filter"], m["fill_ups"]) == (2, 5, 2, 3)
    assert m["passed_mu"] == {"mean": 1.0, "min": 1.0, "max": 1.0}
    assert m["fill_up_mu"]["min"] == 0.9 and m["fill_up_mu"]["mean"] == pytest.approx(2.8 / 3)
    m = R.rehearsal_makeup(*R.select_rehearsal(items, states, 2, seed=0), states, 2)
    assert (m["passed_filter"], m["fill_ups"], m["fill_up_mu"]) == (2, 0, None)


def test_knowledge_flow_formula():
    """CRaFT's knowledge flow dmu = mu(M~) - mu(M0) (SPEC 3; SPEC 0: not `Cor(M~) - Cer(M0)`),
    on hand-computed cases: a rise first, then falls, no change and the extremes."""
    cases = [(0.2, 0.7, 0.5),       # rose: rehearsal made M~ answer it correctly more often
             (0.9, 0.3, -0.6),      # fell
             (0.4, 0.4, 0.0),       # unchanged
             (0.0, 1.0, 1.0), (1.0, 0.25, -0.75)]
    for mu0, mu1, want in cases:
        call = f"knowledge_flow(mu0={mu0}, mu1={mu1})"
        try:
            got = R.knowledge_flow(mu0, mu1)
        except NotImplementedError:
            raise AssertionError(f"{call} is not implemented yet: it should return mu1 - mu0") \
                from None
        assert got is not None, f"{call} returned None: it should return a number, mu1 - mu0"
        hint = ""
        if got == pytest.approx(abs(want)) and want < 0:
            hint = ": a fall must come out negative (mu1 - mu0, not its absolute value)"
        elif got == pytest.approx(-want):
            hint = ": the sign is flipped (the flow is mu1 - mu0, positive when mu rose)"
        assert got == pytest.approx(want, abs=1e-12), f"{call} = {got}, expected {want}{hint}"


def test_flow_summary_counts_low_items_that_rose_by_exposure():
    items = {"a": mc("a", exposure=0), "b": mc("b", exposure=0), "c": mc("c", exposure=5),
             "d": mc("d", exposure=5)}
    flows = [{"id": "a", "mu0": 0.1, "mu1": 0.3, "flow": 0.2},
             {"id": "b", "mu0": 0.2, "mu1": 0.1, "flow": -0.1},
             {"id": "c", "mu0": 0.4, "mu1": 0.9, "flow": 0.5},
             {"id": "d", "mu0": 0.9, "mu1": 0.95, "flow": 0.05}]     # not low: not counted
    s = R.flow_summary(flows, items)
    assert s["all"]["n_low"] == 3 and abs(s["all"]["rose"] - 2 / 3) < 1e-12
    assert s["by_exposure"]["0"]["rose"] == 0.5 and s["by_exposure"]["4-7"]["rose"] == 1.0


def test_modal_target_is_the_most_frequent_correct_sample():
    st = {"samples": ["Paris", "paris!", "Paris", "Lyon"], "labels": ["correct", "correct",
                                                                      "correct", "wrong"]}
    assert R.modal_correct(st, oe("x")) == "Paris"
    assert R.modal_correct({"samples": ["Lyon"], "labels": ["wrong"]}, oe("x")) == "a"


def test_reprobe_repeats_the_initial_probe_arguments(tmp_path):
    state = tmp_path / "probe_init.jsonl"
    cfg = {"args": {"model": "M0", "items": "pool", "task": "oeqa", "out": str(state),
                    "adapter": None, "mcqa_reader": "option", "strict_refusal": False,
                    "top_k": 0, "n_shots": 0, "temperature": 0.5, "shots": "",
                    "round_certainty": None, "trust_remote_code": True}}
    (tmp_path / "probe_init.jsonl.config.json").write_text(json.dumps(cfg))
    argv = R.probe_argv(str(state), "M0", "pool", "reh/adapter", "reh/probe.jsonl")
    # 0 and "" are values, passed on (a dropped --n-shots 0 made the world's re-probe
    # 3-shot); None (the default) and False (a switch left off) are left out
    assert argv == ["--model", "M0", "--items", "pool", "--task", "oeqa", "--out",
                    "reh/probe.jsonl", "--adapter", "reh/adapter", "--mcqa-reader", "option",
                    "--top-k", "0", "--n-shots", "0", "--temperature", "0.5", "--shots", "",
                    "--trust-remote-code"]
    # and they parse back to the very same query
    import probe
    back = vars(probe.parse_args(argv[:-1]))
    for k in ("n_shots", "top_k", "shots", "mcqa_reader", "strict_refusal", "round_certainty"):
        assert back[k] == cfg["args"][k], k


def test_check_same_query_names_every_difference(tmp_path):
    import pytest
    base = {"model": "M0", "items": "pool", "out": "a", "adapter": None, "n_shots": 0, "seed": 0}
    (tmp_path / "a.config.json").write_text(json.dumps({"args": base}))
    (tmp_path / "b.config.json").write_text(json.dumps(
        {"args": dict(base, out="b", adapter="reh/adapter", model="M0b")}))
    R.check_same_query(str(tmp_path / "a"), str(tmp_path / "b"))      # only the place differs
    (tmp_path / "b.config.json").write_text(json.dumps({"args": dict(base, n_shots=3)}))
    with pytest.raises(InputError, match="n_shots 0 -> 3"):
        R.check_same_query(str(tmp_path / "a"), str(tmp_path / "b"))

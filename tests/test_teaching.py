"""The teachers' table (course.FORMULAS, printed in the README): every paper formula is a small
pure function whose named tests fail for a blanked body and for the plausible wrong versions a
student might write.

Each row names `file.py::qualname` and its grading tests; this file reads the rows, swaps each
function for each of its mutants below (a blank body first), runs the named tests in-process and
requires every mutant to make at least one of them fail."""
import importlib
import inspect
import math

import pytest
import torch

from conftest import ROOT

import construct as C
import course
import evaluate
import probe
import rehearse
from kernels import lora
from kernels import persample as ps
from kernels import ths as kt


def blank(*args, **kwargs):
    """A blanked body: the function returns nothing."""
    return None


# --- wrong versions, one per plausible mistake ------------------------------------------------
def ths_sign_flip(pc, pw, pc0, pw0):
    return pc + pw * pc0 / pw0


def ths_inverted_ratio(pc, pw, pc0, pw0):
    return pc - pw * pw0 / pc0


def ths_no_ratio(pc, pw, pc0, pw0):
    return pc - pw


def quadrants_recall_over_all(known, labels):
    """Refusal recall as the share of all items refused, not of the unknown ones."""
    q = REAL["kernels/ths.py::quadrants"](known, labels)
    labels = list(labels)
    return {**q, "refusal_recall": 100.0 * labels.count("refuse") / len(labels)}


def quadrants_precision_recall_swapped(known, labels):
    q = REAL["kernels/ths.py::quadrants"](known, labels)
    return {**q, "refusal_precision": q["refusal_recall"], "refusal_recall": q["refusal_precision"]}


def quadrants_known_refused(known, labels):
    """Recall of refusals among the known items (that is over-refusal)."""
    q = REAL["kernels/ths.py::quadrants"](known, labels)
    return {**q, "refusal_recall": q["over_refusal"]}


def ap_ties_in_input_order(scores, correct):
    """Ties broken by position (a stable sort) instead of entering together."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total, ap = 0, sum(bool(c) for c in correct), 0.0
    for rank, i in enumerate(order, 1):
        if correct[i]:
            hits += 1
            ap += hits / rank / total
    return ap if total else None


def ap_interpolated(scores, correct):
    """Interpolated AP: at each threshold the best precision at that recall or beyond."""
    import numpy as np
    s, y = np.asarray(scores, float), np.asarray(correct, bool)
    pts = []
    for t in np.unique(s)[::-1]:
        r = s >= t
        pts.append(((r & y).sum() / y.sum(), (r & y).sum() / r.sum()))
    ap, before = 0.0, 0.0
    for k, (rec, _) in enumerate(pts):
        ap += (rec - before) * max(p for _, p in pts[k:])
        before = rec
    return ap


def ap_precision_at_every_rank(scores, correct):
    """Mean precision over every threshold, not weighted by the recall gained there."""
    import numpy as np
    s, y = np.asarray(scores, float), np.asarray(correct, bool)
    ts = np.unique(s)[::-1]
    return float(np.mean([(y & (s >= t)).sum() / (s >= t).sum() for t in ts]))


def auroc_ties_lost(scores, correct):
    import numpy as np
    s, y = np.asarray(scores, float), np.asarray(correct, bool)
    return float(np.mean([[p > n for n in s[~y]] for p in s[y]]))


def auroc_ties_won(scores, correct):
    import numpy as np
    s, y = np.asarray(scores, float), np.asarray(correct, bool)
    return float(np.mean([[p >= n for n in s[~y]] for p in s[y]]))


def auroc_flipped(scores, correct):
    import numpy as np
    s, y = np.asarray(scores, float), np.asarray(correct, bool)
    return float(np.mean([[(p < n) + 0.5 * (p == n) for n in s[~y]] for p in s[y]]))


def quadrants_swapped_bases(known, labels):
    """Over-refusal over the unknown items and hallucination over the known ones."""
    return REAL["kernels/ths.py::quadrants"]([not k for k in known], labels)


def quadrants_precision_inverted(known, labels):
    q = REAL["kernels/ths.py::quadrants"](known, labels)
    return {**q, "refusal_precision": 100.0 - q["refusal_precision"]}


def lora_no_scaling(self, x):
    return self.base_layer(x) + self.lora_B(self.lora_A(x))


def lora_base_only(self, x):
    return self.base_layer(x)


def lora_scaling_r_over_alpha(self, x):
    return self.base_layer(x) + self.lora_B(self.lora_A(x)) * (self.r / self.alpha)


def per_sample_grad_transposed(x, gout, token_mask=None):
    return torch.bmm(x.transpose(1, 2), gout)


def per_sample_grad_batch_summed(x, gout, token_mask=None):
    """The ordinary weight gradient, the same for every example."""
    g = torch.einsum("bto,bti->oi", gout, x)
    return g.expand(x.shape[0], *g.shape)


def per_sample_grad_mask_ignored(x, gout, token_mask=None):
    return torch.bmm(gout.transpose(1, 2), x)


def mcqa_no_renormalisation(probs, gold_index, certainty="neg-entropy"):
    q = [x / sum(probs) for x in probs]
    return probs[gold_index], sum(x * math.log(x) for x in q if x > 0)


def mcqa_entropy_not_negated(probs, gold_index, certainty="neg-entropy"):
    q = [x / sum(probs) for x in probs] if certainty == "neg-entropy" else list(probs)
    return probs[gold_index] / sum(probs), -sum(x * math.log(x) for x in q if x > 0)


def mcqa_entropy_of_raw_probs(probs, gold_index, certainty="neg-entropy"):
    return probs[gold_index] / sum(probs), sum(x * math.log(x) for x in probs if x > 0)


def oeqa_mu_refusal_counts(labels):
    return sum(lab != "wrong" for lab in labels) / len(labels)


def oeqa_mu_count_not_share(labels):
    return sum(lab == "correct" for lab in labels)


def certainty_diagonal_included(embeddings):
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)
    return float((e @ e.T).mean())


def certainty_not_normalised(embeddings):
    e = torch.as_tensor(embeddings, dtype=torch.float64)
    n, sim = e.shape[0], e @ e.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def flow_abs(mu0, mu1):
    return abs(mu1 - mu0)


def flow_sign_flip(mu0, mu1):
    return mu0 - mu1


def split_half_to_idk(states, task, tau=C.TAU):
    return [s for s in states if s["mu"] > tau], [s for s in states if s["mu"] <= tau]


def split_oeqa_keeps_half(states, task, tau=C.TAU):
    return [s for s in states if s["mu"] >= tau], [s for s in states if s["mu"] < tau]


def filter_sign_flip(idk, rule="le0"):
    return [s for s in idk if (s["flow"] >= 0 if rule == "le0" else s["flow"] > 0)]


def filter_always_strict(idk, rule="le0"):
    return [s for s in idk if s["flow"] < 0]


def filter_nothing(idk, rule="le0"):
    return list(idk)


def certainty_reversed(rows, n, most_certain):
    return sorted(rows, key=lambda s: (s["sigma"], s["id"]))[:n]


def certainty_no_tie_break(rows, n, most_certain):
    return sorted(rows, key=lambda s: -s["sigma"] if most_certain else s["sigma"])[:n]


def craft_without_flow(states, task, n_van, n_idk, rng, flow_rule="le0", with_replacement=False):
    return C.corcer_rait(states, task, n_van, n_idk, rng, with_replacement)


def craft_swapped_certainty(states, task, n_van, n_idk, rng, flow_rule="le0",
                            with_replacement=False):
    van, idk = C.correctness_split(states, task)
    idk = C.flow_filter(idk, flow_rule)
    return C.by_certainty(van, n_van, False), C.by_certainty(idk, n_idk, True)


def greedy_no_exclusion(score0, col_fn, k):
    s, picked = score0.double().clone(), []
    for _ in range(k):
        j = int(torch.argmax(s))
        picked.append(j)
        s += col_fn(j).double()
    return picked, s


def greedy_no_update(score0, col_fn, k):
    s = score0.double().clone()
    return torch.argsort(-s, stable=True)[:k].tolist(), s


def gram_means(X, Y):
    return (X.double() @ Y.double().T).mean(1)


def delta_sign_flip(z_sel, z_ik, z_idk):
    return gram_means(z_sel, z_idk) - gram_means(z_sel, z_ik)


def delta_sums_not_means(z_sel, z_ik, z_idk):
    return (z_sel @ z_ik.T).double().sum(1) - (z_sel @ z_idk.T).double().sum(1)


def released_min_picks(score0, col_fn, k):
    """The old call: min(k, n - k) greedy picks instead of k."""
    m = min(k, score0.shape[0] - k)
    picked, s = C.greedy_select(score0, col_fn, m)
    rest = [j for j in range(score0.shape[0]) if j not in picked]
    return sorted(rest, key=lambda j: (float(s[j]), j))[:m]


def released_highest_remaining(score0, col_fn, k):
    picked, s = C.greedy_select(score0, col_fn, k)
    rest = [j for j in range(score0.shape[0]) if j not in picked]
    return sorted(rest, key=lambda j: (-float(s[j]), j))[:k]


def released_keeps_greedy_set(score0, col_fn, k):
    return C.greedy_select(score0, col_fn, k)[0]


def weights_sign_flip(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    d = torch.as_tensor(delta, dtype=torch.float64)
    return scale * d.shape[0] * torch.softmax(-sign * d / T, dim=0)


def weights_sign_ignored(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    d = torch.as_tensor(delta, dtype=torch.float64)
    return scale * d.shape[0] * torch.softmax(-d / T, dim=0)


def weights_not_renormalised(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    d = torch.as_tensor(delta, dtype=torch.float64)
    return scale * d.shape[0] * torch.exp(sign * d / T)


def weights_no_scale(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    return torch.softmax(sign * torch.as_tensor(delta, dtype=torch.float64) / T, dim=0)


def weights_mean_one(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    """The former `paper` scale: N softmax, mean 1, whatever the scale."""
    d = torch.as_tensor(delta, dtype=torch.float64)
    return d.shape[0] * torch.softmax(sign * d / T, dim=0)


def weights_scale_fixed_half(delta, T=C.GRAIT_T, sign=-1, scale=0.5):
    """N/2 written in: right for inferred and code, wrong for --grait-weight-scale."""
    d = torch.as_tensor(delta, dtype=torch.float64)
    return d.shape[0] / 2 * torch.softmax(sign * d / T, dim=0)


def grait_released_selection(states, task, n_van, n_idk, features, select="greedy",
                             weights="inferred", T=C.GRAIT_T, sign=None, scale=None):
    return REAL["construct.py::grait"](states, task, n_van, n_idk, features, "released", weights,
                                       T, sign, scale)


def grait_uniform_weights(states, task, n_van, n_idk, features, select="greedy",
                          weights="inferred", T=C.GRAIT_T, sign=None, scale=None):
    return REAL["construct.py::grait"](states, task, n_van, n_idk, features, select, "uniform", T)


def grait_code_weights(states, task, n_van, n_idk, features, select="greedy",
                       weights="inferred", T=C.GRAIT_T, sign=None, scale=None):
    return REAL["construct.py::grait"](states, task, n_van, n_idk, features, select, "code", T)


MODULES = {"kernels/ths.py": kt, "probe.py": probe, "rehearse.py": rehearse, "construct.py": C,
           "kernels/lora.py": lora, "kernels/persample.py": ps, "evaluate.py": evaluate}


def owner(target):
    """(object holding the function, attribute name) for 'file.py::qualname'."""
    file, qualname = target.split("::")
    obj = MODULES[file]
    *outer, name = qualname.split(".")
    for part in outer:
        obj = getattr(obj, part)
    return obj, name


def paired_diff_unpaired(table, macro, n=10, seed=0):
    """Each model resampled on its own: the point is right, the resamples are not paired."""
    import numpy as np
    from kernels import ths as kt
    point, _ = REAL["kernels/ths.py::paired_diff"](table, macro, n, seed)
    t = np.asarray(table)
    a = kt.bootstrap_ci(t.sum(-1), macro, n, seed)
    return point, np.full(n, a["ths"][0] - a["ths"][1])


def paired_diff_reversed(table, macro, n=10, seed=0):
    point, draws = REAL["kernels/ths.py::paired_diff"](table, macro, n, seed)
    return -point, -draws


def paired_diff_pc_not_ths(table, macro, n=10, seed=0):
    """The difference of the correct rates, not of THS."""
    import numpy as np
    from kernels import ths as kt
    t = np.asarray(table)
    d = kt.summarize(t.sum(-1), macro)["pc"] - kt.summarize(t.sum(-2), macro)["pc"]
    return float(d), np.zeros(n)


def crss_no_normalisation(idk, van, tau=0.97):
    import torch
    a, b = torch.as_tensor(idk, dtype=torch.float64), torch.as_tensor(van, dtype=torch.float64)
    if len(a) == 0 or len(b) == 0:
        return None
    return float(((a @ b.T).max(-1).values > tau).double().mean())


def crss_mean_not_max(idk, van, tau=0.97):
    import torch
    if len(idk) == 0 or len(van) == 0:
        return None
    a = torch.nn.functional.normalize(torch.as_tensor(idk, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(van, dtype=torch.float64), dim=-1)
    return float(((a @ b.T).mean(-1) > tau).double().mean())


def crss_at_least(idk, van, tau=0.97):
    """>= instead of >, and the share of van items instead of IdK items."""
    import torch
    if len(idk) == 0 or len(van) == 0:
        return None
    a = torch.nn.functional.normalize(torch.as_tensor(idk, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(van, dtype=torch.float64), dim=-1)
    return float(((a @ b.T).max(0).values >= tau).double().mean())


def flow_agreement_all_items(flow_a, flow_b, tau=0.5):
    """Every item, not only the IdK candidates."""
    return REAL["evaluate.py::flow_agreement"](flow_a, flow_b, tau=2.0)


def flow_agreement_zeros_dropped(flow_a, flow_b, tau=0.5):
    out = REAL["evaluate.py::flow_agreement"](flow_a, flow_b, tau)
    return {**out, "agree": out["moved_agree"]}


REAL = {r["function"]: getattr(*owner(r["function"])) for r in course.FORMULAS}
MUTANTS = {
    "kernels/ths.py::ths": [ths_sign_flip, ths_inverted_ratio, ths_no_ratio],
    "kernels/ths.py::quadrants": [quadrants_recall_over_all, quadrants_precision_recall_swapped,
                                  quadrants_known_refused, quadrants_swapped_bases,
                                  quadrants_precision_inverted],
    "kernels/ths.py::average_precision": [ap_ties_in_input_order, ap_interpolated,
                                          ap_precision_at_every_rank],
    "kernels/ths.py::auroc": [auroc_ties_lost, auroc_ties_won, auroc_flipped],
    "kernels/ths.py::paired_diff": [paired_diff_unpaired, paired_diff_reversed,
                                    paired_diff_pc_not_ths],
    "construct.py::crss": [crss_no_normalisation, crss_mean_not_max, crss_at_least],
    "evaluate.py::flow_agreement": [flow_agreement_all_items, flow_agreement_zeros_dropped],
    "kernels/lora.py::LoRALinear.forward": [lora_no_scaling, lora_base_only,
                                            lora_scaling_r_over_alpha],
    "kernels/persample.py::per_sample_linear_grad": [per_sample_grad_transposed,
                                                     per_sample_grad_batch_summed,
                                                     per_sample_grad_mask_ignored],
    "probe.py::mcqa_state": [mcqa_no_renormalisation, mcqa_entropy_not_negated,
                             mcqa_entropy_of_raw_probs],
    "probe.py::oeqa_mu": [oeqa_mu_refusal_counts, oeqa_mu_count_not_share],
    "probe.py::embedding_certainty": [certainty_diagonal_included, certainty_not_normalised],
    "rehearse.py::knowledge_flow": [flow_abs, flow_sign_flip],
    "construct.py::correctness_split": [split_half_to_idk, split_oeqa_keeps_half],
    "construct.py::flow_filter": [filter_sign_flip, filter_always_strict, filter_nothing],
    "construct.py::by_certainty": [certainty_reversed, certainty_no_tie_break],
    "construct.py::craft": [craft_without_flow, craft_swapped_certainty],
    "construct.py::greedy_select": [greedy_no_exclusion, greedy_no_update],
    "construct.py::grait_delta": [delta_sign_flip, delta_sums_not_means],
    "construct.py::released_select": [released_min_picks, released_highest_remaining,
                                      released_keeps_greedy_set],
    "construct.py::grait_weights": [weights_sign_flip, weights_sign_ignored,
                                    weights_not_renormalised, weights_no_scale, weights_mean_one,
                                    weights_scale_fixed_half],
    "construct.py::grait": [grait_released_selection, grait_uniform_weights, grait_code_weights],
}


def teachers_table():
    """[(formula, 'file.py::qualname', ['tests/x.py::test_y', ...])] from course.FORMULAS."""
    return [(r["formula"], r["function"], r["tests"]) for r in course.FORMULAS]


def grading_test(t):
    """The test function named 'tests/x.py::test_y'."""
    path, name = t.split("::")
    return getattr(importlib.import_module(path.split("/")[-1][:-3]), name, None)


def test_table_covers_every_formula():
    rows = teachers_table()
    named = [f for _, f, _ in rows]
    assert sorted(named) == sorted(MUTANTS), (
        f"course.FORMULAS and MUTANTS differ: {sorted(set(named) ^ set(MUTANTS))}")
    for _, f, tests in rows:
        assert callable(REAL[f]), f"{f}: no such function"
        for t in tests:
            fn = grading_test(t)
            assert callable(fn), f"{t}: no such test"
            assert not inspect.signature(fn).parameters, (
                f"{t}: a grading test takes no fixtures (it is run in-process here)")


@pytest.mark.parametrize("row", teachers_table(), ids=lambda r: r[1])
def test_named_tests_fail_for_blank_and_wrong_versions(row, monkeypatch):
    _, target, tests = row
    funcs = [grading_test(t) for t in tests]
    for real_ok in funcs:     # the real function passes its tests
        real_ok()
    for mutant in [blank] + MUTANTS[target]:
        with monkeypatch.context() as m:
            m.setattr(*owner(target), mutant)
            failed = []
            for f in funcs:
                try:
                    f()
                except Exception as e:    # AssertionError, or TypeError from a missing result
                    failed.append(type(e).__name__)
            assert failed, (f"{target} replaced by {mutant.__name__}: "
                            f"{' '.join(tests)} still pass")

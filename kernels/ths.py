"""THS and the statistics around it (SPEC 7): rates, macro rates, THS, paired bootstrap
intervals (of one model, and of the difference between two), knowledge quadrants, and the
ranking metrics AP and AUROC (issue 27). Pure functions on count and score arrays; evaluate.py
answers and labels, then reports with these (rait/plot.py draws the THS figure's SVG)."""
import numpy as np

BOOTSTRAP = 1000            # resamples for the 95% intervals


# Metrics: count arrays [..., 4] in label order correct, wrong, refuse, unparsed (evaluate.LABELS;
# leading axes broadcast)
def rates(counts):
    """Pc, Pw, Pr, unparsed as % of all items: counts [..., 4] -> rates [..., 4]."""
    c = np.asarray(counts, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * c / c.sum(-1, keepdims=True)


def macro_rates(counts_by_subject):
    """Unweighted mean over subjects of each subject's rates (SPEC 7 mmlu_all): [..., S, 4]."""
    return rates(counts_by_subject).mean(-2)


def ths(pc, pw, pc0, pw0):
    """Truthful Helpfulness Score (SPEC 7) in percentage points: Pc - Pw * Pc0 / Pw0.

    = cross(E2, E1) / cross(A, E1) with E = (Pc, Pw), A = (1, 0); NaN when Pw0 = 0."""
    pc, pw, pc0, pw0 = (np.asarray(x, dtype=float) for x in (pc, pw, pc0, pw0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pw0 > 0, pc - pw * pc0 / np.where(pw0 > 0, pw0, 1.0), np.nan)


def summarize(table, macro):
    """Rates and THS from a (S, 4 Init-Basic labels, 4 labels) count table (any leading axes)."""
    mine, init = table.sum(-2), table.sum(-1)        # [..., S, 4] each
    r, r0 = (macro_rates(mine), macro_rates(init)) if macro else (rates(mine.sum(-2)),
                                                                    rates(init.sum(-2)))
    return {"pc": r[..., 0], "pw": r[..., 1], "pr": r[..., 2], "unparsed": r[..., 3],
            "ths": ths(r[..., 0], r[..., 1], r0[..., 0], r0[..., 1])}


def bootstrap_ci(table, macro, n=BOOTSTRAP, seed=0, level=0.95):
    """Percentile intervals of summarize()'s statistics over item resamples (paired, stratified
    by subject): each subject's 16 joint counts are redrawn as a multinomial of its size.
    Resamples where a statistic is undefined (THS with Pw0 = 0) are left out of its interval."""
    table = np.asarray(table, dtype=np.int64)
    S = table.shape[0]
    sizes = table.reshape(S, 16).sum(1)
    p = table.reshape(S, 16) / np.maximum(sizes, 1)[:, None]
    draws = np.random.default_rng(seed).multinomial(sizes, p, size=(n, S)).reshape(n, S, 4, 4)
    a = (1 - level) / 2 * 100
    out = {}
    for k, v in summarize(draws, macro).items():
        v = v[np.isfinite(v)]
        out[k] = [float(np.percentile(v, a)), float(np.percentile(v, 100 - a))] if v.size else None
    return out


def paired_diff(table, macro, n=BOOTSTRAP, seed=0):
    """THS(a) - THS(b) of two models answering the same items, and n paired item resamples of it
    (issue 26): table [S, 4 Init-Basic labels, 4 labels of a, 4 labels of b] counts items per
    subject; each resample redraws each subject's 64 joint counts as a multinomial of its size, so
    Init-Basic, a and b are resampled together. Returns (point, draws [n])."""
    table = np.asarray(table, dtype=np.int64)
    S = table.shape[0]
    sizes = table.reshape(S, 64).sum(1)
    p = table.reshape(S, 64) / np.maximum(sizes, 1)[:, None]
    draws = np.random.default_rng(seed).multinomial(sizes, p, size=(n, S)).reshape(n, S, 4, 4, 4)

    def diff(t):
        return summarize(t.sum(-1), macro)["ths"] - summarize(t.sum(-2), macro)["ths"]
    return float(diff(table)), diff(draws)


def percentile_ci(draws, level=0.95):
    """[lo, hi] percentile interval of the finite draws, None when there are none."""
    v = np.asarray(draws, dtype=float)
    v = v[np.isfinite(v)]
    a = (1 - level) / 2 * 100
    return [float(np.percentile(v, a)), float(np.percentile(v, 100 - a))] if v.size else None


def quadrants(known, labels):
    """Over-refusal, hallucination and refusal precision (%), ours: known[i] says whether item
    i is known (by Init-Basic or an oracle); labels[i] is the evaluated model's label."""
    known, labels = np.asarray(known, bool), np.asarray(labels)
    ref, wrong = labels == "refuse", labels == "wrong"

    def pct(a, b):
        return float(100.0 * (a & b).sum() / b.sum()) if b.sum() else None
    return {"over_refusal": pct(ref, known), "hallucination": pct(wrong, ~known),
            "refusal_precision": pct(~known, ref), "refusal_recall": pct(ref, ~known),
            "n_known": int(known.sum()), "n_unknown": int((~known).sum())}


# Ranking metrics (issue 27): scores[i] is the model's confidence in its answer to item i (higher =
# more confident; evaluate.py ranks a refusal below every answer), correct[i] whether it was right
def average_precision(scores, correct):
    """Average precision of answers ranked by confidence, label = correct (R-Tuning's AP), as a
    fraction: sum over the distinct scores t, from the highest down, of
    (recall(t) - recall(previous t)) * precision(t), where the answers with score >= t count as
    retrieved; tied scores enter together at one threshold (no interpolation, no order among
    ties). None when no answer is correct."""
    s, y = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    ap, recall_before = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        retrieved = s >= t
        tp = int((retrieved & y).sum())
        recall = tp / n_pos
        ap += (recall - recall_before) * tp / int(retrieved.sum())
        recall_before = recall
    return ap


def auroc(scores, correct):
    """Area under the ROC curve of confidence against correctness, as a fraction: the probability
    that a correct answer scores above a not-correct one, ties counting one half
    (Mann-Whitney: sum over (correct i, not-correct j) of [s_i > s_j] + [s_i = s_j] / 2, divided by
    the number of such pairs). None when every answer or none is correct."""
    s, y = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    pos, neg = s[y], np.sort(s[~y])
    if not pos.size or not neg.size:
        return None
    below = np.searchsorted(neg, pos, side="left")          # negatives scored lower than each positive
    tied = np.searchsorted(neg, pos, side="right") - below  # negatives tied with it
    return float((below + 0.5 * tied).sum() / (pos.size * neg.size))

"""THS and the statistics around it (SPEC 7): rates, macro rates, THS, paired bootstrap
intervals (of one model, and of the difference between two), knowledge quadrants, the ranking metrics AP and AUROC (issue 27), and the Pc-Pw plane
of CRaFT's THS figure as SVG. Pure functions on count and score arrays; evaluate.py answers and
labels, then reports with these."""
import numpy as np

BOOTSTRAP = 1000            # resamples for the 95% intervals
LABEL_SLOTS = [(7, -6), (7, 14), (-7, -6), (-7, 14)] + [
    (sgn * 7, d) for d in (-20, 28, -34, 42, -48, 56) for sgn in (1, -1)]   # SVG label offsets


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


def ths_svg(points, refs, title=""):
    """The Pc-Pw plane of CRaFT's THS figure as SVG text: x = Pc, y = Pw (SPEC 7: E = (Pc, Pw)),
    a ray from the origin through each Init-Basic point (THS = 0 on it, > 0 below it), one
    labelled point per method; ID = filled circles, OOD = open squares, one colour each.
    points: [(name, split, pc, pw)]; refs: {split: (pc0, pw0)}."""
    from xml.sax.saxutils import escape
    vals = [v for _, _, pc, pw in points for v in (pc, pw)] + [10.0]
    step = next(s for s in (2, 5, 10, 20, 25) if max(vals) * 1.1 / s <= 6)
    lim = step * int(np.ceil(max(vals) * 1.1 / step))
    X0, Y0, P = 70, 430, 380                      # plot origin (px) and side
    sx = lambda v: X0 + v / lim * P               # noqa: E731
    sy = lambda v: Y0 - v / lim * P               # noqa: E731
    color = {"id": "#1f5fbf", "ood": "#d0471b"}
    o = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="500" '
         'font-family="sans-serif" font-size="12">',
         '<rect width="640" height="500" fill="white"/>',
         f'<text x="{X0 + P / 2}" y="24" text-anchor="middle" font-size="14">'
         f'{escape(title)}</text>']
    for k in range(0, lim + 1, step):
        o += [f'<line x1="{sx(k):.1f}" y1="{Y0}" x2="{sx(k):.1f}" y2="{Y0 - P}" stroke="#e4e4e4"/>',
              f'<line x1="{X0}" y1="{sy(k):.1f}" x2="{X0 + P}" y2="{sy(k):.1f}" stroke="#e4e4e4"/>',
              f'<text x="{sx(k):.1f}" y="{Y0 + 16}" text-anchor="middle">{k}</text>',
              f'<text x="{X0 - 6}" y="{sy(k) + 4:.1f}" text-anchor="end">{k}</text>']
    o += [f'<rect x="{X0}" y="{Y0 - P}" width="{P}" height="{P}" fill="none" stroke="black"/>',
          f'<text x="{X0 + P / 2}" y="{Y0 + 36}" text-anchor="middle">Pc (% correct)</text>',
          f'<text x="18" y="{Y0 - P / 2}" text-anchor="middle" '
          f'transform="rotate(-90 18 {Y0 - P / 2})">Pw (% wrong)</text>']
    for s, (pc0, pw0) in refs.items():
        if pc0 <= 0 and pw0 <= 0:
            continue                              # Init-Basic never answered: no ray
        t = min(lim / pc0 if pc0 > 0 else np.inf, lim / pw0 if pw0 > 0 else np.inf)
        o.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(pc0 * t):.1f}" y2="{sy(pw0 * t):.1f}" '
                 f'stroke="{color[s]}" stroke-dasharray="6 4" class="ray-{s}"/>')
    taken = [(sx(pc) - 5, sy(pw) - 5, sx(pc) + 5, sy(pw) + 5) for _, _, pc, pw in points]
    for name, s, pc, pw in points:
        x, y, c = sx(pc), sy(pw), color[s]
        o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{c}" class="point-{s}"/>'
                 if s == "id" else
                 f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" fill="white" '
                 f'stroke="{c}" stroke-width="2" class="point-{s}"/>')
        w = 6.6 * len(name)                    # greedy label placement: first free slot
        for dx, dy in LABEL_SLOTS:
            bx = x + dx if dx >= 0 else x + dx - w
            box = (bx, y + dy - 10, bx + w, y + dy + 2)
            if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3]
                       for t in taken):
                break
        taken.append(box)
        if abs(dy) > 8:                        # displaced label: a leader line to its point
            o.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{box[0] if dx >= 0 else box[2]:.1f}" '
                     f'y2="{y + dy - 4:.1f}" stroke="{c}" stroke-width="0.6"/>')
        o.append(f'<text x="{box[0]:.1f}" y="{y + dy:.1f}" fill="{c}" stroke="white" '
                 f'stroke-width="3" paint-order="stroke">{escape(name)}</text>')
    lx = X0 + P + 20
    o += [f'<circle cx="{lx}" cy="{Y0 - P + 10}" r="4.5" fill="{color["id"]}"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 14}">ID test</text>',
          f'<rect x="{lx - 4.5}" y="{Y0 - P + 30.5}" width="9" height="9" fill="white" '
          f'stroke="{color["ood"]}" stroke-width="2"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 39}">OOD test</text>',
          f'<line x1="{lx - 6}" y1="{Y0 - P + 60}" x2="{lx + 6}" y2="{Y0 - P + 60}" '
          'stroke="gray" stroke-dasharray="6 4"/>',
          f'<text x="{lx + 10}" y="{Y0 - P + 64}">THS = 0 (Init-Basic)</text>',
          f'<text x="{lx - 6}" y="{Y0 - P + 84}">below a ray: THS &gt; 0</text>', '</svg>']
    return "\n".join(o) + "\n"

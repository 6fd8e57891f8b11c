"""construct.py: the refusal-aware training set of one RAIT method (SPEC 4, 5, 9).

Methods (SPEC 4 table; paper names in brackets):
  van     Van-Tuning: a random draw of the pool with its original answers, no refusals.
  cor     Cor-RAIT [R-Tuning]: van = {mu >= tau}, idk = {mu < tau}, random draws.
  corcer  CorCer-RAIT [CRaFT w/o Flow]: the same pools; van = the most certain, idk = the least.
  wocer   [CRaFT w/o Cer]: the flow filter on idk candidates, then random draws as cor.
  craft   CRaFT (Alg. 1): the flow filter on idk candidates, then certainty ranking as corcer.
  grait   GRAIT (SPEC 5): correctness-ranked van, gradient-greedy idk, adaptive weights.
  oracle  Oracle-RAIT, a diagnostic (issue 26): van = the facts M0 answers correctly, idk = the
          rest, random draws as cor with the same counts. "Correctly" is what evaluate.py labels
          correct for M0's greedy answer under the BASIC prompt (--known: the Init-Basic
          predictions on the pool), the judgement the Init-Basic row uses.

    python construct.py --method craft --items pool.jsonl --state probe_init.jsonl \\
        --flow rehearsal/flow.jsonl --out craft/train.jsonl

Inputs: the pool items, the initial knowledge state (probe.py), the knowledge flow (rehearse.py;
craft, wocer). GRAIT also needs the model and a warm-up adapter with its Adam moments: the
rehearsal adapter (default, SPEC 9 #10) or the LESS warm-up (SPEC 5.3 step 1; pipeline.py's
grait-less row trains it with finetune.py).
Output: training examples (id, prompt, target, weight, kind, method) and `<out>.summary.json`:
counts, the selection pressure (candidates per requested example), mu / sigma / flow of each
kind, and with --known the share of IdK examples M0 answers correctly; with --model the CRSS of
the IdK set against the van set (SPEC 7); on the world the shares of planted twins and latent facts.
"""
import argparse
import math
import os
import random
import sys

from kernels.base import InputError
from rait import files, models, runs

# SPEC 4: correctness thresholds. MCQA [C-C]: van mu >= 0.5, idk mu < 0.5. OEQA [C-C]: van
# mu >= 0.51, idk mu <= 0.49 (mu lives on a 0.1 grid, so mu = 0.5 is dropped).
TAU = 0.5
THRESHOLDS = {"mcqa": (TAU, TAU), "oeqa": (0.51, 0.49)}        # (van if mu >=, idk if mu <[=])
# SPEC 4: the paper's counts (IdK : van = 1 : 4) and the pools they were drawn from
PAPER_COUNTS = {"mcqa": (4000, 1000), "oeqa": (8000, 2000)}     # (N_van, N_idk)
PAPER_POOL = {"mcqa": 14042, "oeqa": 87622}                     # MMLU test, TriviaQA train
SIGMA_DECIMALS = 6       # certainty ties for ranking (issue 26): far below any real difference,
                         # above float32 noise (measured: 1.6e-7 between two CPUs' OEQA sigmas)
TAU_SIM = 0.97           # SPEC 7: CRSS threshold, CRaFT's headline value
TAU_SIM_SWEEP = (0.95, 0.96, 0.97, 0.98, 0.99)                  # SPEC 7: the swept range
SCALED_IDK_SHARE = 0.1   # smaller pools (the world, --limit): N_idk = 10% of the pool, N_van = 4x
PAPER_METHODS = ("van", "cor", "corcer", "wocer", "craft", "grait")   # the papers' rows
METHODS = PAPER_METHODS + ("oracle",)                                # + the world's diagnostic


# ---------------------------------------------------------------------------------------------
# The steps the methods share, one small pure function each (each has its own test; the README's
# "For teachers" table names them)
def correctness_split(states, task, tau=TAU):
    """SPEC 4 Cor-RAIT pools: (van candidates, idk candidates) by correctness mu.
    MCQA: van mu >= tau, idk mu < tau. OEQA: van mu >= 0.51, idk mu <= 0.49 (0.5 is dropped)."""
    if task == "mcqa":
        return [s for s in states if s["mu"] >= tau], [s for s in states if s["mu"] < tau]
    van_min, idk_max = THRESHOLDS["oeqa"]
    return [s for s in states if s["mu"] >= van_min], [s for s in states if s["mu"] <= idk_max]


def flow_filter(idk, rule="le0"):
    """CRaFT's flow rule on idk candidates (SPEC 9 #1): `le0` keeps dmu <= 0 (drop items whose
    correctness rose after rehearsal, Fig. 4 caption); `strict` keeps dmu < 0 (Alg. 1)."""
    if rule == "le0":
        return [s for s in idk if s["flow"] <= 0]
    if rule == "strict":
        return [s for s in idk if s["flow"] < 0]
    raise ValueError(f"unknown flow rule {rule!r}")


def by_certainty(rows, n, most_certain):
    """The n most (or least) certain rows: sigma descending (or ascending), ties by id (SPEC 9 #5).
    Sigmas equal to SIGMA_DECIMALS places are ties: float32 sums differ in the last bits across
    CPUs, and a set must not depend on them."""
    sign = -1 if most_certain else 1
    return sorted(rows, key=lambda s: (sign * round(s["sigma"], SIGMA_DECIMALS), s["id"]))[:n]


def draw(rows, n, rng, with_replacement=False):
    """n random rows: without replacement by default (SPEC 9 #6), or with (released MCQA)."""
    if with_replacement:
        return rng.choices(rows, k=n) if rows else []
    return rng.sample(rows, min(n, len(rows)))


def fill_short(selected, n, rng, with_replacement):
    """A selection shorter than n: with replacement, resample n from it (released CorCer MCQA);
    otherwise keep it as it is (SPEC 9 #6: say so, take all)."""
    if len(selected) < n and with_replacement and selected:
        return rng.choices(selected, k=n)
    return selected


# ---------------------------------------------------------------------------------------------
# The methods (SPEC 4 table). Each returns (van rows, idk rows): van rows keep their answer, idk
# rows get the refusal (make_examples). The baselines are CRaFT with steps left out.
def craft(states, task, n_van, n_idk, rng, flow_rule="le0", with_replacement=False):
    """CRaFT, Algorithm 1 (SPEC 4)."""
    # 1. D_van1 = {mu >= tau}; D_idk1 = {mu < tau and dmu <= 0} (SPEC 9 #1; Alg. 1: dmu < 0)
    van, idk = correctness_split(states, task)
    idk = flow_filter(idk, flow_rule)
    # 2. sort D_van1 by certainty sigma, descending, and take the top N_van
    van = fill_short(by_certainty(van, n_van, most_certain=True), n_van, rng, with_replacement)
    # 3. sort D_idk1 by sigma ascending and take the top N_idk
    idk = fill_short(by_certainty(idk, n_idk, most_certain=False), n_idk, rng, with_replacement)
    # 4-5. van answers kept, idk answers replaced by IdK; the union is the RAIT set (make_examples)
    return van, idk


def corcer_rait(states, task, n_van, n_idk, rng, with_replacement=False):
    """CorCer-RAIT (CRaFT w/o Flow): CRaFT without the flow filter of step 1."""
    van, idk = correctness_split(states, task)
    return (fill_short(by_certainty(van, n_van, most_certain=True), n_van, rng, with_replacement),
            fill_short(by_certainty(idk, n_idk, most_certain=False), n_idk, rng, with_replacement))


def wocer_rait(states, task, n_van, n_idk, rng, flow_rule="le0", with_replacement=False):
    """CRaFT w/o Cer: step 1 with the flow filter, then random draws instead of steps 2-3."""
    van, idk = correctness_split(states, task)
    idk = flow_filter(idk, flow_rule)
    return draw(van, n_van, rng, with_replacement), draw(idk, n_idk, rng, with_replacement)


def cor_rait(states, task, n_van, n_idk, rng, with_replacement=False):
    """Cor-RAIT (R-Tuning): split by correctness only, then random draws."""
    van, idk = correctness_split(states, task)
    return draw(van, n_van, rng, with_replacement), draw(idk, n_idk, rng, with_replacement)


def van_tuning(states, n, rng, with_replacement=False):
    """Van-Tuning: n random items with their original answers, no refusals."""
    return draw(states, n, rng, with_replacement), []


def oracle_split(states):
    """Oracle-RAIT pools (world only): (van, idk) by whether M0 answers the fact correctly."""
    return [s for s in states if s["m0_known"]], [s for s in states if not s["m0_known"]]


def oracle_rait(states, n_van, n_idk, rng, with_replacement=False):
    """Oracle-RAIT, a diagnostic (issue 26): Cor-RAIT with the split by what M0 answers correctly
    (the Init-Basic judgement, --known) instead of mu; the same counts as every method."""
    van, idk = oracle_split(states)
    return draw(van, n_van, rng, with_replacement), draw(idk, n_idk, rng, with_replacement)


def crss(idk_reps, van_reps, tau=TAU_SIM):
    """CRSS (CRaFT §4.2, SPEC 7): the share of IdK items whose question representation has cosine
    similarity above tau with at least one van item's (rows of the two matrices)."""
    import torch
    if len(idk_reps) == 0 or len(van_reps) == 0:
        return None
    a = torch.nn.functional.normalize(torch.as_tensor(idk_reps, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(van_reps, dtype=torch.float64), dim=-1)
    return float(((a @ b.T).max(-1).values > tau).double().mean())


def candidates(method, states, task, flow_rule="le0"):
    """(van, idk) candidate pools a method selects from: what its selection pressure is measured
    on (issue 26: known candidates >= 2x N_van, unknown >= 2x N_idk)."""
    if method == "van":
        return states, []
    if method == "oracle":
        return oracle_split(states)
    if method == "grait":
        return grait_split(states, task)
    van, idk = correctness_split(states, task)
    return van, (flow_filter(idk, flow_rule) if method in ("wocer", "craft") else idk)


# ---------------------------------------------------------------------------------------------
# GRAIT (SPEC 5): split -> van top-N by correctness -> greedy IdK selection by gradient influence
# -> adaptive weights. run_grait computes the gradient features (kernels/persample.py) and passes
# them to grait() as tensors.
GRAIT_T = 0.05          # SPEC 5.5: softmax temperature of the adaptive weights
# SPEC 5.5 / SPEC 9 #8: --grait-weights variants as (sign, scale) of
# w = scale * N * softmax(sign * delta / T); None: every weight 1. Sign and scale are separate
# knobs (--grait-weight-sign, --grait-weight-scale), so the sign is the only inferred change.
WEIGHT_VARIANTS = {
    "inferred": (-1, 0.5),  # SPEC 9 #8 default: the released formula and scale (sum N/2, mean
                            # 0.5) with the sign flipped: IdK items that push known questions
                            # towards refusal get less weight (the paper's aim, SPEC 5.5 (ii))
    "code": (+1, 0.5),      # SPEC 5.5: exactly the released formula, 500 softmax(+delta/T) for N=1000
    "uniform": None,        # SPEC 5.5 (i): the released script resets every weight to 1 before
                            # saving, so this is what the released run trained with
}


def grait_split(states, task, tau=TAU):
    """SPEC 5.2: ik_all = {mu > tau}, idk_all = {mu < tau}; mu = tau exactly is excluded (OEQA
    keeps its own thresholds, which already drop 0.5)."""
    if task == "oeqa":
        return correctness_split(states, task)
    return [s for s in states if s["mu"] > tau], [s for s in states if s["mu"] < tau]


def by_correctness(rows, n):
    """SPEC 5.2: D_ik_sel = the n rows with the highest mu (ties by id)."""
    return sorted(rows, key=lambda s: (-s["mu"], s["id"]))[:n]


def greedy_select(score0, col_fn, k):
    """SPEC 5.4 steps 1-2: greedy IdK selection with incremental scores.

    score0 [N]: s_j = sum_{v in V} K_iv[j, v] for each candidate j. col_fn(j) -> [N]: the column
    K_ii[:, j]. Repeat k times: j* = argmax of s over the remaining candidates (lowest index on
    ties, as Python's argmax in the released code), add j* to S, s += K_ii[:, j*]. This greedily
    maximises F(S) = sum_{j in S} s_j + sum_{j<m in S} K_ii[j, m] (K_ii symmetric).
    Returns (S as a list of indices in pick order, final scores [N] float64)."""
    import torch
    s = score0.double().clone()
    n = s.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} candidates")
    taken = torch.zeros(n, dtype=torch.bool)
    picked = []
    for _ in range(k):
        j = int(torch.argmax(s.masked_fill(taken, -math.inf)))   # first maximum: lowest index
        picked.append(j)
        taken[j] = True
        s += col_fn(j).double().cpu()
    return picked, s


def released_select(score0, col_fn, k):
    """SPEC 5.4 quirk (b), SPEC 9 #7, `--grait-select released`: what the released code keeps.
    1. run the greedy loop of greedy_select for exactly k picks (S);
    2. discard S: the candidates left are C minus S (n - k of them);
    3. return the min(k, n - k) of them with the lowest final score, ascending (stable: the
       lowest index first on ties, as Python's sort).
    So with k > n/2 fewer than k items come back, as in the released code."""
    import torch
    picked, s = greedy_select(score0, col_fn, k)
    rest = torch.ones(s.shape[0], dtype=torch.bool)
    rest[picked] = False
    remaining = torch.nonzero(rest).flatten()
    order = torch.sort(s[remaining], stable=True).indices
    return remaining[order[:k]].tolist()


def grait_delta(z_sel, z_ik, z_idk):
    """SPEC 5.5: delta(i) = mean_{k in ik_all} K_ii[i,k] - mean_{k in idk_all} K_ii[i,k] for each
    selected idk item i, with K_ii the inner products of IDK-view features (z_idk includes i).
    z_ik None (no known items): the first mean is 0. [N_sel] float64."""
    from kernels.persample import gram_row_means
    ik = 0.0 if z_ik is None else gram_row_means(z_sel, z_ik)
    return ik - gram_row_means(z_sel, z_idk)


def grait_weights(delta, T=GRAIT_T, sign=-1, scale=0.5):
    """SPEC 5.5 / SPEC 9 #8: the weights of the N selected IdK items,
    w = scale * N * softmax(sign * delta / T), so they sum to scale * N (mean `scale`).
    sign -1, scale 0.5: `inferred` (default); sign +1, scale 0.5: `code` (WEIGHT_VARIANTS).
    Returns [N] float64."""
    import torch
    d = torch.as_tensor(delta, dtype=torch.float64)
    return scale * d.shape[0] * torch.softmax(sign * d / T, dim=0)   # softmax subtracts the max


def weight_params(variant, sign=None, scale=None):
    """SPEC 9 #8: (sign, scale) of a --grait-weights variant after the --grait-weight-sign and
    --grait-weight-scale overrides (None: the variant's own); None for `uniform`.
    A ValueError says in one line what is wrong."""
    if variant not in WEIGHT_VARIANTS:
        old = (" ('paper' was renamed: it is now inferred with --grait-weight-scale 1; the "
               "default inferred has mean weight 0.5)" if variant == "paper" else "")
        raise ValueError(f"unknown GRAIT weight variant {variant!r} (expected one of "
                         f"{', '.join(WEIGHT_VARIANTS)}){old}")
    if WEIGHT_VARIANTS[variant] is None:
        if sign is not None or scale is not None:
            raise ValueError(f"--grait-weight-sign/--grait-weight-scale do not apply to "
                             f"--grait-weights {variant} (every weight is 1)")
        return None
    sign = WEIGHT_VARIANTS[variant][0] if sign is None else sign
    scale = WEIGHT_VARIANTS[variant][1] if scale is None else scale
    if sign not in (-1, 1):
        raise ValueError(f"--grait-weight-sign must be -1 or 1, got {sign}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--grait-weight-scale must be finite and > 0, got {scale}")
    return sign, scale


def grait(idk_all, van, z, n_idk, select="greedy", T=GRAIT_T, params=WEIGHT_VARIANTS["inferred"]):
    """GRAIT steps 2b-3 (SPEC 5.4-5.5, SPEC 9 #7-#8) after step 1 (grait_split: idk_all) and
    step 2a (by_correctness: van), on the three feature matrices run_grait computes (SPEC 5.3):
    z["idk"]: idk_all in the IDK view [len(idk_all), d]; z["van"]: van in the van view (None
    without van rows); z["ik"]: ik_all in the IDK view (None without known items; unused when
    params is None). params: (sign, scale) of the weights (weight_params), None for uniform.
    Returns (idk rows, {idk id: weight})."""
    import torch
    from kernels.persample import gram_column, gram_row_sums
    z_c = z["idk"]                                              # candidates C, IDK view
    # GRAIT step 2b (SPEC 5.4): greedy IdK selection by gradient influence
    score0 = (gram_row_sums(z_c, z["van"]) if van               # s_j = sum_v K_iv[j, v]
              else torch.zeros(len(idk_all), dtype=torch.float64))
    k = min(n_idk, len(idk_all))
    col = lambda j: gram_column(z_c, z_c[j])                    # noqa: E731  K_ii[:, j]
    picked = (greedy_select(score0, col, k)[0] if select == "greedy" else    # SPEC 9 #7
              released_select(score0, col, k))
    idk = [idk_all[j] for j in picked]
    # GRAIT step 3 (SPEC 5.5): adaptive weights from the influence on known vs unknown items
    if params is None:                                          # uniform: no delta needed
        w = [1.0] * len(idk)
    else:
        w = grait_weights(grait_delta(z_c[picked], z["ik"], z_c), T, *params).tolist()
    return idk, {s["id"]: float(x) for s, x in zip(idk, w)}


def load_warmup(model_name, warmup, adam=True, projection="auto", trust_remote_code=False):
    """M0 with the warm-up adapter (rehearse.py's, or the LESS warm-up: SPEC 9 #10), its Adam
    moments (None with --no-adam) and the projection that runs where it is (auto: Rademacher on
    a GPU, CountSketch on CPU). Returns (model, tok, moments, projection)."""
    from kernels import lora
    model, tok = models.load_model(model_name, adapter=warmup, trust_remote_code=trust_remote_code)
    moments = lora.load_adam_moments(warmup) if adam else None
    if projection == "auto":                         # what is affordable where it runs
        projection = "rademacher" if model.device.type == "cuda" else "sketch"
    return model, tok, moments, projection


def encode_view(rows, view, tok, items_by_id, reader, fmt):
    """SPEC 5.3 step 2: the rows as (ids, labels) with the REFUSE prompt rendered in `fmt` (the
    warm-up's training format, warmup_format), target IdK (view "idk") or the Cor-RAIT target
    (view "van")."""
    enc = []
    for s in rows:
        it = items_by_id[s["id"]]
        target = models.IDK[it["task"]] if view == "idk" else models.target_of(it, reader)
        enc.append(models.encode_sft(tok, models.user_prompt(it, "refuse"), target, fmt)[:2])
    return enc


def warmup_format(warmup, given=None):
    """The format the GRAIT views are rendered in: the one the warm-up adapter was trained in.

    SPEC 5.3 step 2 names the prompt of the two views (REFUSE) but not their rendering; LESS
    takes its gradients through the same encoding it trains its warm-up with (tulu, SPEC 5.3
    step 1), and a gradient at an adapter is only informative on inputs shaped like the ones
    it was fitted to, so we render the views as the warm-up was trained: the chat rendering for
    rehearse.py's adapter (SPEC 9 #10 default), tulu for the LESS warm-up. finetune.py records
    its --format in <warmup>.config.json; an adapter trained before that flag existed was chat.
    `given` (--warmup-format) is for adapters without that record; it must agree with one."""
    cfg = f"{warmup.rstrip('/')}.config.json"
    if not os.path.isfile(cfg):
        return given or "chat"
    made = files.read_json(cfg, "finetune config").get("args", {}).get("format", "chat")
    if given is not None and given != made:
        raise InputError(f"--warmup-format {given}: the warm-up {warmup} was trained with "
                         f"--format {made} ({cfg})")
    return made


def make_examples(items_by_id, van, idk, method, reader, weights=None):
    """Training examples (DESIGN contract) with the REFUSE prompt (SPEC 9 #13); repeated draws
    get ids `<id>#2`, `<id>#3`, ... so every example id stays unique."""
    out, seen = [], {}
    for kind, rows in (("van", van), ("idk", idk)):
        for s in rows:
            it = items_by_id[s["id"]]
            seen[s["id"]] = seen.get(s["id"], 0) + 1
            eid = s["id"] if seen[s["id"]] == 1 else f"{s['id']}#{seen[s['id']]}"
            out.append({"id": eid, "prompt": models.user_prompt(it, "refuse"),
                        "target": models.target_of(it, reader) if kind == "van" else models.IDK[it["task"]],
                        "weight": 1.0 if weights is None or kind == "van" else weights[s["id"]],
                        "kind": kind, "method": method})
    return out


def default_counts(task, pool_size):
    """SPEC 4 paper counts for paper-sized pools, else the 1:4 ratio scaled to the pool."""
    if pool_size >= PAPER_POOL[task]:
        return PAPER_COUNTS[task]
    n_idk = max(1, round(SCALED_IDK_SHARE * pool_size))
    return 4 * n_idk, n_idk


# ---------------------------------------------------------------------------------------------
# Plumbing: reading, joining, summarising
def join_states(items, states_path, flow_path, need_flow):
    """Pool items joined with their knowledge state (and flow); ids must match exactly."""
    ids = [it["id"] for it in items]
    states = {s["id"]: s for s in files.read_jsonl(states_path, check=files.check_state)}
    _same_ids(states_path, ids, states)
    rows = [{"id": i, "mu": states[i]["mu"], "sigma": states[i]["sigma"]} for i in ids]
    if need_flow:
        if not flow_path:
            raise InputError("this method needs --flow (rehearse.py's flow.jsonl)")
        flow = {f["id"]: f for f in files.read_jsonl(flow_path, check=files.check_flow)}
        _same_ids(flow_path, ids, flow)
        for r in rows:
            r["flow"] = flow[r["id"]]["flow"]
    return rows


def _same_ids(path, ids, table):
    missing = [i for i in ids if i not in table]
    extra = set(table) - set(ids)
    if missing or extra:
        eg = (missing or sorted(extra))[0]
        raise InputError(f"{path}: ids do not match the pool ({len(missing)} pool items "
                         f"missing, {len(extra)} unknown ids; e.g. {eg!r})")


def stats(rows, key):
    v = [r[key] for r in rows if key in r]
    if not v:
        return None
    return {"mean": round(sum(v) / len(v), 4), "min": round(min(v), 4), "max": round(max(v), 4)}


def summarize(method, van, idk, items_by_id, requested, pools, extra=None):
    """Counts per kind, the selection pressure (candidates per requested example: at most 1 means
    the method took every candidate, nothing was selected), mu / sigma / flow of the selected
    sets, the share of IdK examples M0 answers correctly (with --known: CRaFT's static conflicts
    as the evaluator judges them), and on the world the planted twins and latent facts (seen
    runs.STORED_EXPOSURE+ times per epoch) among them.
    requested: (N_van, N_idk); pools: (van candidates, idk candidates)."""
    n_van, n_idk = requested
    s = {"method": method, "requested": {"van": n_van, "idk": n_idk},
         "candidates": {"van": len(pools[0]), "idk": len(pools[1])},
         "pressure": {k: round(len(pool) / n, 2) if n else None
                      for k, pool, n in (("van", pools[0], n_van), ("idk", pools[1], n_idk))}}
    for kind, rows in (("van", van), ("idk", idk)):
        s[kind] = {"n": len(rows), "unique": len({r["id"] for r in rows}),
                   "mu": stats(rows, "mu"), "sigma": stats(rows, "sigma"), "flow": stats(rows, "flow")}
        if rows and all("m0_known" in r for r in rows):
            s[kind]["m0_known_share"] = round(sum(r["m0_known"] for r in rows) / len(rows), 4)
        meta = [items_by_id[r["id"]].get("meta") or {} for r in rows]
        if rows and all("latent" in m for m in meta):               # the world's planted facts
            s[kind]["unseen_twin_share"] = round(sum(m.get("twin") == "unseen" for m in meta)
                                                 / len(meta), 4)
            # the planted dynamic conflicts: latent facts M0 has seen often enough to store them
            # (a never-seen fact drawn latent is just unknown)
            s[kind]["latent_share"] = round(sum(runs.planted_group(m) == runs.LATENT_GROUP
                                                for m in meta) / len(meta), 4)
    s.update(extra or {})
    return s


def crss_summary(model_name, items_by_id, van, idk, trust_remote_code=False):
    """CRSS of the IdK set against the van set at TAU_SIM and over the sweep (SPEC 7): M0's
    last-layer states averaged over each question's tokens (the bare question, BASIC1
    rendering), the same representation for both tasks. Not the last token's state alone: that
    one predicts the answer, so near-identical questions with different answers get distant
    states there (measured on world 0: median cosine 0.42 between twins, 0.94 mean-pooled)."""
    if not van or not idk:
        return {"crss": None}
    import torch
    from kernels.lm import mean_last_hidden
    model, tok = models.load_model(model_name, trust_remote_code=trust_remote_code)

    def reps(rows):
        seqs = [models.encode(tok, models.render(tok, items_by_id[r["id"]]["question"]))
                for r in rows]
        return torch.cat([mean_last_hidden(model, seqs[i:i + 64], tok.pad_token_id)
                          for i in range(0, len(seqs), 64)])
    zi, zv = reps(idk), reps(van)
    return {"crss": crss(zi, zv), "crss_sweep": {str(t): crss(zi, zv, t) for t in TAU_SIM_SWEEP}}


def print_summary(s, file=sys.stderr):
    print(f"\n{s['method']}: requested van {s['requested']['van']}, idk {s['requested']['idk']}",
          file=file)
    print(f"{'kind':5} {'n':>6} {'unique':>7} {'mu':>7} {'sigma':>8} {'flow':>7} {'M0 knows':>9}",
          file=file)
    for kind in ("van", "idk"):
        k = s[kind]
        f = lambda st: f"{st['mean']:.3f}" if st else "-"  # noqa: E731
        share = k.get("m0_known_share")
        print(f"{kind:5} {k['n']:>6} {k['unique']:>7} {f(k['mu']):>7} {f(k['sigma']):>8} "
              f"{f(k['flow']):>7} {'-' if share is None else f'{share:.0%}':>9}", file=file)
    p = s["pressure"]
    print(f"selection pressure (candidates / requested): van {p['van']}, idk {p['idk']}"
          + ("" if s["method"] == "van" else "" if (p["van"] or 2) > 1 and (p["idk"] or 2) > 1 else
             "  (no choice: every candidate taken)"), file=file)
    if s.get("crss") is not None:
        print(f"CRSS (IdK vs van, tau_sim {TAU_SIM}): {s['crss']:.3f}", file=file)


def run_grait(a, items_by_id, rows, task, n_van, n_idk):
    """GRAIT from the command line: split, the van set, the three gradient feature matrices at
    the warm-up adapter (SPEC 5.3), then greedy IdK selection and weights (grait); the summary's
    statistics, with the overlap with CRaFT's IdK set. Returns (van, idk, weights, extra)."""
    from kernels import persample
    params = weight_params(a.grait_weights, a.grait_weight_sign, a.grait_weight_scale)
    sign, scale = params or (None, None)                     # None: uniform, every weight 1
    # GRAIT step 1 (SPEC 5.2): split by correctness
    ik_all, idk_all = grait_split(rows, task)
    if not idk_all:
        raise InputError(f"{a.state}: GRAIT needs unknown items (mu < {TAU}); found none")
    if not ik_all:   # a model that knows nothing (e.g. a random dry-run model): say it loudly
        print(f"[construct] WARNING: no known items (mu > {TAU}): no van set, and the IdK "
              "selection and weights use idk-idk influences only", file=sys.stderr)
    # GRAIT step 2a (SPEC 5.2): D_ik_sel = the N_van known items with the highest correctness
    van = by_correctness(ik_all, n_van)
    # plumbing: the views' rendering (SPEC 5.3 step 2), M0 + the warm-up adapter and its moments
    a.warmup_format = warmup_format(a.warmup, a.warmup_format)    # recorded in <out>.config.json
    print(f"[construct] GRAIT features at the warm-up {a.warmup}, views rendered in the "
          f"{a.warmup_format} format it was trained in (SPEC 5.3 step 2)", file=sys.stderr)
    model, tok, moments, projection = load_warmup(a.model, a.warmup, adam=not a.no_adam,
                                                  projection=a.projection,
                                                  trust_remote_code=a.trust_remote_code)
    # GRAIT features (SPEC 5.3 steps 2-5): per-sample LoRA gradients, Adam-preconditioned,
    # projected, normalised; candidates and known items in the IDK view, van rows in the van view
    z, path = {}, None
    for name, view, some in (("idk", "idk", idk_all), ("van", "van", van),
                             ("ik", "idk", ik_all if params else [])):
        z[name] = None
        if some:
            z[name], path = persample.example_features(
                model, encode_view(some, view, tok, items_by_id, a.mcqa_reader, a.warmup_format),
                tok.pad_token_id, moments=moments, grad_dim=a.grad_dim, seed=a.seed,
                batch_size=a.grad_batch_size, projection=projection,
                desc=f"{view.upper()} view, {len(some)} items")
    # GRAIT steps 2b-3 (SPEC 5.4-5.5): greedy IdK selection, adaptive weights
    idk, weights = grait(idk_all, van, z, n_idk, select=a.grait_select, T=a.grait_temperature,
                         params=params)
    extra = {"grait": {"feature_path": path, "projection": projection, "grad_dim": a.grad_dim,
                       "adam": not a.no_adam, "select": a.grait_select,
                       "weights": a.grait_weights, "weight_sign": sign, "weight_scale": scale,
                       "ik_all": len(ik_all), "idk_all": len(idk_all),
                       "weight_stats": stats([{"w": x} for x in weights.values()], "w")}}
    if all("flow" in r for r in rows):                      # overlap with CRaFT's IdK set
        craft_idk = {s["id"] for s in craft(rows, task, n_van, n_idk, random.Random(0))[1]}
        extra["grait"]["overlap_with_craft_idk"] = len(craft_idk & set(weights)) / max(1, len(idk))
    return van, idk, weights, extra


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" +
                                __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--items", required=True, help="pool items (JSONL, DESIGN Item contract)")
    p.add_argument("--state", required=True, help="initial knowledge state (probe.py output)")
    p.add_argument("--flow", help="knowledge flow (rehearse.py flow.jsonl); craft and wocer")
    p.add_argument("--out", required=True, help="output training examples (JSONL)")
    p.add_argument("--mcqa-reader", choices=("letter", "option"), default="letter",
                   help="van target for MCQA: the gold letter (real models) or the gold option "
                        "text (the world, SPEC 10)")
    p.add_argument("--n-van", type=int, help="vanilla examples (default: SPEC 4 counts, or 4x "
                   "n-idk scaled to a small pool)")
    p.add_argument("--n-idk", type=int, help=f"IdK examples (default: SPEC 4 counts, or "
                   f"{SCALED_IDK_SHARE * 100:.0f}%% of a small pool)")
    p.add_argument("--known", help="evaluate.py's Init-Basic predictions on the pool (M0, BASIC "
                   "prompt, greedy): what M0 answers correctly. Needed by --method oracle; "
                   "gives every summary the share of IdK examples M0 knows (issue 26)")
    p.add_argument("--crss", action="store_true",
                   help="compute CRSS (SPEC 7) of the IdK set against the van set with M0 "
                        "(--model); GRAIT computes it whenever --model is given")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--flow-rule", choices=("le0", "strict"), default="le0",
                   help="CRaFT flow rule (SPEC 9 #1): le0 keeps dmu <= 0; strict keeps dmu < 0 "
                        "(Alg. 1 / released OEQA code)")
    p.add_argument("--with-replacement", action="store_true",
                   help="sample with replacement (released MCQA code, SPEC 9 #6)")
    add_grait_args(p.add_argument_group("GRAIT (SPEC 5, SPEC 9 #7-#10)"))
    a = p.parse_args(argv)
    need = flag_problem(a)
    if need:                                          # one line, as runs.cli prints InputError
        raise InputError(need)
    for flag, v in (("--grad-dim", a.grad_dim), ("--grad-batch-size", a.grad_batch_size),
                    ("--grait-temperature", a.grait_temperature)):
        if not (math.isfinite(v) and v > 0):
            p.error(f"{flag} must be finite and > 0, got {v}")
    try:   # SPEC 9 #8: checked here, resolved where GRAIT runs (run_grait)
        weight_params(a.grait_weights, a.grait_weight_sign, a.grait_weight_scale)
    except ValueError as e:
        p.error(str(e))
    return a


def flag_problem(a):
    """What the flags lack or get wrong together (one line), or None: checked once, before
    anything is read."""
    if a.method not in METHODS:
        return f"unknown method {a.method!r} (expected one of {', '.join(METHODS)})"
    if a.method == "oracle" and not a.known:
        return ("--method oracle needs --known (evaluate.py's Init-Basic predictions on the "
                "pool: what M0 answers correctly)")
    if a.method == "grait" and (not a.model or not a.warmup):
        return ("--method grait needs --model (M0) and --warmup (the rehearsal adapter with its "
                "Adam moments, SPEC 9 #10)")
    if a.crss and not a.model:
        return "--crss needs --model (M0, whose representations it compares)"
    if (a.n_van is not None and a.n_van < 0) or (a.n_idk is not None and a.n_idk < 0):
        return "--n-van and --n-idk must be >= 0"
    return None


def add_grait_args(g):
    """GRAIT's flags (SPEC 5, SPEC 9 #7-#10)."""
    g.add_argument("--model", help="M0, for the gradient features (and for --crss)")
    g.add_argument("--warmup", help="warm-up adapter with Adam moments: rehearse.py's adapter/ "
                   "(SPEC 9 #10 default) or a LESS-recipe one (finetune.py, SPEC 5.3 step 1)")
    g.add_argument("--warmup-format", choices=models.FORMATS,
                   help="how the warm-up was trained to see prompts, so the feature views are "
                        "rendered alike (SPEC 5.3 step 2); default: what finetune.py recorded "
                        "in <warmup>.config.json (chat when there is none)")
    g.add_argument("--grad-dim", type=int, default=8192,
                   help="feature size: exact gradients when the LoRA vector is at most this long, "
                        "else a seeded Rademacher projection to it (SPEC 5.3 step 5)")
    g.add_argument("--projection", choices=("auto", "rademacher", "sketch"), default="auto",
                   help="random projection when the LoRA vector exceeds --grad-dim: dense "
                        "Rademacher (SPEC 5.3, the released TRAK projector; 2*D*k flops per "
                        "example) or CountSketch (a sparse JL map, O(D)); auto (default): "
                        "Rademacher on a GPU, CountSketch on CPU, where the dense map costs "
                        "hours on a real model (README 'GRAIT features')")
    g.add_argument("--no-adam", action="store_true", help="skip Adam preconditioning")
    g.add_argument("--grait-select", choices=("greedy", "released"), default="greedy",
                   help="greedy: the greedy set S (SPEC 5.4, 9 #7); released: k greedy picks, "
                        "then the min(k, remaining) lowest-scoring remaining candidates (SPEC "
                        "5.4 quirk (b))")
    g.add_argument("--grait-weights", default="inferred", metavar="{" + ",".join(WEIGHT_VARIANTS) + "}",
                   help="IdK weights (SPEC 5.5, 9 #8): inferred: N/2 softmax(-delta/T), the "
                        "released formula with the sign flipped (mean 0.5); code: N/2 "
                        "softmax(+delta/T), exactly as released; uniform: 1, what the released "
                        "run trained with")
    g.add_argument("--grait-weight-sign", type=int, choices=(-1, 1),
                   help="override the variant's sign in scale N softmax(sign delta/T) (SPEC 9 #8)")
    g.add_argument("--grait-weight-scale", type=float,
                   help="override the variant's scale (mean weight) in scale N softmax(sign "
                        "delta/T), finite > 0; 1 gives the former 'paper' weights (SPEC 9 #8)")
    g.add_argument("--grait-temperature", type=float, default=GRAIT_T,
                   help="T of the weights (SPEC 5.5)")
    g.add_argument("--grad-batch-size", type=int, default=16, help="examples per gradient batch")
    g.add_argument("--trust-remote-code", action="store_true", help=models.TRUST_HELP)


def main(argv=None):
    a = parse_args(argv)
    # plumbing: the output claimed; the pool joined with its knowledge state (and flow, --known)
    files.check_output(a.out, [("--items", a.items), ("--state", a.state), ("--flow", a.flow),
                               ("--known", a.known),
                               ("--model", a.model), ("--warmup", a.warmup)])
    items = files.read_jsonl(a.items, check=files.check_item)
    tasks = {it["task"] for it in items}
    if len(tasks) != 1:
        raise InputError(f"{a.items}: mixes tasks {sorted(tasks)}")
    task = tasks.pop()
    items_by_id = {it["id"]: it for it in items}
    rows = join_states(items, a.state, a.flow, need_flow=a.method in ("wocer", "craft") or
                       (a.method == "grait" and a.flow is not None))
    if a.known:
        labels = {p["id"]: p["label"] for p in files.read_jsonl(a.known, files.check_prediction)}
        _same_ids(a.known, [it["id"] for it in items], labels)
        for r in rows:
            r["m0_known"] = labels[r["id"]] == "correct"
    # SPEC 4: N_van and N_idk, the paper's counts or the 1:4 ratio scaled to the pool
    d_van, d_idk = default_counts(task, len(items))
    n_van = d_van if a.n_van is None else a.n_van
    n_idk = d_idk if a.n_idk is None else a.n_idk
    if n_van + n_idk > len(items) and not a.with_replacement:
        raise InputError(f"--n-van {n_van} + --n-idk {n_idk} exceed the pool of "
                         f"{len(items)} items ({a.items}); lower them or pass "
                         "--with-replacement")
    # CRaFT Alg. 1 steps 1-3 (craft), its ablations and the baselines as "CRaFT minus a step"
    # (SPEC 4), GRAIT steps 1-3 (run_grait, SPEC 5): the van and idk sets
    rng = random.Random(a.seed)
    extra, weights = {}, None
    if a.method == "grait":
        van, idk, weights, extra = run_grait(a, items_by_id, rows, task, n_van, n_idk)
    elif a.method == "craft":
        van, idk = craft(rows, task, n_van, n_idk, rng, flow_rule=a.flow_rule,
                         with_replacement=a.with_replacement)
    elif a.method == "corcer":
        van, idk = corcer_rait(rows, task, n_van, n_idk, rng, with_replacement=a.with_replacement)
    elif a.method == "wocer":
        van, idk = wocer_rait(rows, task, n_van, n_idk, rng, flow_rule=a.flow_rule,
                              with_replacement=a.with_replacement)
    elif a.method == "cor":
        van, idk = cor_rait(rows, task, n_van, n_idk, rng, with_replacement=a.with_replacement)
    elif a.method == "oracle":
        van, idk = oracle_rait(rows, n_van, n_idk, rng, a.with_replacement)
    else:
        van, idk = van_tuning(rows, n_van + n_idk, rng, a.with_replacement)
    for kind, got, want in (("van", van, n_van), ("idk", idk, n_idk if a.method != "van" else 0)):
        if len(got) < want:
            print(f"[construct] short {kind} pool: {len(got)} of {want} requested; taking all "
                  "(SPEC 9 #6)", file=sys.stderr)
    # CRaFT Alg. 1 steps 4-5 (SPEC 9 #13): van answers kept, idk answers replaced by IdK, the
    # REFUSE prompt; GRAIT's weights on the idk examples (SPEC 5.6)
    examples = make_examples(items_by_id, van, idk, a.method, a.mcqa_reader, weights)
    random.Random(a.seed).shuffle(examples)       # a stable order; finetune shuffles anyway
    # plumbing: the summary (selection pressure, CRSS: SPEC 7), the outputs and the config
    pools = candidates(a.method, rows, task, a.flow_rule)
    if a.crss or (a.method == "grait" and a.model):
        extra.update(crss_summary(a.model, items_by_id, van, idk, a.trust_remote_code))
    summary = summarize(a.method, van, idk, items_by_id, requested=(n_van, n_idk), pools=pools,
                        extra=extra)
    files.write_jsonl(a.out, examples)
    files.write_json(f"{a.out}.summary.json", summary)
    files.write_config(a.out, a)
    print_summary(summary)


if __name__ == "__main__":
    runs.cli(main)

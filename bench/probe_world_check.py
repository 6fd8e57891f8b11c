"""bench/probe_world_check.py: does probe.py measure what the world's model knows?

    .venv/bin/python bench/probe_world_check.py --world runs/world --n 400

1. Runs probe.py (its real CLI path) on --n seeded train items of each task: MCQA with the option
   reader, OEQA with pure temperature-1 sampling (--top-p 1 --top-k 0) and with the SPEC defaults
   (top-p 0.9, top-k 50). probe.py prints mu by exposure bin: it should rise with exposure.
2. For the one-word OEQA answers, one forward pass on the same 3-shot prompt gives p(gold), the
   probability that the first sampled token is the answer (after the same top-k / top-p warping
   for the second run). The sampled mu (N = 10 samples) estimates it: mean mu and mean p must
   agree within sampling error, z = (mean mu - mean p) / SE with SE = sqrt(sum p(1-p)/N) / n.
   (An answer can also appear later in a sample, which can only push mu above p.)
"""
import argparse
import math
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from rait import files, models, runs  # noqa: E402
import probe  # noqa: E402
from kernels.lm import last_logprobs, warp_logits  # noqa: E402


def gold_probability(model, tok, items, shots, top_k, top_p, batch=16):
    """p(first answer token = gold's single token) from one forward pass per item."""
    out = []
    for i in range(0, len(items), batch):
        b = items[i:i + batch]
        seqs = [models.encode(tok, probe.oeqa_prompt(tok, it, shots)) for it in b]
        logp = last_logprobs(model, seqs, tok.pad_token_id)
        p = warp_logits(logp, 1.0, top_k, top_p).softmax(-1)
        for it, row in zip(b, p):
            ids = tok(it["answer"], add_special_tokens=False)["input_ids"]
            out.append(float(row[ids[0]]) if len(ids) == 1 else None)
    return out


def first_word_rate(row, answer):
    """Fraction of an item's samples whose first word is the answer: the direct estimate of the
    first-token probability (mu also counts an answer that appears later in the sample)."""
    return sum(s.split()[:1] == [answer] for s in row["samples"]) / len(row["samples"])


def compare(rows, items, p, n_samples):
    by_id = {r["id"]: r for r in rows}
    first = {it["id"]: first_word_rate(by_id[it["id"]], it["answer"]) for it in items}
    m_first = sum(first[it["id"]] for it, q in zip(items, p) if q is not None)
    mus = {r["id"]: r["mu"] for r in rows}
    pairs = [(mus[it["id"]], q, it["meta"]["exposure"]) for it, q in zip(items, p)
             if q is not None]
    n = len(pairs)
    m_mu, m_p = sum(a for a, _, _ in pairs) / n, sum(b for _, b, _ in pairs) / n
    se = math.sqrt(sum(b * (1 - b) / n_samples for _, b, _ in pairs)) / n
    inside = [abs(a - b) <= 2 * math.sqrt(max(b * (1 - b), 1e-12) / n_samples) + 1e-9
              for a, b, _ in pairs if 0.02 < b < 0.98]
    print(f"  {n} one-word items (skipped {len(items) - n}): mean sampled mu {m_mu:.4f}, "
          f"mean p(gold) {m_p:.4f}, diff {m_mu - m_p:+.4f}, SE {se:.4f}, "
          f"z {(m_mu - m_p) / se if se else float('nan'):+.2f}")
    print(f"  samples whose first word is the answer: {m_first / n:.4f}, "
          f"z {(m_first / n - m_p) / se if se else float('nan'):+.2f}")
    print(f"  per item, |mu - p| <= 2 sd(p, N={n_samples}) for {sum(inside)}/{len(inside)} "
          f"items with 0.02 < p < 0.98 (about 95% expected; mu's 0.1 grid makes it coarse)")
    groups = {}
    for a, b, k in pairs:
        groups.setdefault(runs.exposure_bin(k), []).append((a, b))
    print("  exposure      n  mean mu  mean p(gold)")
    for k in sorted(groups, key=runs.BIN_ORDER.index):
        g = groups[k]
        print(f"  {k:>8} {len(g):6d}  {sum(a for a, _ in g) / len(g):7.4f}  "
              f"{sum(b for _, b in g) / len(g):12.4f}")
    return (m_mu - m_p) / se if se else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="runs/world", help="world folder (model/, mcqa/, oeqa/)")
    ap.add_argument("--n", type=int, default=400, help="train items per task (seeded sample)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--seed", type=int, default=0, help="item sample and probe seed")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = os.path.join(a.world, "model")
    tmp = tempfile.mkdtemp()
    picked = {}
    shots_file = os.path.join(a.world, "oeqa", "shots.jsonl")
    shots = files.read_jsonl(shots_file)[:3]
    for task in ("mcqa", "oeqa"):
        items = [it for it in files.read_jsonl(os.path.join(a.world, task, "train.jsonl"))
                 if it["id"] not in {s["id"] for s in shots}]    # same 3 shots for every item
        random.Random(a.seed).shuffle(items)
        picked[task] = sorted(items[:a.n], key=lambda it: it["id"])
        files.write_jsonl(os.path.join(tmp, f"{task}.jsonl"), picked[task])
    base = ["--model", model_dir, "--seed", str(a.seed)]
    print("== MCQA, option reader (SPEC 10)", flush=True)
    probe.main(base + ["--items", os.path.join(tmp, "mcqa.jsonl"), "--task", "mcqa",
                       "--mcqa-reader", "option", "--out", os.path.join(tmp, "mcqa_out.jsonl")])
    model, tok = models.load_model(model_dir)
    z = {}
    for name, k, p in (("pure sampling (top-p 1, top-k 0)", 0, 1.0),
                       ("SPEC defaults (top-p 0.9, top-k 50)", 50, 0.9)):
        print(f"== OEQA, sampling reader, {name}", flush=True)
        out = os.path.join(tmp, f"oeqa_{k}.jsonl")
        probe.main(base + ["--items", os.path.join(tmp, "oeqa.jsonl"), "--task", "oeqa",
                           "--shots", shots_file, "--top-k", str(k), "--top-p", str(p),
                           "--out", out])
        rows = files.read_jsonl(out, check=files.check_state)
        print(f"-- sampled mu vs p(gold) from one forward pass ({name})")
        z[name] = compare(rows, picked["oeqa"],
                          gold_probability(model, tok, picked["oeqa"], shots, k, p), 10)
    print("verdict:", "agree" if all(abs(v) < 3 for v in z.values()) else "DISAGREE",
          {k: round(v, 2) for k, v in z.items()})


if __name__ == "__main__":
    main()

"""bench/geo_curve.py: which GeoNames relations give a graded knowledge curve on a real chat model
(issue 16). The tests run it on 2 facts per relation (tests/test_bench_tiny.py).

    OMP_NUM_THREADS=1 .venv/bin/python bench/geo_curve.py --out runs/geo_curve.jsonl  # ~15 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/geo_curve.py --per-relation 50 --option-context

The facts and items are data.py's (data.geo_facts, data.geo_relation_items), so the wording,
aliases and options are the ones the pipeline gets. Per relation, --per-relation facts (MCQA:
--mcqa-per-relation) evenly spaced in popularity rank are asked:
  OEQA: the BASIC prompt (the question alone) in the chat template, greedy, --max-new-tokens,
        labelled by evaluate.label_response (alias containment, SPEC 7), as Init-Basic is;
  MCQA: the option reader, correct when the gold option has the highest probability (mu: its
        renormalised probability), with two contexts: `spec`, the pipeline's (probe.read_options:
        the SPEC 2.3 MCQA BASIC prompt listing the options, SPEC 10), and `question`, an
        experiment: each option scored right after the question alone, no options shown.
One table per task: relation x popularity quintile (of log10 population, within the relation;
Q1 = least populous), accuracy in % and the count. --out writes every response as JSONL.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from rait import files, models  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import probe  # noqa: E402
from kernels.lm import continuation_logliks  # noqa: E402

BINS = 5
CONTEXTS = {"spec": "SPEC 2.3 MCQA BASIC prompt (options listed; the pipeline's probe)",
            "question": "question alone (no options shown; not what the pipeline does)"}


def spread(rows, n):
    """n rows evenly spaced in popularity rank (all if n >= len), least populous first."""
    rows = sorted(rows, key=lambda it: (it["meta"]["population"], it["id"]))
    if n >= len(rows):
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]


def question_options(model, tok, items):
    """Option probabilities when each option's text is scored right after the rendered question
    alone (the OEQA BASIC prompt): an experiment beside the pipeline's option reader."""
    ctx, cont = [], []
    for it in items:
        c = models.encode(tok, models.render(tok, models.user_prompt({**it, "task": "oeqa"},
                                                                     "basic")))
        for o in it["choices"]:
            ctx.append(c)
            cont.append(tok(o, add_special_tokens=False)["input_ids"])
    ll = continuation_logliks(model, ctx, cont, tok.pad_token_id).view(len(items), -1)
    return ll.softmax(-1).tolist()


def quintile_table(title, items, correct):
    """Markdown table: relation x popularity quintile, `acc% (n)`; plus the log-pop range."""
    lines = [f"### {title}", "", "| relation | " + " | ".join(f"Q{b + 1}" for b in range(BINS))
             + " | all | log10 pop range |", "|---" * (BINS + 3) + "|"]
    for rel in dict.fromkeys(it["subject"] for it in items):
        rows = [it for it in items if it["subject"] == rel]      # already least populous first
        cells = []
        for b in range(BINS):
            part = rows[b * len(rows) // BINS:(b + 1) * len(rows) // BINS]
            acc = 100 * sum(correct[it["id"]] for it in part) / max(1, len(part))
            cells.append(f"{acc:.0f} ({len(part)})")
        acc = 100 * sum(correct[it["id"]] for it in rows) / len(rows)
        lo, hi = rows[0]["meta"]["log_pop"], rows[-1]["meta"]["log_pop"]
        lines.append(f"| {rel} | " + " | ".join(cells) + f" | {acc:.0f} ({len(rows)}) | "
                     f"{lo:.1f}-{hi:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, ".venv", "share",
                                                   "SmolLM2-135M-Instruct"),
                   help="chat model folder (safetensors) or hub id")
    p.add_argument("--relations", nargs="+", default=list(data.GEO_QUESTIONS),
                   help="relations of data.GEO_QUESTIONS to measure (default: all)")
    p.add_argument("--per-relation", type=int, default=100,
                   help="OEQA facts per relation, evenly spaced in popularity rank")
    p.add_argument("--mcqa-per-relation", type=int, default=40,
                   help="MCQA facts per relation (the option reader scores 4 prompts of ~100 "
                        "tokens per item: about 1.5 s an item on one CPU thread)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy OEQA answer budget")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    p.add_argument("--option-context", nargs="*", choices=sorted(CONTEXTS),
                   default=["spec", "question"],
                   help="MCQA option reader contexts to measure (none: skip MCQA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MCQA options")
    p.add_argument("--out", help="write every OEQA response and MCQA option distribution as "
                   "JSONL here")
    a = p.parse_args()
    unknown = set(a.relations) - set(data.GEO_QUESTIONS)
    if unknown or min(a.per_relation, a.mcqa_per_relation) < BINS:
        p.error(f"unknown relations {sorted(unknown)}" if unknown else
                f"--per-relation and --mcqa-per-relation must be >= {BINS}")
    facts = data.geo_facts()
    model, tok = models.load_model(a.model)
    tok.padding_side = "left"
    stops = models.stop_token_ids(model, tok)
    oeqa = [it for r in a.relations
            for it in spread(data.geo_relation_items(facts, r, "oeqa", a.seed), a.per_relation)]
    t0, out, correct = time.time(), [], {}
    order = sorted(oeqa, key=lambda it: len(it["question"]))     # less padding per batch
    with torch.inference_mode():
        for i in range(0, len(order), a.batch_size):
            batch = order[i:i + a.batch_size]
            texts, _ = evaluate.generate(model, tok, [models.render(tok, models.user_prompt(
                it, "basic")) for it in batch], a.max_new_tokens, stops)
            for it, text in zip(batch, texts):
                label = evaluate.label_response(it, text)[0]
                correct[it["id"]] = label == "correct"
                out.append({"id": it["id"], "task": "oeqa", "response": text, "label": label})
            print(f"[geo_curve] oeqa {i + len(batch)}/{len(order)}  {time.time() - t0:.0f} s",
                  file=sys.stderr)
    print(f"Model {a.model}; {len(oeqa)} OEQA generations (greedy, {a.max_new_tokens} new tokens) "
          f"in {time.time() - t0:.0f} s\n")
    print(quintile_table("OEQA greedy correct, BASIC prompt (% (n))", oeqa, correct))
    mcqa = [it for r in a.relations for it in spread(
        data.geo_relation_items(facts, r, "mcqa", a.seed), a.mcqa_per_relation)]
    for context in a.option_context:
        t0, right, mus = time.time(), {}, {}
        with torch.inference_mode():
            for i in range(0, len(mcqa), a.batch_size):
                batch = mcqa[i:i + a.batch_size]
                if context == "spec":       # what the pipeline's probe does
                    probs = [r["probs"] for r in probe.read_options(model, tok, batch,
                                                                    "neg-entropy")]
                else:
                    probs = question_options(model, tok, batch)
                for it, p in zip(batch, probs):
                    gold = files.LETTERS.index(it["answer"])
                    right[it["id"]] = max(range(len(p)), key=p.__getitem__) == gold
                    mus[it["id"]] = p[gold]
                    out.append({"id": it["id"], "task": "mcqa", "context": context, "probs": p})
        print(f"{len(mcqa)} MCQA items, option reader after the {CONTEXTS[context]}, "
              f"{time.time() - t0:.0f} s\n")
        print(quintile_table(f"MCQA option reader ({context}): gold option ranked first "
                             "(% (n), chance 25)", mcqa, right))
        print(quintile_table(f"MCQA option reader ({context}): mean mu x 100 (n)", mcqa, mus))
    if a.out:
        files.write_jsonl(a.out, out)


if __name__ == "__main__":
    main()

r"""probe.py: the knowledge state (correctness mu, certainty sigma) of a model on each item, as
CRaFT's knowledge query measures it (CRaFT §KQ; SPEC 2, SPEC 9 #4-#5, SPEC 10).

Readers (the `reader` field of each output line):
  letter  MCQA, real models (SPEC 2.1): 5-shot raw-LM prompt, one forward pass, p(" A"), p(" B")...
  option  MCQA, the world (SPEC 10): log-likelihood of each option's text after the 0-shot prompt
  sample  OEQA (SPEC 2.2): N sampled answers, mu = fraction correct, sigma = embedding similarity

    python probe.py --model runs/world/model --items runs/world/mcqa/train.jsonl --task mcqa \
        --mcqa-reader option --out runs/world/mcqa/probe_init.jsonl
    python probe.py --model meta-llama/Meta-Llama-3-8B-Instruct --items mmlu_test.jsonl \
        --task mcqa --shots mmlu_val.jsonl --out probe.jsonl
    python probe.py --model runs/world/model --items runs/world/oeqa/train.jsonl --task oeqa \
        --shots runs/world/oeqa/shots.jsonl --out probe.jsonl
    torchrun --nproc_per_node 2 probe.py ...        # shards items by rank, same file as 1 process

Output: one knowledge state per item (id, mu, sigma, reader, and the evidence: `probs` for MCQA,
`samples` + `labels` for OEQA) and `<out>.config.json`. Batches are fixed by position and seeded
each, so an interrupted run resumes and sharding does not change the result (for a fixed
--batch-size and thread count). Text histograms of mu and sigma, and mu by exposure bin when items
carry meta.exposure (the world), end the log.
"""
import argparse
import math
import sys

import torch

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs
from rait.files import LETTERS
from kernels.embed import DEFAULT_EMBEDDER, Embedder
from kernels.lm import continuation_logliks, last_logprobs, sample

# SPEC 2.2: TriviaQA dev rows 0-2, as hard-coded in the released train/map_funs.py [C-C]
TRIVIAQA_SHOTS = [
    {"question": "Who was President when the first Peanuts cartoon was published?",
     "answer": "Harry Truman"},
    {"question": "Which American-born Sinclair won the Nobel Prize for Literature in 1930?",
     "answer": "Sinclair Lewis"},
    {"question": "Where in England was Dame Judi Dench born?", "answer": "York"},
]
HINT_CUT = models.OEQA_BASIC2[:40]   # SPEC 2.2: cut at the first 40 characters of the hint
# Below this temperature float32 logits / T overflow to inf (1e-300 crashed the sampler); sampling
# is then greedy decoding in all but name anyway.
MIN_TEMPERATURE = 0.01


# ----------------------------------------------------------------------------------------------
# The paper's formulas (pure; each has its own test)
def mcqa_state(probs, gold_index, certainty="neg-entropy"):
    """SPEC 2.1 / 9 #4. probs: the model's probabilities of the K choices (letters or options).

    mu = p[gold] / sum(p) (renormalised over the choices).
    sigma = sum_o q(o) log q(o), the negative entropy, in [-log K, 0]; higher = more certain.
      certainty="neg-entropy": q = p / sum(p) (the paper's definition, our default);
      certainty="raw-entropy": q = p un-renormalised (the released code, which stores +entropy
      and sorts ascending; we store its negative so that higher always means more certain)."""
    if certainty not in ("neg-entropy", "raw-entropy"):
        raise ValueError(f"unknown certainty {certainty!r}")
    total = sum(probs)
    mu = probs[gold_index] / total
    q = [x / total for x in probs] if certainty == "neg-entropy" else list(probs)
    sigma = sum(x * math.log(x) for x in q if x > 0)
    return mu, sigma


def oeqa_mu(labels):
    """SPEC 2.2: mu = (# samples labelled correct) / N; refusals count as not correct."""
    return sum(lab == "correct" for lab in labels) / len(labels)


def embedding_certainty(embeddings):
    """SPEC 2.2 / 9 #5: mean cosine similarity over the N(N-1) ordered pairs of distinct samples
    (diagonal excluded), unrounded. embeddings: [N, D] tensor, N >= 2."""
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)
    n = e.shape[0]
    sim = e @ e.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def cut_at_hint(text):
    """SPEC 2.2: cut at the first case-insensitive occurrence of the hint's first 40 characters
    (the model starting the next shot), then strip whitespace."""
    i = text.lower().find(HINT_CUT.lower())
    return (text if i < 0 else text[:i]).strip()


def label_sample(text, aliases, strict=False):
    """SPEC 2.2: `refuse` if it says "i don't know" (SPEC 9 #14), else `correct` if any alias is
    a case-insensitive substring (containment, not exact match), else `wrong`."""
    if models.is_refusal(text, strict=strict):
        return "refuse"
    return "correct" if models.alias_match(text, aliases) else "wrong"


# ----------------------------------------------------------------------------------------------
# Prompts
def question_block(item):
    """`Question: {q}\\nA. {A}\\n...Answer:` (SPEC 2.1), the shared MCQA body without hint and
    without the trailing space."""
    return models.mcqa_body("", item["question"], item["choices"])[1:-1]


def letter_prompt(item, shots):
    """SPEC 2.1: H + S1 + ... + Sk + question block; BASIC hint with no separator; raw LM text."""
    subject = (item.get("subject") or models.ARC_SUBJECT).replace("_", " ")
    hint = models.MCQA_BASIC_HINT.format(subject=subject)
    return hint + "".join(f"{question_block(s)} {s['answer']}\n" for s in shots) + \
        question_block(item)


def oeqa_prompt(tok, item, shots):
    """SPEC 2.2: BASIC2 turns, shots as earlier user/assistant turns, via models.render. The
    assistant turn is `{gold}\\n` in a chat template; plain rendering adds the newline itself."""
    nl = "\n" if models.has_chat_template(tok) else ""
    hist = [(models.OEQA_BASIC2.format(q=s["question"]), s["answer"] + nl) for s in shots]
    return models.render(tok, models.OEQA_BASIC2.format(q=item["question"]), hist)


def letter_token_ids(tok, k):
    """Ids of the K letters as they follow "Answer:" (" A" ...), by tokenising "Answer: A" against
    "Answer:". Tokens every letter shares (a lone space token) are returned to append to the
    prompt. Raises InputError unless each letter is then one distinct token."""
    base = tok("Answer:", add_special_tokens=False)["input_ids"]
    conts = []
    for letter in LETTERS[:k]:
        full = tok("Answer: " + letter, add_special_tokens=False)["input_ids"]
        conts.append(full[len(base):] if full[:len(base)] == base else [])
    n = 0
    while all(len(c) > n + 1 for c in conts) and len({c[n] for c in conts}) == 1:
        n += 1
    ids = [c[n] if len(c) == n + 1 else None for c in conts]
    if None in ids or len(set(ids)) != k:
        raise InputError(f"the tokenizer does not give single distinct letter tokens after "
                         f"'Answer:' ({conts}); use --mcqa-reader option")
    return conts[0][:n], ids


# ----------------------------------------------------------------------------------------------
# Readers: one batch of items -> knowledge states
def read_letters(model, tok, items, shots_for, letters, certainty):
    """SPEC 2.1: one left-padded forward pass, softmax at the position after "Answer:"."""
    shared, ids = letters
    bos = models.raw_prompt_bos(tok)                                     # opencompass adds BOS
    seqs = [bos + tok(letter_prompt(it, shots_for[it["id"]]), add_special_tokens=False)
            ["input_ids"] + shared for it in items]
    models.check_context(model, seqs, items)
    logp = last_logprobs(model, seqs, tok.pad_token_id)
    rows = []
    for i, it in enumerate(items):
        p = logp[i, ids[:len(it["choices"])]].double().exp().tolist()     # raw letter probs
        mu, sigma = mcqa_state(p, LETTERS.index(it["answer"]), certainty)
        rows.append({"id": it["id"], "mu": mu, "sigma": sigma, "reader": "letter", "probs": p})
    return rows


OPTION_CONTEXTS = ("prompt", "question")


def read_options(model, tok, items, certainty, context="prompt"):
    """SPEC 10: summed log-likelihood of each option's text after the rendered 0-shot BASIC
    prompt (context "prompt": the options listed, as the world learned it) or after the rendered
    question alone (context "question": the option text as the answer to the bare question; a
    small chat model that sees the listed options and the A-D hint expects a letter, and its
    option-text likelihoods are at chance even for facts it knows: README "A real chat model");
    one batched pass over item x option; softmax over the options."""
    ctx, cont = [], []
    for it in items:
        user = models.user_prompt(it, "basic") if context == "prompt" else it["question"]
        c = models.encode(tok, models.render(tok, user))
        for o in it["choices"]:
            t = tok(o, add_special_tokens=False)["input_ids"]
            if not t:
                raise InputError(f"item {it['id']}: option {o!r} has no tokens")
            ctx.append(c)
            cont.append(t)
    models.check_context(model, [a + b for a, b in zip(ctx, cont)],
                         [it for it in items for _ in it["choices"]])
    ll = continuation_logliks(model, ctx, cont, tok.pad_token_id).tolist()
    rows, j = [], 0
    for it in items:
        k = len(it["choices"])
        lk = ll[j:j + k]
        j += k
        p = torch.tensor(lk, dtype=torch.float64).softmax(0).tolist()
        mu, sigma = mcqa_state(p, LETTERS.index(it["answer"]), certainty)
        rows.append({"id": it["id"], "mu": mu, "sigma": sigma, "reader": "option", "probs": p,
                     "logliks": lk})
    return rows


def read_samples(model, tok, embedder, items, shots_for, args, seed):
    """SPEC 2.2: N samples per question, cut at the hint, labelled; mu = fraction correct;
    sigma = mean off-diagonal cosine similarity of their sentence embeddings."""
    prompts = [models.encode(tok, oeqa_prompt(tok, it, shots_for[it["id"]])) for it in items]
    models.check_context(model, prompts, items)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    mark = HINT_CUT.lower()
    toks = sample(model, prompts, args.n_samples, gen, pad_id=tok.pad_token_id,
                  stop_ids=stop_token_ids(model, tok), max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  done_fn=lambda t: mark in tok.decode(t, skip_special_tokens=True).lower())
    texts = [cut_at_hint(tok.decode(t, skip_special_tokens=True)) for t in toks]
    uniq = sorted(set(texts), key=lambda x: (len(x), x))          # less padding per batch
    emb = dict(zip(uniq, embedder.encode(uniq)))
    rows, n = [], args.n_samples
    for i, it in enumerate(items):
        s = texts[i * n:(i + 1) * n]
        labels = [label_sample(x, it["aliases"], args.strict_refusal) for x in s]
        sigma = embedding_certainty(torch.stack([emb[x] for x in s]))
        if args.round_certainty is not None:                               # SPEC 9 #5
            sigma = round(sigma, args.round_certainty)
        rows.append({"id": it["id"], "mu": oeqa_mu(labels), "sigma": sigma, "reader": "sample",
                     "samples": s, "labels": labels})
    return rows


def stop_token_ids(model, tok):
    """models.stop_token_ids; for models without a chat template also the newline that ends a
    plain-prompt answer."""
    ids = set(models.stop_token_ids(model, tok))
    if not models.has_chat_template(tok):   # plain prompts end each answer with "\n" (render),
        nl = tok("\n", add_special_tokens=False)["input_ids"]     # as a chat turn ends in EOS
        if len(nl) == 1:
            ids.add(nl[0])
    return ids


# ----------------------------------------------------------------------------------------------
# Report
def histogram(values, bins=10, lo=None, hi=None, width=40):
    """Text histogram lines `[lo, hi) count bar`."""
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    step = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / step)))] += 1
    top = max(counts) or 1
    return [f"  [{lo + b * step:7.3f}, {lo + (b + 1) * step:7.3f})  {c:6d} "
            f"{'#' * round(width * c / top)}" for b, c in enumerate(counts)]


def report(rows, items):
    mus, sigmas = [r["mu"] for r in rows], [r["sigma"] for r in rows]
    print(f"mu (correctness): mean {sum(mus) / len(mus):.4f} over {len(rows)} items")
    print("\n".join(histogram(mus, lo=0.0, hi=1.0)))
    if "labels" in rows[0]:
        labs = [x for r in rows for x in r["labels"]]
        print("samples: " + ", ".join(f"{k} {labs.count(k) / len(labs):.3f}"
                                      for k in ("correct", "wrong", "refuse")))
    print(f"sigma (certainty): mean {sum(sigmas) / len(sigmas):.4f}")
    print("\n".join(histogram(sigmas)))
    exp = {it["id"]: it["meta"]["exposure"] for it in items
           if isinstance(it.get("meta", {}).get("exposure"), (int, float))}
    if exp:
        groups = {}
        for r in rows:
            if r["id"] in exp:
                groups.setdefault(runs.exposure_bin(exp[r["id"]]), []).append(r)
        print("mu by exposure (meta.exposure):\n  exposure      n   mean mu  mean sigma")
        for b in sorted(groups, key=runs.BIN_ORDER.index):
            g = groups[b]
            print(f"  {b:>8} {len(g):6d}   {sum(r['mu'] for r in g) / len(g):7.4f}"
                  f"  {sum(r['sigma'] for r in g) / len(g):10.4f}")


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # inputs and outputs
    p.add_argument("--model", default="runs/world/model", help="model folder or hub id")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder applied on load")
    p.add_argument("--trust-remote-code", action="store_true", help=models.TRUST_HELP)
    p.add_argument("--items", required=True, help="item JSONL (DESIGN file contracts)")
    p.add_argument("--task", required=True, choices=files.TASKS, help="item task")
    p.add_argument("--out", required=True, help="knowledge-state JSONL to write")
    p.add_argument("--shots", default=None, help="item JSONL of in-context shots (MCQA: same "
                   "subject, e.g. MMLU val; OEQA default: the 3 TriviaQA shots of SPEC 2.2)")
    p.add_argument("--n-shots", type=int, default=None, help="shots per prompt (default 5 MCQA "
                   "letter reader, SPEC 2.1; 3 OEQA, SPEC 2.2)")
    # MCQA
    p.add_argument("--mcqa-reader", default="letter", choices=("letter", "option"),
                   help="letter: SPEC 2.1 (real models); option: SPEC 10 (the world, 0-shot)")
    p.add_argument("--option-context", default="prompt", choices=OPTION_CONTEXTS,
                   help="option reader: score each option's text after the BASIC prompt with the "
                        "options listed (default, the world) or after the question alone (geo "
                        "facts on a small chat model)")
    p.add_argument("--certainty", default="neg-entropy", choices=("neg-entropy", "raw-entropy"),
                   help="MCQA sigma over renormalised (paper) or raw (released) probs, SPEC 9 #4")
    # OEQA sampling, SPEC 2.2: released runs use the chat models' generation_config
    p.add_argument("--n-samples", type=int, default=10, help="samples per question (N)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help=f"sampling temperature, >= {MIN_TEMPERATURE}")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus; Llama chat config 0.9")
    p.add_argument("--top-k", type=int, default=50, help="top-k (HF default 50); 0 = off")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens per sample")
    p.add_argument("--round-certainty", type=int, default=None,
                   help="round OEQA sigma to this many decimals (2 = released, SPEC 9 #5)")
    p.add_argument("--strict-refusal", action="store_true",
                   help="ASCII-only 'i don't know' (SPEC 9 #14)")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                   help="all-MiniLM-L6-v2 folder or hub id (default: the one `make install` "
                   "extracts)")
    # plumbing
    p.add_argument("--batch-size", type=int, default=16,
                   help="items per batch (OEQA: x N sampled rows); fixed batches make the "
                   "result independent of resume and sharding")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch sampling streams")
    args = p.parse_args(argv)
    if args.n_shots is None:
        args.n_shots = 3 if args.task == "oeqa" else (5 if args.mcqa_reader == "letter" else 0)
    if args.n_samples < 2 or args.batch_size < 1 or args.n_shots < 0 or args.top_k < 0:
        p.error("--n-samples must be >= 2, --batch-size >= 1, --n-shots and --top-k >= 0")
    if not (MIN_TEMPERATURE <= args.temperature < math.inf and 0 < args.top_p <= 1
            and args.max_new_tokens >= 1):
        p.error(f"need {MIN_TEMPERATURE} <= --temperature < inf, 0 < --top-p <= 1, "
                "--max-new-tokens >= 1")
    return args


def load_items(path, task):
    def check(o):
        err = files.check_item(o)
        if not err and o["task"] != task:
            err = f"item task {o['task']!r} does not match --task {task}"
        return err
    return files.read_jsonl(path, check=check)


def shots_per_item(items, pool, n, same_subject):
    """The first n shots of the pool (of the item's subject for MCQA), never the item itself."""
    out, short = {}, 0
    for it in items:
        s = [x for x in pool if x.get("id") != it["id"]
             and (not same_subject or x.get("subject") == it.get("subject"))][:n]
        short += len(s) < n
        out[it["id"]] = s
    if short and runs.dist_info()[0] == 0:
        print(f"[probe] warning: {short} items have fewer than {n} shots", file=sys.stderr)
    return out


def main(argv=None):
    args = parse_args(argv)
    rank, _ = runs.dist_init()
    log = (lambda *a: print("[probe]", *a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    # plumbing: the items, the few-shot pool, the output claimed, the model
    items = load_items(args.items, args.task)
    if args.task == "mcqa" and args.mcqa_reader == "option" and (args.shots or args.n_shots):
        raise InputError("--mcqa-reader option is 0-shot (SPEC 10): drop --shots/--n-shots")
    pool = load_items(args.shots, args.task) if args.shots else (
        TRIVIAQA_SHOTS if args.task == "oeqa" else [])
    shots_for = shots_per_item(items, pool, args.n_shots, same_subject=args.task == "mcqa")
    files.check_output(args.out, [("--items", args.items), ("--shots", args.shots),
                                  ("--model", args.model), ("--adapter", args.adapter)])
    model, tok = models.load_model(args.model, adapter=args.adapter,
                                   trust_remote_code=args.trust_remote_code)
    reader = "sample" if args.task == "oeqa" else args.mcqa_reader
    extra = {"reader": reader, "device": str(model.device), "dtype": str(model.dtype)}
    shot_src = args.shots or ("SPEC 2.2 TriviaQA shots" if reader == "sample" else "none")
    log(f"model {args.model} on {model.device} ({model.dtype}), reader {reader}, "
        f"{args.n_shots} shots from {shot_src}")
    # CRaFT's knowledge-state query (SPEC 2): the reader of each item's mu and sigma
    if reader == "letter":    # SPEC 2.1: letter probabilities after k shots -> mu, sigma
        letters = letter_token_ids(tok, max(len(it["choices"]) for it in items))
        extra["letter_token_ids"] = letters[1]
        log(f"raw LM prompt, {'BOS' if models.raw_prompt_bos(tok) else 'no BOS'}, no chat template "
            f"(SPEC 2.1); letter tokens "
            f"{tok.convert_ids_to_tokens(letters[1])} after {letters[0] or 'Answer:'}")
        fn = lambda b, s: read_letters(model, tok, b, shots_for, letters, args.certainty)  # noqa
    elif reader == "option":  # SPEC 10: option log-likelihoods (the world's MCQA)
        log(f"option log-likelihoods after the 0-shot "
            f"{'BASIC prompt' if args.option_context == 'prompt' else 'question alone'}, "
            f"{'chat template' if models.has_chat_template(tok) else 'plain prompt'} (SPEC 10)")
        fn = lambda b, s: read_options(model, tok, b, args.certainty, args.option_context)  # noqa
    else:                     # SPEC 2.2: N samples -> mu = share correct, sigma = agreement
        try:
            embedder = Embedder(args.embedder, device=model.device)
        except (OSError, ValueError) as e:
            raise InputError(f"{args.embedder}: cannot load embedder "
                             f"({str(e).splitlines()[0]})") from None
        extra["embedder"] = args.embedder
        extra["stop_token_ids"] = sorted(stop_token_ids(model, tok))
        log(f"{'chat template' if models.has_chat_template(tok) else 'plain prompt'}; "
            f"N={args.n_samples} T={args.temperature} top_p={args.top_p} top_k={args.top_k} "
            f"max_new_tokens={args.max_new_tokens}; embedder {args.embedder} "
            f"(mean pooling, L2, transformers AutoModel)")
        fn = lambda b, s: read_samples(model, tok, embedder, b, shots_for, args=args, seed=s)  # noqa
    # plumbing: the resume key (the arguments, the item and shot ids, the contents of every
    # input), fixed seeded batches that resume after a kill, the config and the report
    key = runs.resume_key(args, exclude=("out",), extra=[it["id"] for it in items] +
                          [s.get("id", "") for s in pool], inputs=(
                              ("items", args.items), ("shots", args.shots), ("model", args.model),
                              ("adapter", args.adapter), ("embedder", args.embedder)))
    rows = runs.resumable_batches(items, fn, args.out, args.batch_size, f"probe {reader}",
                                  seed=args.seed, key=key, source=args.items)
    if rank == 0:
        files.write_config(args.out, args, **extra)
        report(rows, items)
        log(f"wrote {args.out} ({len(rows)} knowledge states)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    runs.cli(main)

"""rehearse.py: CRaFT stage 1, rehearsal training and knowledge flow (CRaFT §3.2, SPEC 3).

Fine-tune M0 briefly on items it already knows with near-certain correctness, so it gains no new
knowledge; probe the whole pool again with the result M~; the knowledge flow of an item is
dmu = mu(M~) - mu(M0). Items whose correctness rises would "flow" towards known during ordinary
SFT: labelling them IdK creates a dynamic conflict, so CRaFT drops them (construct.py). The
rehearsal adapter keeps its Adam moments: GRAIT reuses it as its warm-up (SPEC 9 #10).

    python rehearse.py --model runs/world/model --items pool.jsonl --state probe_init.jsonl \\
        --out runs/world/mcqa/rehearsal -- --batch-size 16 --lr 1e-3 --lora-r 16
    python rehearse.py ... --launcher "torchrun --standalone --nproc_per_node 2"   # DDP training
                                                                    # and a sharded re-probe

Steps 2 and 3 run the other stages as the commands a user would type (printed first): the
training is `finetune.py --model M --train <out>/train.jsonl --out <out>/adapter --warmup-ratio 0
--seed S <the flags after -->` and the re-probe is `probe.py <the initial probe's recorded arguments,
adapter and output swapped>`. rehearse.py itself is one process; `--launcher` goes in front of
both commands, so they scale out. A rerun resumes: finetune.py continues from its checkpoint (or
says it is already trained) and probe.py from its finished batches.

Inputs: the pool items and M0's knowledge state (probe.py; its <state>.config.json says how it was
probed, and the re-probe repeats exactly that query with the adapter). Outputs in --out:
train.jsonl (the rehearsal set), adapter/ (LoRA + trainer_state.safetensors), probe.jsonl (M~'s
knowledge state), flow.jsonl (id, mu0, mu1, flow, sigma0, sigma1) and flow_summary.json.

Where we differ from the released code (SPEC 3, 6, 9):
- both tasks rehearse with LoRA (the SPEC 9 #12 recipe with no warm-up), so the adapter can serve
  as GRAIT's warm-up; `-- --full --lr 2e-6` reproduces the released OEQA full
  fine-tuning;
- OEQA flow is the mean over each question's own samples (the released index bug, SPEC 3, is not
  reproduced); the target is the gold answer (`--rehearsal-target modal`: the model's most frequent
  correct sample, SPEC 9 #3);
- when fewer items qualify than --size, the best by mu then sigma fill up, and we say so; the
  make-up (passed the filter / fill-ups, their mu) goes to flow_summary.json and the config.
"""
import argparse
import collections
import math
import os
import random
import shlex
import sys

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs

# SPEC 3 [C-C]: who qualifies for rehearsal
MCQA_MIN_RAW_P_GOLD = 0.99     # raw (un-renormalised) p(gold) > 0.99 under the KQ
OEQA_MIN_MU = 0.995            # all 10 samples correct ...
OEQA_MIN_SIGMA = 0.995         # ... and near-identical samples
REHEARSAL_SIZE = 1000          # SPEC 3: 1,000 drawn uniformly
LOW_MU = 0.5                   # the flow summary's "unknown" items (paper: 69% of mu < 0.5 rose)


def raw_p_gold(state, item):
    """The un-renormalised probability of the gold choice (letter reader: the letter token's
    probability; option reader: exp of the gold option's summed log-likelihood)."""
    g = files.LETTERS.index(item["answer"])
    if "logliks" in state:
        return math.exp(state["logliks"][g])
    return state["probs"][g]


def qualifies(state, item):
    """SPEC 3: the rehearsal filter per task."""
    if item["task"] == "mcqa":
        return raw_p_gold(state, item) > MCQA_MIN_RAW_P_GOLD
    return state["mu"] >= OEQA_MIN_MU and state["sigma"] >= OEQA_MIN_SIGMA


def select_rehearsal(items, states, size, seed):
    """SPEC 3: `size` items drawn uniformly (seeded) from those that qualify; if too few qualify,
    all of them plus the best of the rest by mu, then sigma (ties by id). Returns (ids, n_qual)."""
    ok = [it["id"] for it in items if qualifies(states[it["id"]], it)]
    chosen = random.Random(seed).sample(ok, min(size, len(ok)))
    if len(chosen) < size:
        rest = sorted((it["id"] for it in items if it["id"] not in set(ok)),
                      key=lambda i: (-states[i]["mu"], -states[i]["sigma"], i))
        chosen += rest[:size - len(chosen)]
    return chosen, len(ok)


def rehearsal_makeup(chosen, n_qualified, states, size):
    """What the rehearsal set is made of (issue 27): select_rehearsal() puts the items that
    passed the SPEC 3 filter first and the fill-ups after them. Returns the counts and the mean,
    min and max mu of each part."""
    passed = min(n_qualified, len(chosen))
    def mu(ids):
        m = [states[i]["mu"] for i in ids]
        return {"mean": sum(m) / len(m), "min": min(m), "max": max(m)} if m else None
    return {"size": size, "qualified": n_qualified, "used": len(chosen), "passed_filter": passed,
            "fill_ups": len(chosen) - passed, "passed_mu": mu(chosen[:passed]),
            "fill_up_mu": mu(chosen[passed:])}


def modal_correct(state, item):
    """SPEC 9 #3 alternative target: the most frequent correct sampled answer (else the gold)."""
    ok = [s for s, lab in zip(state.get("samples", []), state.get("labels", [])) if lab == "correct"]
    return collections.Counter(ok).most_common(1)[0][0] if ok else item["answer"]


def knowledge_flow(mu0, mu1):
    """CRaFT's knowledge flow of one item (CRaFT §3.2, SPEC 3): the change of its correctness
    from M0 to the rehearsed model M~, dmu = mu(M~) - mu(M0), in [-1, 1]: positive when rehearsal
    made the model answer it correctly more often. (SPEC 0: the paper's `Cor(M~) - Cer(M0)` is a
    typo for this.)"""
    return mu1 - mu0


def flow_summary(flows, items):
    """Share of low-correctness items (mu0 < 0.5) whose correctness rose, overall and (on the
    world) by exposure bin; the paper reports 69% for Llama-3 on MMLU."""
    def share(rows):
        low = [f for f in rows if f["mu0"] < LOW_MU]
        return {"n_low": len(low), "rose": sum(f["flow"] > 0 for f in low) / len(low) if low else None,
                "fell": sum(f["flow"] < 0 for f in low) / len(low) if low else None,
                "mean_flow_all": sum(f["flow"] for f in rows) / len(rows)}
    out = {"all": share(flows)}
    by = collections.defaultdict(list)
    for f in flows:
        exp = items[f["id"]].get("meta", {}).get("exposure")
        if exp is not None:
            by[runs.exposure_bin(exp)].append(f)
    if by:
        out["by_exposure"] = {b: share(by[b]) for b in sorted(by, key=runs.BIN_ORDER.index)}
    return out


def print_flow_summary(s):
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    a = s["all"]
    print(f"[rehearse] knowledge flow: of {a['n_low']} items with mu0 < {LOW_MU}, "
          f"{pct(a['rose'])} rose and {pct(a['fell'])} fell (paper: 69% rose, Llama-3 MMLU)",
          file=sys.stderr)
    if "by_exposure" in s:
        print(f"{'exposure':>9} {'n(mu0<.5)':>10} {'rose':>6} {'fell':>6} {'mean dmu':>9}",
              file=sys.stderr)
        for b, v in s["by_exposure"].items():
            print(f"{b:>9} {v['n_low']:>10} {pct(v['rose']):>6} {pct(v['fell']):>6} "
                  f"{v['mean_flow_all']:>9.3f}", file=sys.stderr)


# probe.py arguments that name where the query runs, not what it asks (the re-probe swaps them)
PROBE_PLACE_ARGS = ("model", "items", "adapter", "out")


def probe_argv(state_path, model, items, adapter, out):
    """The initial probe's own arguments (from <state>.config.json) with the adapter and output
    swapped in, so the re-probe repeats exactly the same knowledge query (SPEC 3 re-query).
    Every recorded value is passed on, 0, 0.0 and "" included (a dropped `--n-shots 0` once made
    the world's re-probe 3-shot); only None (the flag's default) and False (a switch left off)
    are left out."""
    cfg_path = f"{state_path}.config.json"
    if not os.path.isfile(cfg_path):
        raise InputError(f"{cfg_path}: missing; the re-probe repeats the initial probe's "
                         "arguments, recorded there by probe.py")
    args = dict(recorded_args(cfg_path), model=model, items=items, adapter=adapter, out=out)
    argv = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    return argv


def recorded_args(cfg_path):
    """The `args` a stage recorded in its `<out>.config.json` (files.write_config)."""
    cfg = files.read_json(cfg_path, "stage config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("args"), dict):
        raise InputError(f"{cfg_path}: no 'args' object (not written by probe.py?)")
    return cfg["args"]


def check_same_query(state0, state1):
    """The premise of knowledge flow: M~ was asked exactly what M0 was asked. Compares the two
    probes' recorded arguments, all but PROBE_PLACE_ARGS; stops with the differences otherwise."""
    def query(path):
        return {k: v for k, v in recorded_args(f"{path}.config.json").items()
                if k not in PROBE_PLACE_ARGS}
    a0, a1 = query(state0), query(state1)
    diff = sorted(k for k in set(a0) | set(a1) if a0.get(k) != a1.get(k))
    if diff:
        raise InputError(
            f"{state1}: the re-probe did not repeat the initial query ({state0}): " +
            ", ".join(f"{k} {a0.get(k)!r} -> {a1.get(k)!r}" for k in diff))


def run(argv):
    """Run a stage's command as a user would (printed first); a failure stops rehearse.py."""
    runs.run_command(argv, log="[rehearse] ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="M0: hub id or local safetensors folder")
    p.add_argument("--items", required=True, help="pool items (JSONL)")
    p.add_argument("--state", required=True, help="M0's knowledge state (probe.py output)")
    p.add_argument("--out", required=True, help="rehearsal folder")
    p.add_argument("--size", type=int, default=REHEARSAL_SIZE, help="rehearsal set size (SPEC 3)")
    p.add_argument("--mcqa-reader", choices=("letter", "option"), default="letter",
                   help="MCQA target: gold letter (real models) or gold option text (the world)")
    p.add_argument("--rehearsal-target", choices=("gold", "modal"), default="gold",
                   help="OEQA target: the gold answer (what ran) or the modal correct sample")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the rehearsal draw, passed on to finetune.py --seed")
    p.add_argument("--trust-remote-code", action="store_true",
                   help=models.TRUST_HELP + " (passed to finetune.py; the re-probe repeats the "
                        "initial probe's choice)")
    p.add_argument("--launcher", default="",
                   help="command in front of the training and the re-probe, e.g. \"torchrun "
                        "--standalone --nproc_per_node 2\" (default: this Python, one process); "
                        "rehearse.py itself always runs as one process")
    p.epilog = ("finetune.py flags for the rehearsal run go after `--`, each quoted once (as "
                "torchrun takes its script's flags): rehearse.py ... -- --lr 1e-3 --epochs 3. They "
                "follow rehearse's own `--warmup-ratio 0 --seed S` (SPEC 6: the RAIT recipe with no "
                "warm-up), so they may override them; finetune.py checks them")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.train_flags = argv[cut + 1:]                    # finetune.py's flags, as given
    bad = ["--size must be >= 1"] if a.size < 1 else []
    try:
        shlex.split(a.launcher)
    except ValueError as e:
        bad.append(f"--launcher: {e}")
    if runs.dist_info()[1] > 1:
        bad.append("run rehearse.py as one process; --launcher scales out its training and "
                   "re-probe")
    if bad:
        p.error("; ".join(bad))
    return a


def main(argv=None):
    a = parse_args(argv)
    files.check_output(os.path.join(a.out, "flow.jsonl"))
    items = files.read_jsonl(a.items, check=files.check_item)
    by_id = {it["id"]: it for it in items}
    states = {s["id"]: s for s in files.read_jsonl(a.state, check=files.check_state)}
    missing = [i for i in by_id if i not in states]
    if missing or len(states) != len(by_id):
        raise InputError(f"{a.state}: ids do not match {a.items} ({len(missing)} missing, "
                         f"e.g. {(missing or sorted(set(states) - set(by_id)))[0]!r})")
    argv_probe = probe_argv(a.state, a.model, a.items, os.path.join(a.out, "adapter"),
                            os.path.join(a.out, "probe.jsonl"))
    # CRaFT stage 1, step 1: the rehearsal set (SPEC 3), BASIC prompt, original answer
    chosen, n_ok = select_rehearsal(items, states, a.size, a.seed)
    makeup = rehearsal_makeup(chosen, n_ok, states, a.size)
    print(f"[rehearse] {n_ok} of {len(items)} items qualify for rehearsal (SPEC 3); using "
          f"{len(chosen)}" + ("" if n_ok >= a.size else
                              f" (short of {a.size}: {makeup['passed_filter']} passed the filter, "
                              f"{makeup['fill_ups']} fill-ups, the best of the rest by mu, then "
                              "sigma)"), file=sys.stderr)
    examples = []
    for i in chosen:
        it = by_id[i]
        target = (modal_correct(states[i], it) if a.rehearsal_target == "modal" and
                  it["task"] == "oeqa" else models.target_of(it, a.mcqa_reader))
        examples.append({"id": i, "prompt": models.user_prompt(it, "basic"), "target": target,
                         "weight": 1.0, "kind": "van", "method": "rehearsal"})
    train = os.path.join(a.out, "train.jsonl")
    files.write_jsonl(train, examples)
    # step 2: the short rehearsal fine-tune: finetune.py, SPEC 6 with no warm-up (resumes on rerun)
    adapter = os.path.join(a.out, "adapter")
    argv_train = ["--model", a.model, "--train", train, "--out", adapter, "--warmup-ratio", "0",
                  "--seed", str(a.seed)] + (["--trust-remote-code"] if a.trust_remote_code else [])
    run(runs.stage_command("finetune.py", argv_train + a.train_flags, a.launcher))
    # step 3: the same knowledge query on M~ (probe.py with the adapter; resumes on rerun)
    run(runs.stage_command("probe.py", argv_probe, a.launcher))
    check_same_query(a.state, os.path.join(a.out, "probe.jsonl"))
    # step 4: knowledge flow per item (CRaFT §3.2)
    s1 = {s["id"]: s for s in files.read_jsonl(os.path.join(a.out, "probe.jsonl"),
                                                check=files.check_state)}
    flows = [{"id": i, "mu0": states[i]["mu"], "mu1": s1[i]["mu"],
              "flow": knowledge_flow(states[i]["mu"], s1[i]["mu"]),
              "sigma0": states[i]["sigma"], "sigma1": s1[i]["sigma"]}     # dsigma: recorded only
             for i in (it["id"] for it in items)]
    summary = flow_summary(flows, by_id)
    summary.update(rehearsal=makeup)
    files.write_jsonl(os.path.join(a.out, "flow.jsonl"), flows)
    files.write_json(os.path.join(a.out, "flow_summary.json"), summary)
    files.write_config(os.path.join(a.out, "flow.jsonl"), a, rehearsal=makeup)
    print_flow_summary(summary)


if __name__ == "__main__":
    runs.cli(main)

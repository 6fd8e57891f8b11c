"""pipeline.py: every stage, every method, both tasks, in order (what `make all` runs).

    python pipeline.py                                         # the embedded world, seed 0
    python pipeline.py --seeds 0 1 2                           # mean and std per report cell
    python pipeline.py --worlds 0 1 2                          # 3 worlds, each with its own seed
    python pipeline.py --model meta-llama/Llama-2-7b-chat-hf --data paper     # on a GPU machine

Per task and seed, in runs/<model-slug>/<task>/s<seed>/ (world seed w > 0: runs/world-w<w>/):
  probe.py -> probe_init.jsonl; rehearse.py -> rehearsal/; construct.py -> <method>/train.jsonl;
  finetune.py -> <method>/adapter/; evaluate.py -> {init_basic,init_refuse,<method>}/pred_{id,ood}
  .jsonl; evaluate.py --report -> report.md, results.json, ths.svg. The grait-less row first
  trains the LESS warm-up, finetune.py -> less-warmup/adapter/ (GRAIT_ROWS, LESS_WARMUP); the
  cor-token and craft-token rows fine-tune with --loss-reduction token (TOKEN_ROWS).
Each stage runs as the command a user would type, in a subprocess, printed first with any
environment setting it gets (copy it into a shell at the repository root to make the same file).
Independent stages (tasks, seeds, methods) run at once, --jobs of them, each with one torch
thread (OMP_NUM_THREADS=1) so they share the cores. A stage whose command and input files are
unchanged since its last success is skipped (the key is recorded in `<output>.stage.json`); an
interrupted stage resumes from its own partial files. Wall times per stage go to
runs/<model-slug>/times.md (runs/times.md with several worlds); with several seeds,
runs/<model-slug>/report.md gives the mean and standard deviation of every cell; with several
worlds, runs/worlds.md does so over the worlds (each world's own M0, items and run seed). The
world's recipe (the flags each stage gets on it, and why) is world.RECIPE.
"""
import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import re
import shlex
import statistics
import sys
import threading
import time

from kernels.base import InputError
from rait import files
from rait import runs
from construct import METHODS, PAPER_METHODS
from world import RECIPE as WORLD_RECIPE

REHEARSAL_SHARE = 0.1   # rehearsal set: 10% of a small pool, at most SPEC 3's 1,000 (of 14k)
REHEARSAL_B, REHEARSAL_B_SEED = "rehearsal-b", 1000   # the world's 2nd rehearsal: folder, seed offset
POOL_KNOWN = "init_basic/pred_pool.jsonl"   # the world: Init-Basic's answers on the pool

# GRAIT's rows (issue 15 ablations): row -> (construct.py flags after --method grait, warm-up).
# Each row is a method folder and report row of its own (construct -> finetune -> evaluate); the
# variants run only when asked: --methods grait grait-code grait-uniform grait-released grait-less
GRAIT_ROWS = {
    "grait": ([], "rehearsal"),                             # SPEC 9 #7-#10 defaults
    "grait-code": (["--grait-weights", "code"], "rehearsal"),       # SPEC 5.5: released formula
    "grait-uniform": (["--grait-weights", "uniform"], "rehearsal"),  # SPEC 5.5 (i): what ran
    "grait-released": (["--grait-select", "released"], "rehearsal"),  # SPEC 5.4 quirk (b)
    "grait-less": ([], "less"),                             # SPEC 5.3 step 1: the LESS warm-up
}
# Loss-weighting rows (issue 27 ablation): row -> the method whose training set it builds (the same
# construct.py command into its own folder), fine-tuned with `--loss-reduction token`, the
# per-token weighting of the released packed runs (SPEC 6), instead of SPEC 9 #11's per-example
# mean. Run when asked: --methods cor cor-token craft craft-token
TOKEN_ROWS = {"cor-token": "cor", "craft-token": "craft"}
# The default warm-up is rehearse.py's adapter (SPEC 9 #10): the pipeline trains it anyway, it is
# trained on CRaFT's rehearsal set, which is what GRAIT's LESS warm-up was trained on too, and it
# costs nothing extra. `less` reproduces the released warm-up instead: finetune.py on the same
# rehearsal set with LESS's recipe (SPEC 5.3 step 1, LESS scripts/train/base_training_args.sh),
# on the world as on a real model (it reproduces a recipe; nothing in it was tuned here).
LESS_WARMUP = ["--lora-r", "128", "--lora-alpha", "512", "--lora-dropout", "0.1",
               "--target-modules", "q_proj,k_proj,v_proj,o_proj",
               "--lr", "2e-5", "--schedule", "linear", "--warmup-ratio", "0.03",
               "--weight-decay", "0", "--epochs", "4", "--format", "tulu",
               "--batch-size", "1", "--grad-accum", "32"]    # per device 1 x accumulation 32


def run_stage(label, cmd, out, inputs, env, running):
    """Run one stage's command (env: its environment settings) unless `out` is still what an
    earlier run of the same command on inputs of the same contents made (its digest is in the
    stage marker); returns (label, seconds, how). A failure ends the run with one line."""
    # the key leaves out the interpreter's path (cmd[0]): a moved checkout or venv reuses its runs
    key = hashlib.sha256(json.dumps([cmd[1:], [files.digest(i) for i in inputs]]).encode()).hexdigest()
    marker = out and out.rstrip("/") + ".stage.json"
    if out and os.path.exists(out) and os.path.exists(marker):
        made = files.read_cache(marker, "stage marker", "[pipeline]")   # damaged: runs again
        if made.get("key") == key and made.get("out") == files.digest(out):
            print(f"[pipeline] skip {label}: unchanged", file=sys.stderr)
            return label, 0.0, "skipped"
        if made.get("key") == key:      # truncated, edited or half-replaced since (issue 17)
            print(f"[pipeline] {label}: {out} changed since this stage made it; running again",
                  file=sys.stderr)
    t0 = time.time()
    rc = runs.run_command(cmd, env, log=f"[pipeline] {label}: ", running=running, check=False)
    if rc:
        sys.exit(f"[pipeline] {label} failed (exit {rc}); rerun the same command to resume")
    dt = time.time() - t0
    if out:     # world.py keeps its own cache (world.config.json)
        files.write_json(marker, {"key": key, "out": files.digest(out), "seconds": round(dt, 1),
                                  "cmd": cmd, "env": env})
    return label, dt, "ran"


def slug(model, data="paper"):
    """The run folder's name: `world`; a hub id with `--` for `/` (meta-llama--Llama-2-7b-chat-hf);
    a local model folder by its own name; `-geo` added on the GeoNames facts, so that one model's
    paper and geo runs never share a folder."""
    if model == "world":
        return "world"
    name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model.strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name) + ("-geo" if data == "geo" else "")


def world_dir(out, w):
    """The folder of the world built with seed w (and of its runs): runs/world for seed 0."""
    return os.path.join(out, "world" if w == 0 else f"world-w{w}")


def task_inputs(a, root, task):
    """(model, pool, shots, test_id, test_ood, mcqa reader) for a task; root: the run folder of
    the model (for the world: the world's own folder, which holds its model and items). MCQA is
    read by option text on the world and on geo (SPEC 10; small models are at chance with
    letters), by letter on the paper benchmarks (SPEC 2.1)."""
    if a.model == "world":
        w = root
        d = os.path.join(w, task)
        return (os.path.join(w, "model"), f"{d}/train.jsonl", f"{d}/shots.jsonl",
                f"{d}/test_id.jsonl", f"{d}/test_ood.jsonl", "option")
    d = os.path.join(a.data_dir, task)
    paths = [f"{d}/{s}.jsonl" for s in ("train", "shots", "test_id", "test_ood")]
    missing = [f for f in paths if not os.path.isfile(f) and "shots" not in f]
    if missing:
        how = "data.py geo" if a.data == "geo" else "data.py <benchmark>"
        raise InputError(f"{missing[0]}: missing; convert the benchmarks first (make data "
                         f"DATA={a.data}, or {how} --out {a.data_dir}; see data.py --help)")
    if a.limit:
        paths = [limited(f, a.limit, os.path.join(root, task, "items"))
                 if os.path.isfile(f) and "shots" not in f else f for f in paths]
    return (a.model, *paths, "option" if a.data == "geo" else "letter")


def limited(path, n, folder):
    """A seeded subsample of at most n items of `path` (same order), for smaller budgets."""
    rows = files.read_jsonl(path, check=files.check_item)
    out = os.path.join(folder, os.path.basename(path))
    if len(rows) > n:
        keep = sorted(random.Random(0).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    if not os.path.exists(out) or files.read_jsonl(out) != rows:
        files.write_jsonl(out, rows)
    return out


def task_dir(root, task, seed):
    return os.path.join(root, task, f"s{seed}")


def unit_label(root, task, seed):
    """How the stage log and times.md name a task and seed: `world-w1/oeqa/s1`."""
    return f"{os.path.basename(root)}/{task}/s{seed}"


# A stage: (label, command, output, input files). A unit: stages that run in order.
def prepare(a, root, task, seed, paths):
    """Probe M0 on the pool (SPEC 2), then rehearse and measure knowledge flow (SPEC 3).
    paths: task_inputs(a, root, task), as for method() and report()."""
    model, pool, shots, _, _, reader = paths
    R, tag, world = task_dir(root, task, seed), unit_label(root, task, seed), a.model == "world"
    state = f"{R}/probe_init.jsonl"
    args = ["--model", model, "--items", pool, "--task", task, "--out", state, "--seed", str(seed)]
    if task == "mcqa":
        args += ["--mcqa-reader", reader] + ([] if reader == "option" else ["--shots", shots])
    elif not world and os.path.exists(shots):
        args += ["--shots", shots]
    if task == "mcqa" and a.data == "geo":     # the bare question: README "A real chat model"
        args += ["--option-context", "question"]
    args += (WORLD_RECIPE["probe"][task] if world else []) + shlex.split(a.probe_args)
    stages = [(f"{tag} probe", runs.stage_command("probe.py", args), state, [model, pool])]
    if a.until == "probe":
        return stages
    with open(pool) as f:
        n_pool = sum(1 for _ in f)
    args = ["--model", model, "--items", pool, "--state", state, "--out", f"{R}/rehearsal",
            "--mcqa-reader", reader, "--seed", str(seed),
            "--size", str(min(1000, max(32, round(REHEARSAL_SHARE * n_pool))))]
    train_flags = (WORLD_RECIPE["rehearse"][task] if world else []) + shlex.split(a.rehearse_args)
    if train_flags:   # finetune.py's flags after `--`, each quoted once
        args += ["--", *train_flags]
    stages.append((f"{tag} rehearse", runs.stage_command("rehearse.py", args),
                   f"{R}/rehearsal/flow.jsonl", [model, pool, state]))
    if world:   # flow reliability (issue 26): the same rehearsal with another seed
        args = [x if x != f"{R}/rehearsal" else f"{R}/{REHEARSAL_B}" for x in args]
        args[args.index("--seed") + 1] = str(seed + REHEARSAL_B_SEED)
        stages.append((f"{tag} rehearse (2nd seed)", runs.stage_command("rehearse.py", args),
                       f"{R}/{REHEARSAL_B}/flow.jsonl", [model, pool, state]))
    return stages


def pool_known(a, root, task, seed, paths):
    """Init-Basic on the training pool (world): what M0 answers correctly under the BASIC prompt,
    labelled by evaluate.py exactly as the Init-Basic row is: the oracle's split and every
    summary's "IdK set: M0 knows" (issue 26)."""
    model, pool, _, _, _, reader = paths
    return [evaluate_stage(a, f"{unit_label(root, task, seed)} evaluate init_basic pool", model,
                           pool, "basic", f"{task_dir(root, task, seed)}/{POOL_KNOWN}", reader)]


def evaluate_stage(a, label, model, items, prompt, out, reader, adapter=None):
    """One evaluate.py stage: answer `items` with `prompt` (and an adapter), labels to `out`."""
    args = ["--model", model, "--items", items, "--prompt", prompt, "--out", out,
            "--mcqa-reader", reader]
    args += (["--adapter", adapter] if adapter else []) + shlex.split(a.eval_args)
    return (label, runs.stage_command("evaluate.py", args), out,
            [model, items] + ([adapter] if adapter else []))


def method(a, root, task, seed, paths, m):
    """Construct one method's RAIT set (SPEC 4-5), fine-tune on it (SPEC 6), evaluate (SPEC 7).
    m = init_basic / init_refuse: evaluate M0 with the BASIC / REFUSE prompt."""
    stages = []
    model, pool, _, test_id, test_ood, reader = paths
    R, tag, world = task_dir(root, task, seed), unit_label(root, task, seed), a.model == "world"
    state, flow, adapter = f"{R}/probe_init.jsonl", f"{R}/rehearsal/flow.jsonl", None
    if not m.startswith("init_"):
        train, adapter = f"{R}/{m}/train.jsonl", f"{R}/{m}/adapter"
        base = "grait" if m in GRAIT_ROWS else TOKEN_ROWS.get(m, m)
        args = ["--method", base, "--items", pool, "--state", state,
                "--flow", flow, "--out", train, "--mcqa-reader", reader, "--seed", str(seed)]
        inputs = [pool, state, flow]
        if world:   # the judgement of what M0 knows, and CRSS with M0 (issue 26)
            args += ["--known", f"{R}/{POOL_KNOWN}", "--model", model, "--crss"]
            args += WORLD_RECIPE["construct"][task]
            inputs.append(f"{R}/{POOL_KNOWN}")
        if m in GRAIT_ROWS:
            flags, warm = GRAIT_ROWS[m]
            warmup = f"{R}/rehearsal/adapter"
            if warm == "less":      # SPEC 5.3 step 1 on the rehearsal set, for this row only
                rehearsal, warmup = f"{R}/rehearsal/train.jsonl", f"{R}/less-warmup/adapter"
                cmd = ["--model", model, "--train", rehearsal, "--out", warmup, "--seed",
                       str(seed)] + LESS_WARMUP
                stages.append((f"{tag} finetune less-warmup", runs.stage_command(
                    "finetune.py", cmd), warmup, [model, rehearsal]))
            args += ([] if world else ["--model", model]) + ["--warmup", warmup] + flags
            args += WORLD_RECIPE["grait"][task] if world else []
            inputs.append(warmup)
        args += shlex.split(a.construct_args)
        stages.append((f"{tag} construct {m}", runs.stage_command("construct.py", args), train,
                       inputs))
        if a.until == "construct":
            return stages
        args = ["--model", model, "--train", train, "--out", adapter, "--seed", str(seed)]
        args += (WORLD_RECIPE["finetune"][task] if world else []) + shlex.split(a.stage_args)
        args += ["--loss-reduction", "token"] if m in TOKEN_ROWS else []
        stages.append((f"{tag} finetune {m}", runs.stage_command("finetune.py", args), adapter,
                       [model, train]))
    if a.until in ("construct", "finetune"):
        return stages
    for split, items in (("id", test_id), ("ood", test_ood)):
        stages.append(evaluate_stage(a, f"{tag} evaluate {m} {split}", model, items,
                                     "basic" if m == "init_basic" else "refuse",
                                     f"{R}/{m}/pred_{split}.jsonl", reader, adapter))
    return stages


def report(a, root, task, seed, paths):
    """report.md, results.json and ths.svg of one task and seed (evaluate.py --report)."""
    _, _, _, test_id, test_ood, _ = paths
    R = task_dir(root, task, seed)
    rows = ["init_basic", "init_refuse"] + a.methods
    args = ["--report", R, "--items-id", test_id, "--items-ood", test_ood, "--seed", str(seed)]
    return [(f"{unit_label(root, task, seed)} report", runs.stage_command("evaluate.py", args),
             f"{R}/report.md", [f"{R}/{n}/pred_{s}.jsonl" for n in rows for s in ("id", "ood")])]


def build_world(folder, seed, world_args):
    """world.py --out <folder> --seed <seed> [world args]: one embedded world (world.py reuses a
    cached one with the same configuration)."""
    args = ["--out", folder, "--seed", str(seed)] + shlex.split(world_args)
    return [(os.path.basename(folder), runs.stage_command("world.py", args), None, [])]


def in_parallel(jobs, units, times, one_thread=False):
    """Run units (lists of stages, each list in order) at once in up to `jobs` threads, each
    stage a subprocess, and add their stage times, in the order of `units`, to `times`. Stages
    running beside others get one torch thread each (OMP_NUM_THREADS=1), a wave of one unit (or
    --jobs 1) torch's default; one_thread: every stage one thread (the world: float sums then
    never depend on the machine's core count or load, issue 26). The first failure, or Ctrl-C, stops the running stages at once
    (SIGINT: each keeps its partial work for the next run) and then the run."""
    env = {"OMP_NUM_THREADS": "1"} if one_thread or (jobs > 1 and len(units) > 1) else {}
    running, stopping = set(), threading.Event()

    def unit(stages):
        done = []
        for label, cmd, out, inputs in stages:
            if stopping.is_set():
                break
            done.append(run_stage(label, cmd, out, inputs, env, running))
        return done
    pool = cf.ThreadPoolExecutor(min(jobs, len(units)))
    futures = [pool.submit(unit, u) for u in units]
    try:
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f.done() and f.exception()]
        if failed:
            raise failed[0]
        for f in futures:
            times += f.result()
    except BaseException as e:
        stopping.set()      # no new stages; stop the running ones, also one starting just now
        grace = runs.STOP_GRACE if isinstance(e, KeyboardInterrupt) else 0.0
        while not all(f.done() for f in futures):
            runs.stop(list(running), grace)
            cf.wait(futures, timeout=0.1)
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def mean_sd(v):
    """`mean ± sample std` of the values (std 0 for one), or `-` for none; the mean as
    evaluate.fmt writes it (no `-0.0`)."""
    from evaluate import fmt
    if not v:
        return "-"
    return f"{fmt(statistics.mean(v))} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"


def seed_table(title, what_varies, folders):
    """Mean and standard deviation over runs (seeds, or worlds) of every cell of the per-run
    results.json, then each RAIT set's static conflicts and each model's quadrants (ID test)."""
    from evaluate import ROW_NAMES, fmt, vs_cor_over_runs
    lines = [f"# {title}", "", "Rates in % of all test items; ± is the sample standard deviation "
             f"over the runs. {what_varies}", ""]
    for task, dirs in folders.items():
        res = [files.read_json(os.path.join(d, "results.json"), "results") for d in dirs]
        rows = list((res[0]["id"] or res[0]["ood"])["rows"])
        lines += [f"## {task}", "", "| method | ID Pc | ID Pw | ID Pr | ID THS | OOD Pc | OOD Pw | "
                  "OOD Pr | OOD THS |", "|---|" + "---|" * 8]
        for row in rows:
            cells = [mean_sd([r[split]["rows"][row]["rates"][k] for r in res if r.get(split)
                              and r[split]["rows"].get(row, {}).get("rates", {}).get(k) is not None])
                     for split in ("id", "ood") for k in ("pc", "pw", "pr", "ths")]
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        # issue 27: ranking by confidence, and refusal recall against Init-Basic's answers
        lines += ["", "| method | ID AP | ID AUROC | OOD AP | OOD AUROC | ID refusal recall |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            e = [(r.get(split) or {}).get("rows", {}).get(row, {}) for r in res
                 for split in ("id", "ood")]
            cells = [mean_sd([x[k] for x in e[i::2] if x.get(k) is not None])
                     for i in (0, 1) for k in ("ap", "auroc")]
            cells.append(mean_sd([x["quadrants_init"]["refusal_recall"] for x in e[0::2]
                                  if x.get("quadrants_init", {}).get("refusal_recall") is not None]))
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        # every method minus Cor-RAIT over the runs, paired (issue 26)
        if all(r.get("id") and r["id"].get("item_labels") for r in res):
            lines += ["", "Every method minus Cor-RAIT, THS difference averaged over the runs with a "
                      "paired bootstrap 95% interval (each run's test items resampled on their own):",
                      "", "| method | ID THS - Cor | OOD THS - Cor |", "|---|---|---|"]
            for row in rows:
                if row in ("init_basic", "cor"):
                    continue
                cells = []
                for split in ("id", "ood"):
                    d = vs_cor_over_runs([r[split] for r in res], row)
                    cells.append("-" if d is None else fmt(d[0], d[1]))
                lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
            # the flow filter alone (issue 26, dynamic conflicts): CRaFT and CorCer differ in it only
            d = [vs_cor_over_runs([r[split] for r in res], "craft", base="corcer")
                 for split in ("id", "ood")]
            if None not in d:
                lines += ["", "CRaFT minus CorCer (w/o flow), the flow filter alone, paired as "
                          f"above: ID {fmt(d[0][0], d[0][1])}, OOD {fmt(d[1][0], d[1][1])}"]
        # the RAIT sets (construct summaries): IdK examples M0 knows (Init-Basic's judgement), the
        # planted conflicts among them, CRSS; then the ID quadrants against Init-Basic's answers
        lines += ["", "| method | IdK set: M0 knows | IdK: unseen twins | IdK: latent | CRSS | "
                  "ID over-refusal | ID hallucination | ID refusal precision |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if row.startswith("init_"):
                continue
            sets = [r["sets"][row] for r in res if row in (r.get("sets") or {})]
            q = [r["id"]["rows"][row].get("quadrants_init", {}) for r in res
                 if r.get("id") and row in r["id"]["rows"]]
            cells = [mean_sd([100 * v for v in vals if v is not None]) for vals in (
                [s["idk"].get("m0_known_share") for s in sets],
                [s["idk"].get("unseen_twin_share") for s in sets],
                [s["idk"].get("latent_share") for s in sets], [s.get("crss") for s in sets])]
            cells += [mean_sd([x[k] for x in q if x.get(k) is not None])
                      for k in ("over_refusal", "hallucination", "refusal_precision")]
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        rel = [r["flow_reliability"] for r in res if r.get("flow_reliability")]
        if rel:
            lines += ["", "Flow reliability over the runs (IdK candidates whose dmu has the same "
                      "sign after two rehearsal seeds, %): all " +
                      mean_sd([100 * x["agree"] for x in rel]) + "; those that moved " +
                      mean_sd([100 * x["moved_agree"] for x in rel if x["moved_agree"] is not None])]
            groups = [x["groups"] for x in rel if x.get("groups")]
            if groups:
                lines += ["", "Flow by planted group over the runs (IdK candidates, first "
                          "rehearsal, %): " + "; ".join(
                              f"{g}: rose {mean_sd([100 * x[g]['rose_a'] for x in groups if x[g]['n']])}"
                              f", fell {mean_sd([100 * x[g]['fell_a'] for x in groups if x[g]['n']])}"
                              for g in groups[0])]
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world", help="`world` (embedded default) or a hub id / folder")
    p.add_argument("--data", choices=("world", "paper", "geo"), default="world",
                   help="`paper`: MMLU->ARC (MCQA) and TriviaQA->NQ (OEQA) items from --data-dir "
                        "(make data DATA=paper); `geo`: GeoNames facts from --data-dir, MCQA by "
                        "the option reader (make data DATA=geo, or data.py geo)")
    p.add_argument("--data-dir", default=None,
                   help="data.py item root (default runs/data for --data paper, runs/data-geo for "
                        "geo: separate, so that one's files never stand in for the other's)")
    p.add_argument("--tasks", nargs="+", default=list(files.TASKS), help="mcqa and/or oeqa")
    p.add_argument("--methods", nargs="+", default=None,
                   help="RAIT methods to construct, train and evaluate (default: van cor corcer "
                        "wocer craft grait, and on the world the oracle row); GRAIT's ablation "
                        f"rows on request: {' '.join(list(GRAIT_ROWS)[1:])} (GRAIT_ROWS); the "
                        f"loss-weighting rows {' '.join(TOKEN_ROWS)} (TOKEN_ROWS, issue 27)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="pipeline seeds (default: the world's own seed; 0 for a real model)")
    p.add_argument("--worlds", nargs="+", type=int, default=None,
                   help="world seeds (default 0): one world each, built by world.py --seed, in "
                        "runs/world (seed 0) and runs/world-w<seed>; with several, runs/worlds.md "
                        "has mean ± std over them")
    p.add_argument("--out", default="runs", help="run root")
    p.add_argument("--limit", type=int, default=0,
                   help="--data paper or geo: at most this many items per file (seeded subsample; "
                        "0 = all)")
    p.add_argument("--world-args", default="", help="extra world.py flags (e.g. --preset small)")
    p.add_argument("--until", choices=("probe", "rehearse", "construct", "finetune", "all"),
                   default="all", help="stop after this stage (make probe / rehearse / ...)")
    p.add_argument("--probe-args", default="", help="extra probe.py flags (the rehearsal's "
                   "re-probe repeats them, SPEC 3), e.g. --batch-size 8")
    p.add_argument("--construct-args", default="", help="extra construct.py flags for every "
                   "method, e.g. \"--grad-batch-size 8 --projection rademacher\" for GRAIT")
    p.add_argument("--stage-args", "--finetune-args", default="",
                   help="extra finetune.py flags for the method runs, e.g. --epochs 2")
    p.add_argument("--rehearse-args", default="",
                   help="extra finetune.py flags for the rehearsal run (after rehearse.py's `--`, "
                        "after the world's recipe); a single flag as --rehearse-args=--full")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags (e.g. --max-new-tokens 8)")
    p.add_argument("--jobs", type=int, help="stages run at once, each a process with one torch "
                   "thread (default: the CPU count for the world, 1 for a real model, whose "
                   "stages share one accelerator)")
    a = p.parse_args()
    if a.limit < 0:
        p.error(f"--limit must be >= 0 (0 = all items), got {a.limit}")
    if a.model == "world" and a.data != "world":
        raise InputError(f"--data {a.data} needs --model (a chat model hub id or folder)")
    if a.methods is None:
        a.methods = list(PAPER_METHODS) + (["oracle"] if a.model == "world" else [])
    known = (*METHODS, *GRAIT_ROWS, *TOKEN_ROWS)
    unknown = [m for m in a.methods if m not in known]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)} (expected some of "
                f"{', '.join(dict.fromkeys(known))})")
    if a.data_dir is None:
        a.data_dir = files.default_data_dir(a.data)
    if a.jobs is None:
        a.jobs = (os.cpu_count() or 1) if a.model == "world" else 1
    if a.jobs < 1:
        raise InputError(f"--jobs {a.jobs}: must be at least 1")
    if a.worlds is None:
        a.worlds = [0]
    elif a.model != "world":
        raise InputError("--worlds applies to the embedded world only (--model world)")
    t_start, times = time.time(), []
    roots = ([world_dir(a.out, w) for w in a.worlds] if a.model == "world"
             else [os.path.join(a.out, slug(a.model, a.data))])
    if a.model == "world":      # cached when a world's configuration is unchanged
        in_parallel(a.jobs, [build_world(r, w, a.world_args) for r, w in zip(roots, a.worlds)],
                    times, one_thread=True)
    # run seeds: --seeds for every world, else each world's own seed (world 0: seed 0)
    seeds = {r: a.seeds or ([w] if a.model == "world" else [0]) for r, w in zip(roots, a.worlds)}
    # once, here: fail early on missing data, write the --limit subsamples, hand the paths to units
    paths = {(r, task): task_inputs(a, r, task) for r in roots for task in a.tasks}
    cells = [(a, r, t, s, paths[r, t]) for r in roots for t in a.tasks for s in seeds[r]]
    # The stages of a task and seed depend on each other only through probe -> rehearse -> the
    # methods -> the report: run each of these three waves across tasks, seeds and methods at once.
    world = a.model == "world"        # one thread per stage: the same numbers on any machine
    in_parallel(a.jobs, [prepare(*cell) for cell in cells] +
                ([pool_known(*cell) for cell in cells] if world and
                 a.until not in ("probe", "rehearse") else []), times, world)
    if a.until not in ("probe", "rehearse"):
        rows = a.methods + (["init_basic", "init_refuse"] if a.until == "all" else [])
        in_parallel(a.jobs, [method(*cell, m) for cell in cells for m in rows], times, world)
    if a.until == "all":
        in_parallel(a.jobs, [report(*cell) for cell in cells], times, world)
    wall = time.time() - t_start
    md = ["# Wall time per stage", "", f"{a.jobs} job(s) at once; wall time {wall:.1f} s.", "",
          "| stage | seconds | |", "|---|---|---|"]
    md += [f"| {label} | {t:.1f} | {how} |" for label, t, how in times]
    md += [f"| **sum of stages** | **{sum(t for _, t, _ in times):.1f}** | |",
           f"| **wall** | **{wall:.1f}** | |", ""]
    files.atomic_write_text(os.path.join(roots[0] if len(roots) == 1 else a.out, "times.md"),
                             "\n".join(md))
    print("\n".join(md), file=sys.stderr)
    if a.until != "all":
        return
    for r in roots:
        folders = {t: [task_dir(r, t, s) for s in seeds[r]] for t in a.tasks}
        if len(seeds[r]) > 1:
            files.atomic_write_text(os.path.join(r, "report.md"), seed_table(
                f"{os.path.basename(r)}: mean ± std over seeds {' '.join(map(str, seeds[r]))}",
                "The seed drives the probe's sampling, the rehearsal draw, the fine-tuning order "
                "and dropout, and GRAIT's projection; the model M0 and the items stay the same.",
                folders))
        for dirs in folders.values():
            print(open(os.path.join(dirs[0], "report.md")).read())
        if len(seeds[r]) > 1:
            print(open(os.path.join(r, "report.md")).read())
    if len(roots) > 1:
        folders = {t: [task_dir(r, t, s) for r in roots for s in seeds[r]] for t in a.tasks}
        text = seed_table(
            f"world: mean ± std over worlds {' '.join(map(str, a.worlds))}",
            "Each world is built with its own seed (people, facts, exposures, corpus, M0's "
            "initialisation and pre-training order) and runs the pipeline with "
            + ("that seed" if not a.seeds else f"seeds {' '.join(map(str, a.seeds))}") + ".",
            folders)
        files.atomic_write_text(os.path.join(a.out, "worlds.md"), text)
        print(text)

if __name__ == "__main__":
    runs.cli(main)

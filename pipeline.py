"""pipeline.py: every stage, every method, both tasks, in order (what `make all` runs).

    python pipeline.py                                         # the embedded world, seed 0
    python pipeline.py --seeds 0 1 2                           # mean and std per report cell
    python pipeline.py --worlds 0 1 2                          # 3 worlds, each with its own seed
    python pipeline.py --model meta-llama/Llama-2-7b-chat-hf --data paper     # on a GPU machine

Per task and seed, in runs/<model-slug>/<task>/s<seed>/ (world seed w > 0: runs/world-w<w>/):
  probe.py -> probe_init.jsonl; rehearse.py -> rehearsal/; construct.py -> <method>/train.jsonl;
  finetune.py -> <method>/adapter/; evaluate.py -> {init_basic,init_refuse,<method>}/pred_{id,ood}
  .jsonl; evaluate.py --report -> report.md, results.json, ths.svg.
Each stage runs through its script's main(argv) with exactly the arguments a user would type
(the command is printed before it runs), in Python rather than a subprocess so torch is imported
once per process. Independent stages (tasks, seeds, methods) run at once in --jobs worker
processes of one torch thread each. A stage whose command and input files are unchanged since
its last success is skipped (the key is recorded in `<output>.stage.json`); an interrupted
stage resumes from its own partial files. Wall times per stage go to runs/<model-slug>/times.md
(runs/times.md with several worlds); with several seeds, runs/<model-slug>/report.md gives the
mean and standard deviation of every cell; with several worlds, runs/worlds.md does so over the
worlds (each world's own M0, items and run seed).
"""
import argparse
import hashlib
import importlib
import json
import os
import random
import re
import shlex
import statistics
import sys
import time

from rait import files
from rait import runs
from construct import PAPER_METHODS

PY = sys.executable
# The world is tiny and its RAIT sets are small (hundreds of examples): the SPEC 6 recipe (lr 2e-4,
# effective batch 64, 3 epochs) makes only a handful of steps there, so the world run uses more,
# smaller steps, and rank 16 (r 64 exceeds half the world's hidden size of 128 and doubles the
# cost of a step). Real models get the SPEC 9 #12 defaults of finetune.py untouched.
# Epochs per task, measured with Cor-RAIT on the default world (seed 0, ID test, batch 8, lr 3e-3):
# OEQA refuses 36% after 5 epochs and 32% after 10; MCQA 25% after 3 and 35% after 5 epochs (with
# fewer unparsed answers), so 3: `make all` must stay under 10 minutes (DESIGN budgets). Before
# the world's corpus used the refusal's words (issue 13), OEQA needed 10 epochs and MCQA never
# refused: the refusal tokens had untrained embeddings.
WORLD_REHEARSAL = ["--batch-size", "16", "--grad-accum", "1", "--lr", "1e-3", "--epochs", "3",
                   "--lora-r", "16"]                                     # brief, as SPEC 3 wants
WORLD_FINETUNE = ["--batch-size", "8", "--grad-accum", "1", "--lr", "3e-3", "--lora-r", "16"]
WORLD_EPOCHS = {"mcqa": 3, "oeqa": 5}
# WORLD_OEQA_SHOTS: the world's OEQA knowledge query is 0-shot, not SPEC 2.2's 3-shot (as its MCQA
# is 0-shot, SPEC 10). The 1M-parameter model cannot use in-context shots: measured on the
# default world, after the 3 shots (birth city, job, colour) it expected a new question for the
# 4th relation ("What", p = 0.63), so its sampled correctness on instrument facts was 0.01 against
# a 0-shot greedy accuracy of 0.6, and every certainty-based method learnt to refuse all
# instrument questions and nothing else. 0-shot: mean mu 0.75 where M0 answers correctly
# (greedy), 0.06 where it does not, 0.36-0.46 per relation. Pre-training on 4-turn QA text did
# not help: the model then answered from the shots' famous people ("jeweler", p = 0.98).
REHEARSAL_SHARE = 0.1   # rehearsal set: 10% of a small pool, at most SPEC 3's 1,000 (of 14k)


def file_key(path):
    """Content hash of an input file or folder (size + mtime for files over 64 MiB)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
        if not f.endswith((".stage.json", ".config.json")) and "checkpoint" not in d)
    for p in paths:
        st = os.stat(p)
        h.update(p.encode())
        if st.st_size > 64 << 20:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def run(cmd, out, inputs, times, label):
    """Run one stage unless `out` exists with the same command and inputs; record wall time."""
    # the key leaves out the interpreter's path (cmd[0]): a moved checkout or venv reuses its runs
    key = hashlib.sha256(json.dumps([cmd[1:], [file_key(i) for i in inputs]]).encode()).hexdigest()
    marker = out.rstrip("/") + ".stage.json"
    if os.path.exists(out) and os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("key") == key:
                print(f"[pipeline] skip {label}: unchanged", file=sys.stderr)
                times.append((label, 0.0, "skipped"))
                return
    print(f"[pipeline] {label}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    stage = importlib.import_module(os.path.basename(cmd[1])[:-len(".py")])
    try:    # in-process: the same main(argv) and error handling as the command line
        runs.cli(lambda: stage.main(cmd[2:]))
    except SystemExit as e:
        if e.code:
            sys.exit(f"[pipeline] {label} failed (exit {e.code}); rerun `make all` to resume")
    dt = time.time() - t0
    files.write_json(marker, {"key": key, "seconds": round(dt, 1), "cmd": cmd})
    times.append((label, dt, "ran"))


def slug(model):
    return "world" if model == "world" else re.sub(r"[^A-Za-z0-9._-]+", "--", model.strip("/"))


def world_dir(out, w):
    """The folder of the world built with seed w (and of its runs): runs/world for seed 0."""
    return os.path.join(out, "world" if w == 0 else f"world-w{w}")


def task_inputs(a, root, task):
    """(model, pool, shots, test_id, test_ood, mcqa reader) for a task; root: the run folder of
    the model (for the world: the world's own folder, which holds its model and items)."""
    if a.model == "world":
        w = root
        d = os.path.join(w, task)
        return (os.path.join(w, "model"), f"{d}/train.jsonl", f"{d}/shots.jsonl",
                f"{d}/test_id.jsonl", f"{d}/test_ood.jsonl", "option")
    d = os.path.join(a.data_dir, task)
    paths = [f"{d}/{s}.jsonl" for s in ("train", "shots", "test_id", "test_ood")]
    missing = [f for f in paths if not os.path.isfile(f) and "shots" not in f]
    if missing:
        raise files.InputError(f"{missing[0]}: missing; convert the benchmarks first "
                                "(make data DATA=paper, see data.py --help)")
    if a.limit:
        paths = [limited(f, a.limit, os.path.join(root, task, "items"))
                 if os.path.isfile(f) and "shots" not in f else f for f in paths]
    return (a.model, *paths, "letter")


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


def prepare(a, root, task, seed, paths):
    """Probe M0 on the pool (SPEC 2), then rehearse and measure knowledge flow (SPEC 3).
    paths: task_inputs(a, root, task), as for method() and report()."""
    times = []
    model, pool, shots, _, _, reader = paths
    R, tag, world = task_dir(root, task, seed), unit_label(root, task, seed), a.model == "world"
    state = f"{R}/probe_init.jsonl"
    cmd = [PY, "probe.py", "--model", model, "--items", pool, "--task", task, "--out", state,
           "--seed", str(seed)]
    if task == "mcqa":
        cmd += ["--mcqa-reader", reader] + ([] if reader == "option" else ["--shots", shots])
    elif world:     # WORLD_OEQA_SHOTS
        cmd += ["--n-shots", "0"]
    elif os.path.exists(shots):
        cmd += ["--shots", shots]
    run(cmd, state, [model, pool], times, f"{tag} probe")
    if a.until == "probe":
        return times
    with open(pool) as f:
        n_pool = sum(1 for _ in f)
    cmd = [PY, "rehearse.py", "--model", model, "--items", pool, "--state", state, "--out",
           f"{R}/rehearsal", "--mcqa-reader", reader, "--seed", str(seed)]
    cmd += ["--size", str(min(1000, max(32, round(REHEARSAL_SHARE * n_pool))))]
    if world:
        cmd += WORLD_REHEARSAL
    run(cmd, f"{R}/rehearsal/flow.jsonl", [model, pool, state], times, f"{tag} rehearse")
    return times


def method(a, root, task, seed, paths, m):
    """Construct one method's RAIT set (SPEC 4-5), fine-tune on it (SPEC 6), evaluate (SPEC 7).
    m = init_basic / init_refuse: evaluate M0 with the BASIC / REFUSE prompt."""
    times = []
    model, pool, _, test_id, test_ood, reader = paths
    R, tag, world = task_dir(root, task, seed), unit_label(root, task, seed), a.model == "world"
    state, flow, adapter = f"{R}/probe_init.jsonl", f"{R}/rehearsal/flow.jsonl", None
    if not m.startswith("init_"):
        train, adapter = f"{R}/{m}/train.jsonl", f"{R}/{m}/adapter"
        cmd = [PY, "construct.py", "--method", m, "--items", pool, "--state", state, "--flow",
               flow, "--out", train, "--mcqa-reader", reader, "--seed", str(seed)]
        if m == "grait":
            cmd += ["--model", model, "--warmup", f"{R}/rehearsal/adapter"]
            if world:   # CPU: CountSketch instead of the dense projection (kernels/persample.py)
                cmd += ["--projection", "sketch"]
        run(cmd, train, [pool, state, flow], times, f"{tag} construct {m}")
        if a.until == "construct":
            return times
        recipe = WORLD_FINETUNE + ["--epochs", str(WORLD_EPOCHS[task])] if world else []
        cmd = [PY, "finetune.py", "--model", model, "--train", train, "--out", adapter,
               "--seed", str(seed)] + recipe + shlex.split(a.stage_args)
        run(cmd, adapter, [model, train], times, f"{tag} finetune {m}")
    if a.until in ("construct", "finetune"):
        return times
    for split, items in (("id", test_id), ("ood", test_ood)):
        out = f"{R}/{m}/pred_{split}.jsonl"
        cmd = [PY, "evaluate.py", "--model", model, "--items", items, "--prompt",
               "basic" if m == "init_basic" else "refuse", "--out", out, "--mcqa-reader", reader]
        cmd += (["--adapter", adapter] if adapter else []) + shlex.split(a.eval_args)
        run(cmd, out, [model, items] + ([adapter] if adapter else []), times,
            f"{tag} evaluate {m} {split}")
    return times


def report(a, root, task, seed, paths):
    """report.md, results.json and ths.svg of one task and seed (evaluate.py --report)."""
    times = []
    _, _, _, test_id, test_ood, _ = paths
    R = task_dir(root, task, seed)
    rows = ["init_basic", "init_refuse"] + a.methods
    run([PY, "evaluate.py", "--report", R, "--items-id", test_id, "--items-ood", test_ood,
         "--seed", str(seed)], f"{R}/report.md",
        [f"{R}/{n}/pred_{s}.jsonl" for n in rows for s in ("id", "ood")], times,
        f"{unit_label(root, task, seed)} report")
    return times


def worker_init():
    """Worker start-up: one torch thread per process, so --jobs processes share the cores; Ctrl-C
    ends a worker at once (its stage resumes on the next run, as after any kill)."""
    import signal
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def in_parallel(a, units, times):
    """Run units [(function, args)] in --jobs worker processes (in this process when 1) and add
    their stage times, in the order of `units`, to `times`. The first failure (or Ctrl-C) stops
    the run at once; the stages it cut short resume on the next run."""
    if a.jobs == 1 or len(units) == 1:
        for f, args in units:
            times += f(*args)
        return
    import concurrent.futures as cf
    import multiprocessing
    pool = cf.ProcessPoolExecutor(min(a.jobs, len(units)), multiprocessing.get_context("spawn"),
                                  initializer=worker_init)
    try:
        futures = [pool.submit(f, *args) for f, args in units]
        for fut in futures:
            times += fut.result()
    except BaseException as e:  # a failure or Ctrl-C: stop the running stages now, not after them
        for proc in (pool._processes or {}).values():   # Python 3.14: pool.terminate_workers()
            proc.terminate()
        if isinstance(e, cf.BrokenExecutor):
            sys.exit("[pipeline] a worker process died (killed, or out of memory: try a smaller "
                     "--jobs); rerun `make all` to resume")
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def mean_sd(v):
    """`mean ± sample std` of the values (std 0 for one), or `-` for none."""
    if not v:
        return "-"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"


def seed_table(title, what_varies, folders):
    """Mean and standard deviation over runs (seeds, or worlds) of every cell of the per-run
    results.json, then each RAIT set's static conflicts and each model's quadrants (ID test)."""
    from evaluate import ROW_NAMES
    lines = [f"# {title}", "", "Rates in % of all test items; ± is the sample standard deviation "
             f"over the runs. {what_varies}", ""]
    for task, dirs in folders.items():
        res = [json.load(open(os.path.join(d, "results.json"))) for d in dirs]
        rows = list((res[0]["id"] or res[0]["ood"])["rows"])
        lines += [f"## {task}", "", "| method | ID Pc | ID Pw | ID Pr | ID THS | OOD Pc | OOD Pw | "
                  "OOD Pr | OOD THS |", "|---|" + "---|" * 8]
        for row in rows:
            cells = [mean_sd([r[split]["rows"][row]["rates"][k] for r in res if r.get(split)
                              and r[split]["rows"].get(row, {}).get("rates", {}).get(k) is not None])
                     for split in ("id", "ood") for k in ("pc", "pw", "pr", "ths")]
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        # CRaFT's static conflicts (IdK examples whose fact M0 answers correctly, greedy BASIC) and
        # the ID quadrants against Init-Basic's answers (evaluate.py)
        lines += ["", "| method | IdK set: M0 knows | ID over-refusal | ID hallucination | "
                  "ID refusal precision |", "|---|---|---|---|---|"]
        for row in rows:
            if row.startswith("init_"):
                continue
            known = []
            for d in dirs:
                p = os.path.join(d, row, "train.jsonl.summary.json")
                if os.path.isfile(p):
                    share = json.load(open(p))["idk"].get("m0_greedy_correct_share")
                    if share is not None:
                        known.append(100 * share)
            q = [r["id"]["rows"][row].get("quadrants_init", {}) for r in res
                 if r.get("id") and row in r["id"]["rows"]]
            cells = [mean_sd(known)] + [mean_sd([x[k] for x in q if x.get(k) is not None])
                                        for k in ("over_refusal", "hallucination", "refusal_precision")]
            lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world", help="`world` (embedded default) or a hub id / folder")
    p.add_argument("--data", choices=("world", "paper"), default="world",
                   help="`paper`: MMLU->ARC (MCQA) and TriviaQA->NQ (OEQA) items from --data-dir")
    p.add_argument("--data-dir", default="runs/data", help="data.py item root (--data paper)")
    p.add_argument("--tasks", nargs="+", default=list(files.TASKS), help="mcqa and/or oeqa")
    p.add_argument("--methods", nargs="+", default=None,
                   help="RAIT methods to construct, train and evaluate (default: van cor corcer "
                        "wocer craft grait, and on the world the oracle row)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="pipeline seeds (default: the world's own seed; 0 for a real model)")
    p.add_argument("--worlds", nargs="+", type=int, default=None,
                   help="world seeds (default 0): one world each, built by world.py --seed, in "
                        "runs/world (seed 0) and runs/world-w<seed>; with several, runs/worlds.md "
                        "has mean ± std over them")
    p.add_argument("--out", default="runs", help="run root")
    p.add_argument("--limit", type=int, default=0,
                   help="--data paper: at most this many items per file (seeded subsample; 0 = all)")
    p.add_argument("--world-args", default="", help="extra world.py flags (e.g. --preset small)")
    p.add_argument("--until", choices=("probe", "rehearse", "construct", "finetune", "all"),
                   default="all", help="stop after this stage (make probe / rehearse / ...)")
    p.add_argument("--stage-args", default="", help="extra finetune.py flags for the method runs")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags (e.g. --max-new-tokens 8)")
    p.add_argument("--jobs", type=int, help="stages run at once, in worker processes of one torch "
                   "thread each (default: the CPU count for the world, 1 for a real model, whose "
                   "stages share one accelerator)")
    a = p.parse_args()
    if a.model == "world" and a.data != "world":
        raise files.InputError("--data paper needs --model (a chat model hub id or folder)")
    if a.methods is None:
        a.methods = list(PAPER_METHODS) + (["oracle"] if a.model == "world" else [])
    if a.jobs is None:
        a.jobs = (os.cpu_count() or 1) if a.model == "world" else 1
    if a.jobs < 1:
        raise files.InputError(f"--jobs {a.jobs}: must be at least 1")
    if a.worlds is None:
        a.worlds = [0]
    elif a.model != "world":
        raise files.InputError("--worlds applies to the embedded world only (--model world)")
    t_start, times = time.time(), []
    roots = ([world_dir(a.out, w) for w in a.worlds] if a.model == "world"
             else [os.path.join(a.out, slug(a.model))])
    if a.model == "world":      # cached when a world's configuration is unchanged
        builds = [(build_world, (r, w, a.world_args)) for r, w in zip(roots, a.worlds)]
        in_parallel(a, builds, times)
    # run seeds: --seeds for every world, else each world's own seed (world 0: seed 0)
    seeds = {r: a.seeds or ([w] if a.model == "world" else [0]) for r, w in zip(roots, a.worlds)}
    # once, here: fail early on missing data, write the --limit subsamples, hand the paths to units
    paths = {(r, task): task_inputs(a, r, task) for r in roots for task in a.tasks}
    cells = [(a, r, t, s, paths[r, t]) for r in roots for t in a.tasks for s in seeds[r]]
    # The stages of a task and seed depend on each other only through probe -> rehearse -> the
    # methods -> the report: run each of these three waves across tasks, seeds and methods at once.
    in_parallel(a, [(prepare, cell) for cell in cells], times)
    if a.until not in ("probe", "rehearse"):
        rows = a.methods + (["init_basic", "init_refuse"] if a.until == "all" else [])
        in_parallel(a, [(method, (*cell, m)) for cell in cells for m in rows], times)
    if a.until == "all":
        in_parallel(a, [(report, cell) for cell in cells], times)
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


def build_world(folder, seed, world_args):
    """world.py --out <folder> --seed <seed> [world args]: one embedded world (cached)."""
    import world
    argv = ["--out", folder, "--seed", str(seed)] + shlex.split(world_args)
    print(f"[pipeline] world: {shlex.join([PY, 'world.py', *argv])}", file=sys.stderr, flush=True)
    t0 = time.time()
    world.main(argv)
    return [(os.path.basename(folder), time.time() - t0, "ran")]


if __name__ == "__main__":
    runs.cli(main)

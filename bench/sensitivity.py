"""bench/sensitivity.py: can the world show a static-conflict effect at all? (issue 26, point 5)

Take Cor-RAIT's training set of a finished world run and replace 0 / 15 / 30 / 50% of its IdK
examples with IdK examples of facts M0 knows (Init-Basic answers them correctly on the pool:
init_basic/pred_pool.jsonl, the judgement of every "M0 knows" share), leaving everything else
as it is. Fine-tune each set with the world's recipe and evaluate it on the ID test. If the
dose does not move over-refusal (refusals among the test facts Init-Basic answers) or THS, the
world cannot show what removing static conflicts (CRaFT's certainty ranking) buys, whichever way
CRaFT then comes out. The tests run its dose-0 path on a hand-made run (no training).

    make all WORLDS="0 1 2"                                   # the runs it reads
    .venv/bin/python bench/sensitivity.py --worlds 0 1 2    # 4.5 min on 2 cores, 2 jobs

Each dose is a folder sens-<dose>/ beside cor/ in runs/<world>/<task>/s<seed>/, made by the same
commands the pipeline runs (printed), skipped when unchanged. Dose 0 is Cor-RAIT's own set.
"""
import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from kernels.base import InputError
from rait import files, models, runs  # noqa: E402
import pipeline  # noqa: E402
from world import RECIPE  # noqa: E402
from kernels.ths import quadrants, rates, ths  # noqa: E402

DOSES = (0, 15, 30, 50)     # % of Cor-RAIT's IdK examples replaced by facts M0 knows


def dosed(examples, known_items, dose, rng, task):
    """Cor-RAIT's examples with round(dose% of the IdK ones) replaced by IdK examples of known
    facts that are not in the set (as van or IdK), drawn with rng."""
    idk = [i for i, e in enumerate(examples) if e["kind"] == "idk"]
    k = round(len(idk) * dose / 100)
    used = {e["id"] for e in examples}
    fresh = [it for it in known_items if it["id"] not in used]
    if k > len(fresh):
        raise InputError(f"dose {dose}%: {k} known facts needed, {len(fresh)} outside the set")
    out = [dict(e) for e in examples]
    for i, it in zip(sorted(rng.sample(idk, k)), rng.sample(fresh, k)):
        out[i].update(id=it["id"], prompt=models.user_prompt(it, "refuse"),
                      target=models.IDK[task], method=f"cor+{dose}%known")
    return out


def measure(run_dir, items_path, dose_dir):
    """(Pr, over-refusal, refusal recall, THS) of a dose's ID predictions against Init-Basic's."""
    items = files.read_jsonl(items_path, files.check_item)
    ids = [it["id"] for it in items]
    lab = {}
    for name, folder in (("init", os.path.join(run_dir, "init_basic")), ("me", dose_dir)):
        preds = {p["id"]: p["label"] for p in files.read_jsonl(
            os.path.join(folder, "pred_id.jsonl"), files.check_prediction)}
        lab[name] = [preds[i] for i in ids]
    count = lambda ls: [ls.count(x) for x in ("correct", "wrong", "refuse", "unparsed")]  # noqa
    r, r0 = rates(count(lab["me"])), rates(count(lab["init"]))
    q = quadrants(np.array(lab["init"]) == "correct", lab["me"])
    return float(r[2]), q["over_refusal"], q["refusal_recall"], float(ths(r[0], r[1], r0[0], r0[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs", help="run root of `make all` (pipeline.py --out)")
    p.add_argument("--worlds", nargs="+", type=int, default=[0, 1, 2], help="world seeds")
    p.add_argument("--tasks", nargs="+", default=list(files.TASKS))
    p.add_argument("--doses", nargs="+", type=int, default=list(DOSES), help="percent of the IdK examples replaced by known facts")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="stages at once")
    a = p.parse_args()
    cells, units = [], []
    for w in a.worlds:
        root = pipeline.world_dir(a.out, w)
        for task in a.tasks:
            R = pipeline.task_dir(root, task, w)
            cor = os.path.join(R, "cor", "train.jsonl")
            known_path = os.path.join(R, pipeline.POOL_KNOWN)
            for f in (cor, known_path):
                if not os.path.isfile(f):
                    raise InputError(f"{f}: missing; run `make all WORLDS=\"...\"` first")
            pool = files.read_jsonl(os.path.join(root, task, "train.jsonl"), files.check_item)
            known = {x["id"] for x in files.read_jsonl(known_path, files.check_prediction)
                     if x["label"] == "correct"}
            examples = files.read_jsonl(cor, files.check_example)
            test_id, model = os.path.join(root, task, "test_id.jsonl"), os.path.join(root, "model")
            for dose in a.doses:
                d = os.path.join(R, "cor" if dose == 0 else f"sens-{dose}")
                cells.append((w, task, dose, R, test_id, d))
                if dose == 0:
                    continue                    # Cor-RAIT's own run
                train = os.path.join(d, "train.jsonl")
                rows = dosed(examples, [it for it in pool if it["id"] in known], dose,
                             random.Random(1000 * w + dose), task)
                if not os.path.isfile(train) or files.read_jsonl(train) != rows:
                    files.write_jsonl(train, rows)
                args = ["--model", model, "--train", train, "--out", f"{d}/adapter", "--seed",
                        str(w)] + RECIPE["finetune"][task]
                ev = ["--model", model, "--items", test_id, "--prompt", "refuse", "--out",
                      f"{d}/pred_id.jsonl", "--mcqa-reader", "option", "--adapter", f"{d}/adapter"]
                tag = f"{os.path.basename(root)}/{task} dose {dose}%"
                units.append([(f"{tag} finetune", runs.stage_command("finetune.py", args),
                               f"{d}/adapter", [model, train]),
                              (f"{tag} evaluate", runs.stage_command("evaluate.py", ev),
                               f"{d}/pred_id.jsonl", [model, test_id, f"{d}/adapter"])])
    times = []
    if units:                                   # --doses 0 alone: nothing to train
        pipeline.in_parallel(a.jobs, units, times, one_thread=True)
    res = {}
    for w, task, dose, R, test_id, d in cells:
        res.setdefault((task, dose), []).append(measure(R, test_id, d))
    lines = ["# Sensitivity: Cor-RAIT with known facts planted among its IdK examples", "",
             f"Worlds {' '.join(map(str, a.worlds))}; ID test; mean ± std over the worlds. "
             "Over-refusal = refused among the test facts Init-Basic answers correctly; refusal "
             "recall = refused among the others; THS against Init-Basic (SPEC 7).", "",
             "| task | IdK replaced by known facts | Pr | over-refusal | refusal recall | THS |",
             "|---|---|---|---|---|---|"]
    for (task, dose), v in res.items():
        cols = [pipeline.mean_sd([x[i] for x in v if x[i] is not None]) for i in range(4)]
        lines.append(f"| {task} | {dose}% | " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    files.atomic_write_text(os.path.join(a.out, "sensitivity.md"), text)
    print(text)


if __name__ == "__main__":
    runs.cli(main)

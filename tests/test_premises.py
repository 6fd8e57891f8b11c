"""The premises the experiment rests on, checked on the small world as `make all` runs it (issue 13).

Formulas can be right while the experiment is wrong: these tests fail when
(a) the model cannot learn to emit the refusal (a Cor-RAIT model must answer its own IdK training
    prompts with the exact refusal string, greedy, and never with a garbled "know know"),
(b) the knowledge state does not track what the model knows (Spearman of mu with the world's
    exposure oracle over the train pool),
(c) the re-probe does not ask what the probe asked (same recorded query for every flag, 0, False
    and empty values included; with an identity adapter, zero LoRA B, every flow is exactly 0).
"""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, built_once

sys.path.insert(0, ROOT)
from rait import files, models  # noqa: E402
import world  # noqa: E402

# (b): thresholds of issue 13 (measured before the fix on the default world: OEQA 0.70, MCQA 0.25)
MIN_SPEARMAN = {"oeqa": 0.6, "mcqa": 0.4}
LATENT_OFTEN = 2              # issue 26: latent facts seen this often per epoch (small preset)
MIN_EXACT_REFUSALS = 0.7      # (a): share of IdK training prompts answered with the exact refusal


def run(*argv):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"{argv[0]} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_world):
    """pipeline.py on the small world up to the Cor-RAIT adapters, both tasks (what `make all`
    runs, with the small preset)."""
    def build(out):
        shutil.copytree(small_world, out / "world")       # cached: the same configuration
        # the small world's pool is 8x smaller than the default's: 15 epochs make about as many
        # optimizer steps as the default world's recipe (world.RECIPE["finetune"])
        run("pipeline.py", "--out", str(out), "--world-args", "--preset small", "--methods", "cor",
            "--until", "finetune", "--jobs", "2", "--stage-args", "--epochs 15")
    return built_once(tmp_path_factory, "premises", build)     # once for all xdist workers


def task_dir(runs, task):
    return runs / "world" / task / "s0"


def spearman(x, y):
    """Spearman's rho with average ranks for ties (no scipy in the runtime packages)."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for u in np.unique(v):                      # ties share their mean rank
            r[v == u] = r[v == u].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_spearman_helper_against_a_hand_computation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> Pearson of the ranks by hand: 0.9487
    assert spearman([0, 1, 1, 2], [0, 1, 2, 3]) == pytest.approx(0.9486833, abs=1e-6)


@pytest.mark.parametrize("task", files.TASKS)
def test_a_cor_rait_model_emits_the_exact_refusal_on_its_idk_prompts(runs, task):
    R = task_dir(runs, task)
    pool = {it["id"]: it for it in files.read_jsonl(str(runs / "world" / task / "train.jsonl"))}
    idk = [e["id"] for e in files.read_jsonl(str(R / "cor" / "train.jsonl")) if e["kind"] == "idk"]
    assert len(idk) >= 8, "too few IdK examples to test"
    items = R / "idk_items.jsonl"
    files.write_jsonl(str(items), [pool[i] for i in idk])
    reader = ["--mcqa-reader", "option"] if task == "mcqa" else []
    run("evaluate.py", "--model", str(runs / "world" / "model"), "--adapter", str(R / "cor" / "adapter"),
        "--items", str(items), "--prompt", "refuse", "--out", str(R / "idk_pred.jsonl"), *reader)
    preds = files.read_jsonl(str(R / "idk_pred.jsonl"))
    # exact at the token level: the world's word-level tokenizer decodes "know." as "know ."
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(runs / "world" / "model"))
    ids = lambda text: tok(text.strip(), add_special_tokens=False)["input_ids"]  # noqa: E731
    exact = [ids(p["response"]) == ids(models.IDK[task]) for p in preds]
    garbled = [p["response"] for p in preds if "know know" in p["response"]]
    assert not garbled, f"garbled refusals, e.g. {garbled[:3]}"
    assert sum(exact) / len(exact) >= MIN_EXACT_REFUSALS, (
        f"{task}: only {sum(exact)} of {len(exact)} IdK training prompts are answered with the exact "
        f"refusal {models.IDK[task]!r}; e.g. {[p['response'] for p in preds][:5]}")


@pytest.mark.parametrize("task", files.TASKS)
def test_b_knowledge_state_tracks_the_exposure_oracle(runs, task):
    pool = {it["id"]: it for it in files.read_jsonl(str(runs / "world" / task / "train.jsonl"))}
    states = files.read_jsonl(str(task_dir(runs, task) / "probe_init.jsonl"))
    rho = spearman([s["mu"] for s in states], [pool[s["id"]]["meta"]["exposure"] for s in states])
    assert rho >= MIN_SPEARMAN[task], (
        f"{task}: Spearman(mu, exposure) = {rho:.2f} over {len(states)} pool items, below "
        f"{MIN_SPEARMAN[task]}: the knowledge state does not track what the model knows")


@pytest.mark.parametrize("task", files.TASKS)
def test_c_reprobe_asks_exactly_what_the_probe_asked(runs, task):
    R = task_dir(runs, task)
    load = lambda p: json.loads(p.read_text())["args"]  # noqa: E731
    a0, a1 = load(R / "probe_init.jsonl.config.json"), load(R / "rehearsal" / "probe.jsonl.config.json")
    assert a0.keys() == a1.keys()
    for k in a0:
        if k not in ("model", "items", "adapter", "out"):
            assert a1[k] == a0[k], f"{task}: re-probe {k} = {a1[k]!r}, initial probe {a0[k]!r}"
    assert a1["adapter"] == str(R / "rehearsal" / "adapter")


@pytest.mark.parametrize("task", files.TASKS)
def test_c_identity_adapter_gives_zero_flow(runs, task, tmp_path):
    """Rehearse again with the trained adapter's LoRA B set to zero (M~ = M0): every item's
    re-probed mu equals its initial mu, so the flow is exactly 0."""
    from safetensors.torch import load_file, save_file
    R = task_dir(runs, task)
    stage = json.loads((R / "rehearsal" / "flow.jsonl.stage.json").read_text())
    reh = tmp_path / "rehearsal"
    shutil.copytree(R / "rehearsal", reh, ignore=shutil.ignore_patterns("probe.jsonl*", "flow*"))
    f = reh / "adapter" / "adapter_model.safetensors"
    w = load_file(str(f))
    assert any("lora_B" in k for k in w)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in w.items()}, str(f))
    cmd = list(stage["cmd"][1:])
    cmd[cmd.index("--out") + 1] = str(reh)
    r = run(*cmd)
    assert "already trained" in r.stderr        # the zeroed adapter is used as it is
    flows = files.read_jsonl(str(reh / "flow.jsonl"))
    # OEQA's mu is a count of sampled answers: exactly 0. MCQA's is a float32 softmax, and the
    # LoRA-wrapped model hands lm_head the same values in another memory layout, which moves the
    # last bits (measured: <= 6e-6 in log-probabilities); a changed query moves it by ~0.1.
    tol = 0.0 if task == "oeqa" else 1e-5
    moved = [f for f in flows if abs(f["flow"]) > tol]
    assert not moved, f"{task}: {len(moved)} of {len(flows)} items moved with an identity adapter, e.g. {moved[:2]}"
    s0 = {s["id"]: s for s in files.read_jsonl(str(R / "probe_init.jsonl"))}
    s1 = files.read_jsonl(str(reh / "probe.jsonl"))
    assert all(abs(s["mu"] - s0[s["id"]]["mu"]) <= tol and abs(s["sigma"] - s0[s["id"]]["sigma"]) <= 10 * tol
               for s in s1)


# --- issue 26: the world as an instrument -----------------------------------------------------
def test_planted_twins_and_latent_facts_exist(runs):
    """Static conflicts: each never-seen twin has exposure 0 and a known twin, asked through the
    same template, whose name lacks one word of the unseen twin's and whose values differ; M0 answers known
    twins far better than never-seen ones (Init-Basic on the pool). Latent facts are seen as often
    as others. Flow reliability's second rehearsal ran."""
    for task in files.TASKS:
        pool = files.read_jsonl(str(runs / "world" / task / "train.jsonl"))
        by_q = {it["question"]: it for it in pool}
        unseen = [it for it in pool if it["meta"].get("twin") == "unseen"]
        assert len(unseen) >= 8, "too few planted twins to test"
        for it in unseen:
            twin = by_q[it["question"].replace(it["meta"]["person"], it["meta"]["twin_of"])]
            assert it["meta"]["exposure"] == 0 and twin["meta"]["exposure"] > 0
            assert value(it) != value(twin)
            base, mark = it["meta"]["person"].split()           # one word added to the name
            assert base == twin["meta"]["person"] and mark in world.TWIN_MARKS
        labels = {p["id"]: p["label"] for p in files.read_jsonl(
            str(task_dir(runs, task) / "init_basic" / "pred_pool.jsonl"))}
        acc = lambda kind: sum(labels[it["id"]] == "correct" for it in pool  # noqa: E731
                               if it["meta"].get("twin") == kind) / len(unseen)
        assert acc("known") >= acc("unseen") + 0.3, (task, acc("known"), acc("unseen"))
        latent = [it["meta"]["exposure"] for it in pool if it["meta"]["latent"]]
        other = [it["meta"]["exposure"] for it in pool if not it["meta"]["latent"]
                 and "twin" not in it["meta"]]
        assert latent and sum(latent) / len(latent) > 0.5 * sum(other) / len(other)
        assert (task_dir(runs, task) / "rehearsal-b" / "flow.jsonl").exists()


def test_latent_facts_are_stored_but_hedged_and_rehearsal_surfaces_them(runs):
    """Dynamic conflicts (issue 26): M0's greedy BASIC answer to a latent fact it has seen often
    opens with the hedge line, so Init-Basic marks it wrong where it marks the other facts seen as
    often right; yet M0 stores the value (MCQA's option reader, which the hedge does not hide,
    picks it as often). The rehearsal surfaces them: of the latent OEQA IdK candidates (mu0 < 0.5)
    seen often, more rose than fell after it, in both rehearsals, and more than never-seen facts."""
    often = lambda it: it["meta"]["exposure"] >= LATENT_OFTEN and "twin" not in it["meta"]  # noqa
    acc = {}
    for task in files.TASKS:
        pool = files.read_jsonl(str(runs / "world" / task / "train.jsonl"))
        preds = {p["id"]: p for p in files.read_jsonl(
            str(task_dir(runs, task) / "init_basic" / "pred_pool.jsonl"))}
        for kind in (True, False):
            ids = [it["id"] for it in pool if often(it) and it["meta"]["latent"] == kind]
            acc[task, kind] = sum(preds[i]["label"] == "correct" for i in ids) / len(ids)
            acc["hedged", task, kind] = sum(preds[i]["response"].startswith(world.HEDGE_LINE)
                                            for i in ids) / len(ids)
    # measured on the small world: hedged 41% against 12%, open-QA 0.50 against 0.73, MCQA 1.0
    # against 0.98; the default world 0: open-QA 0.18 against 0.83 at 8+ exposures
    assert acc["hedged", "oeqa", True] >= acc["hedged", "oeqa", False] + 0.2, acc
    assert acc["oeqa", True] + 0.15 <= acc["oeqa", False], acc
    assert acc["mcqa", True] >= acc["mcqa", False] - 0.15, acc
    pool = {it["id"]: it for it in files.read_jsonl(str(runs / "world" / "oeqa" / "train.jsonl"))}
    for reh in ("rehearsal", "rehearsal-b"):
        flows = files.read_jsonl(str(task_dir(runs, "oeqa") / reh / "flow.jsonl"))
        def moved(sel):
            d = [f["flow"] for f in flows if f["mu0"] < 0.5 and sel(pool[f["id"]])]
            return sum(x > 0 for x in d) / len(d), sum(x < 0 for x in d) / len(d)
        rose, fell = moved(lambda it: often(it) and it["meta"]["latent"])
        unseen_rose, _ = moved(lambda it: it["meta"]["exposure"] == 0)
        # measured on the small world: rose 39% / 33%, fell 0% / 0%, never-seen rose 5% / 11%
        # (WORLD_VERSION 2's default world 0, declarative-only latent facts seen 8+ times: rose
        # 17%, fell 17%)
        assert rose >= fell + 0.15 and rose >= unseen_rose + 0.15, (reh, rose, fell, unseen_rose)


def value(it):
    """The fact's value: the OEQA answer, or the MCQA gold option's text."""
    return it["answer"] if it["task"] == "oeqa" else it["choices"][files.LETTERS.index(it["answer"])]


def test_oracle_judgement_is_init_basics(runs, tmp_path):
    """"M0 knows" is what evaluate.py labels correct for M0's greedy BASIC answer: the pool run is
    the Init-Basic row's command with only the items and output changed, and construct.py's
    summaries count from it."""
    import pipeline
    for task in files.TASKS:
        R = task_dir(runs, task)
        pool_cmd = json.loads((R / "init_basic" / "pred_pool.jsonl.stage.json").read_text())["cmd"]
        a = pipeline_args(runs)
        paths = pipeline.task_inputs(a, str(runs / "world"), task)
        stages = pipeline.method(a, str(runs / "world"), task, 0, paths, "init_basic")
        row_cmd = stages[0][1]                  # Init-Basic on the ID test
        strip = lambda cmd: [x for i, x in enumerate(cmd[1:]) if cmd[i] not in ("--items", "--out")  # noqa
                             and x not in ("--items", "--out")]
        assert strip(pool_cmd) == strip(row_cmd)
        labels = {p["id"]: p["label"] for p in files.read_jsonl(str(R / "init_basic" / "pred_pool.jsonl"))}
        summ = json.loads((R / "cor" / "train.jsonl.summary.json").read_text())
        idk = [e["id"] for e in files.read_jsonl(str(R / "cor" / "train.jsonl")) if e["kind"] == "idk"]
        share = sum(labels[i] == "correct" for i in idk) / len(idk)
        assert summ["idk"]["m0_known_share"] == pytest.approx(share, abs=1e-4)
        assert summ["crss"] is not None and set(summ["crss_sweep"]) == {"0.95", "0.96", "0.97", "0.98", "0.99"}


def pipeline_args(runs):
    """pipeline.py's parsed arguments as the runs fixture gave them (for its stage builders)."""
    import argparse
    return argparse.Namespace(model="world", data="world", data_dir=None, limit=0, until="all",
                              probe_args="", rehearse_args="", construct_args="", stage_args="",
                              eval_args="", methods=["cor"])


def test_thread_count_does_not_change_the_world(small_world, tmp_path):
    """A rebuild with 2 torch threads gives the bytes the fixture's 1-thread build gave."""
    from conftest import build_small_world
    r = build_small_world(tmp_path / "w2", "--threads", "2", "--rebuild")
    assert r.returncode == 0, r.stderr[-2000:]
    assert files.sha256_of(str(tmp_path / "w2" / "model" / "model.safetensors")) == \
        files.sha256_of(str(small_world / "model" / "model.safetensors"))

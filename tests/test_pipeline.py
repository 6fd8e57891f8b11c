"""pipeline.py in the paper setting (`make all MODEL=... DATA=paper`), as a dry run: a tiny random
Llama with a real tokenizer and chat template on a few real MMLU -> ARC and NQ items from
../shared/data. TriviaQA is not there: its pool is real NQ questions written in TriviaQA's file
format and converted by data.py's TriviaQA path. And `make all` on the world, interrupted, a
printed command run again by hand, and a failing stage. And rait/runs.run_command, the entry
point through which pipeline.py and rehearse.py run other stages."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SHARED_DATA, sigint_default

sys.path.insert(0, ROOT)
import data as data_mod  # noqa: E402
from kernels.base import InputError
from rait import files, runs  # noqa: E402

METHODS = ["craft", "grait"]   # the others differ only in construct.py (tested there)


def sh(*args):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data absent")
def test_paper_setting_dry_run_writes_a_report(tmp_path, tiny_chat_llama):
    data = tmp_path / "data"
    nq = os.path.join(SHARED_DATA, "nq", "dev.csv")
    sh("data.py", "mmlu", "--src", os.path.join(SHARED_DATA, "mmlu"), "--out", str(data))
    sh("data.py", "arc", "--src", os.path.join(SHARED_DATA, "arc"), "--out", str(data))
    sh("data.py", "nq", "--src", nq, "--out", str(data))
    tq = tmp_path / "triviaqa"
    tq.mkdir()
    rows = [{"QuestionId": f"tq_{it['id']}", "Question": it["question"],
             "Answer": {"Value": it["answer"], "NormalizedValue": it["answer"].lower(),
                        "Aliases": it["aliases"], "NormalizedAliases": []}}
            for it in data_mod.nq_items(nq)[-60:]]
    for name, part in (("train", rows[:40]), ("dev", rows[40:])):
        (tq / f"unfiltered-web-{name}.json").write_text(json.dumps({"Data": part}))
    sh("data.py", "triviaqa", "--src", str(tq), "--out", str(data))
    out = tmp_path / "runs"
    args = ["pipeline.py", "--model", tiny_chat_llama, "--data", "paper", "--data-dir", str(data),
            "--limit", "16", "--out", str(out), "--methods", *METHODS,
            "--eval-args", "--max-new-tokens 6", "--jobs", "2"]     # (a real model's default: 1)
    sh(*args)
    runs = [d for d in out.iterdir() if d.name != "world"]
    assert len(runs) == 1
    for task in ("mcqa", "oeqa"):
        R = runs[0] / task / "s0"
        res = json.loads((R / "results.json").read_text())
        rows = set(res["id"]["rows"]) & set(res["ood"]["rows"])
        assert rows == {"init_basic", "init_refuse", *METHODS}
        report = (R / "report.md").read_text()
        assert "Init-Basic" in report and (R / "ths.svg").exists()
    # OEQA: sampled, 3-shot with the TriviaQA dev shots (SPEC 2.2) that data.py wrote
    cfg = json.loads((runs[0] / "oeqa" / "s0" / "probe_init.jsonl.config.json").read_text())
    assert cfg["args"]["n_shots"] == 3 and cfg["args"]["shots"].endswith("oeqa/shots.jsonl")
    R = runs[0] / "mcqa" / "s0"
    # the letter reader ran on the 5-shot prompt, and every method wrote its adapter
    cfg = json.loads((R / "probe_init.jsonl.config.json").read_text())
    assert cfg["args"]["mcqa_reader"] == "letter" and cfg["args"]["n_shots"] == 5
    assert all((R / m / "adapter" / "adapter_config.json").exists() for m in METHODS)
    # a rerun skips every stage (nothing changed)
    r = sh(*args)
    assert "skip" in r.stderr and "] mcqa/s0 probe:" not in r.stderr


def kill_when(args, trigger, delay, sig=signal.SIGKILL):
    """Start `pipeline.py args`; `delay` s after a stderr line contains `trigger`, send `sig` to
    it and the stages it runs (SIGINT: Ctrl-C in a terminal). Returns the exit status."""
    p = subprocess.Popen([sys.executable, "pipeline.py", *args], cwd=ROOT, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=sigint_default)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if trigger in line:
            time.sleep(delay)
            break
    os.killpg(p.pid, sig)
    rest = p.stderr.read()
    assert any(trigger in s for s in seen), "".join(seen)[-3000:]
    return p.wait(), rest


def test_make_all_killed_anywhere_then_rerun_gives_the_same_report(tmp_path, small_world):
    """Issue 8: interrupting `make all` at any point and running it again finishes with the same
    report. Killed (SIGKILL, the stages it runs included) during pre-training and during the
    evaluations, Ctrl-C (SIGINT) during a fine-tune; the reruns reuse what was finished and match
    an uninterrupted run. Then a printed command run by hand, and a failing stage."""
    def args(out):
        return ["--world-args", "--preset small", "--tasks", "oeqa", "--methods", "grait", "--jobs", "2",
                "--out", str(out)]      # one method: the stages' mechanics are method-blind
    shutil.copytree(small_world, tmp_path / "a" / "world")     # the same world, built once
    run_a = sh("pipeline.py", *args(tmp_path / "a"))
    assert "cached world" in run_a.stderr
    # the world's 0-shot OEQA probe (world.RECIPE["probe"]) tracks what M0 knows, in every
    # relation: sampled correctness is higher where M0 answers greedily right (Init-Basic on the
    # pool, the pipeline's judgement of what M0 knows) than where it does not
    w = tmp_path / "a" / "world" / "oeqa"
    items = {json.loads(x)["id"]: json.loads(x) for x in open(w / "train.jsonl")}
    known = {p["id"]: p["label"] == "correct" for p in map(json.loads, open(
        w / "s0" / "init_basic" / "pred_pool.jsonl"))}
    mu = {}
    for x in open(w / "s0" / "probe_init.jsonl"):
        s = json.loads(x)
        mu.setdefault((items[s["id"]]["subject"], known[s["id"]]), []).append(s["mu"])
    for rel in {r for r, _ in mu}:
        known, unknown = (sum(v) / len(v) for v in (mu[rel, True], mu[rel, False]))
        assert known > unknown + 0.2, (rel, known, unknown)
    b = tmp_path / "b"
    kill_when(args(b), "[world] pre-training", 2.0)
    assert not (b / "world" / "model").exists()
    # a killed pre-training leaves no model; rebuilding it is test_world's same-seed test, so the
    # rest starts from the fixture's world (saves a minute of pre-training)
    shutil.rmtree(b / "world")
    shutil.copytree(small_world, b / "world")
    rc, rest = kill_when(args(b), "oeqa/s0 finetune grait:", 1.0, signal.SIGINT)
    assert rc == 130 and "interrupted: partial results are kept" in rest
    assert (b / "world" / "oeqa" / "s0" / "probe_init.jsonl.stage.json").exists()
    kill_when(args(b), "oeqa/s0 evaluate", 0.3)
    r = sh("pipeline.py", *args(b))
    assert "skip world/oeqa/s0 probe: unchanged" in r.stderr
    ra, rb = ((d / "world" / "oeqa" / "s0" / "report.md").read_text() for d in (tmp_path / "a", b))
    assert rb.replace(str(b), str(tmp_path / "a")) == ra
    times = (b / "world" / "times.md").read_text()
    assert "| world |" in times and "| **wall** |" in times
    # a command copied from the log and run in a shell at the repository root makes the same
    # file: GRAIT's construct (the model's numerics, so the printed thread setting matters; its
    # wave runs 4 stages at once) into a fresh path
    log = {m.group(1): m.group(2) for m in re.finditer(r"\[pipeline\] (world/oeqa/s0 [\w ]+): "
                                                        r"(.+)", run_a.stderr)}
    # every stage of a world run gets one thread, even alone in its wave (issue 26: the numbers
    # must not depend on the machine's core count)
    assert log["world/oeqa/s0 probe"].startswith("OMP_NUM_THREADS=1 ")
    words = shlex.split(log["world/oeqa/s0 construct grait"])
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    assert env == {"OMP_NUM_THREADS": "1"}
    argv = words[len(env):]
    again = tmp_path / "again" / "train.jsonl"
    argv[argv.index("--out") + 1] = str(again)
    r2 = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    made = tmp_path / "a" / "world" / "oeqa" / "s0" / "grait" / "train.jsonl"
    assert again.read_bytes() == made.read_bytes()
    # a stage that fails stops the run, its running siblings included, with one line at the end
    r3 = subprocess.run([sys.executable, "pipeline.py", *args(tmp_path / "a"),
                         "--eval-args=--no-such-flag"], cwd=ROOT, capture_output=True, text=True)
    last = [ln for ln in r3.stderr.splitlines() if ln.strip()][-1]
    assert r3.returncode == 1 and "Traceback" not in r3.stderr, r3.stderr[-3000:]
    # the first evaluate.py to run is Init-Basic on the pool (issue 26), beside the rehearsals
    assert re.fullmatch(r"\[pipeline\] world/oeqa/s0 evaluate \w+ (id|ood|pool) failed \(exit 2\); "
                        r"rerun the same command to resume", last), last
    assert "skip world/oeqa/s0 rehearse: unchanged" in r3.stderr


def test_several_worlds_report_mean_and_std_over_worlds(tmp_path):
    """Issue 13: `make all WORLDS="0 1"` builds one world per seed (runs/world, runs/world-w1),
    runs each with its own run seed and writes runs/worlds.md with mean ± std over the worlds,
    the Oracle-RAIT row and the static-conflict / quadrant table."""
    small = "--preset small --epochs 1 --people 40 --hidden 64 --inter 128"   # mechanics only
    sh("pipeline.py", "--world-args", small, "--worlds", "0", "1",   # a 168-item pool: 40 + 10
           "--tasks", "oeqa", "--methods", "oracle", "--jobs", "2", "--out", str(tmp_path),
           "--construct-args", "--n-van 40 --n-idk 10")
    for d in ("world/oeqa/s0", "world-w1/oeqa/s1"):
        assert (tmp_path / d / "report.md").is_file(), d
    a, b = ((tmp_path / w / "oeqa" / "train.jsonl").read_text() for w in ("world", "world-w1"))
    assert a != b                                           # two different worlds
    md = (tmp_path / "worlds.md").read_text()
    assert "mean ± std over worlds 0 1" in md
    assert "| Oracle-RAIT | " in md and "| Init-Basic | " in md and "IdK set: M0 knows" in md
    oracle = [line for line in md.splitlines() if line.startswith("| Oracle-RAIT |")][-1]
    assert oracle.split("|")[2].strip().startswith("0.0 ± 0.0")    # the oracle's IdK: none known
    assert "| **wall** |" in (tmp_path / "times.md").read_text()


def test_seed_table_gives_ap_auroc_and_refusal_recall_over_runs(tmp_path):
    """Issue 27: the mean ± std table over seeds or worlds has each row's AP and AUROC (ID, OOD)
    and ID refusal recall; runs without a value (no confidences) leave it out."""
    import pipeline

    def row(k, ap):
        return {"rates": {"pc": 1.0, "pw": 2.0, "pr": 3.0, "ths": 4.0}, "ap": ap, "auroc": 50.0 + k,
                "quadrants_init": {"over_refusal": 1.0, "hallucination": 2.0,
                                   "refusal_precision": 3.0, "refusal_recall": 10.0 * (k + 1)}}
    dirs = []
    for k in range(2):
        dirs.append(str(tmp_path / f"r{k}"))
        files.write_json(os.path.join(dirs[-1], "results.json"), {
            "id": {"rows": {"init_basic": row(k, 60.0 + k), "craft": row(k, None)}},
            "ood": {"rows": {"init_basic": row(k, 70.0), "craft": row(k, 80.0)}}})
    md = pipeline.seed_table("t", "x", {"mcqa": dirs})
    assert "| method | ID AP | ID AUROC | OOD AP | OOD AUROC | ID refusal recall |" in md
    assert "| Init-Basic | 60.5 ± 0.7 | 50.5 ± 0.7 | 70.0 ± 0.0 | 50.5 ± 0.7 | 15.0 ± 7.1 |" in md
    assert "| craft | - | 50.5 ± 0.7 | 80.0 ± 0.0 | 50.5 ± 0.7 | 15.0 ± 7.1 |" in md


def test_run_command_prints_runs_and_names_a_failure(capsys):
    """The one entry point: the printed line is what runs (environment settings first), and a
    failure is one InputError naming the command and its exit status."""
    # exits with its argument, plus 10 unless it sees the setting
    code = "import os, sys; sys.exit(int(sys.argv[1]) + 10 * (os.environ.get('RAIT_X') != 'a b'))"
    argv = [sys.executable, "-c", code, "0"]
    assert runs.run_command(argv, {"RAIT_X": "a b"}, log="[x] ") == 0
    err = capsys.readouterr().err
    assert err.startswith(f"[x] RAIT_X='a b' {shlex.join(argv)}\n")
    argv[-1] = "3"
    assert runs.run_command(argv, check=False) == 13
    with pytest.raises(InputError) as e:
        runs.run_command(argv)
    assert str(e.value) == f"{shlex.join(argv)}: failed (exit 13)"


def test_run_command_passes_ctrl_c_on_and_ends_quietly(monkeypatch, capfd):
    """Ctrl-C that reached only the caller (kill -INT <pid>): after the grace the child is
    stopped too (SIGTERM), says `interrupted` itself, and the caller exits 130 without a second
    line."""
    monkeypatch.setattr(runs, "STOP_GRACE", 0.2)
    # a background job (`nohup make test &`) ignores SIGINT: this test needs Ctrl-C delivered
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    child = f"import sys, time; sys.path.insert(0, {ROOT!r}); from rait import runs; " \
            "runs.cli(lambda: time.sleep(60))"
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.time()
    try:
        with pytest.raises(SystemExit) as e:
            runs.run_command([sys.executable, "-c", child])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert e.value.code == 130 and time.time() - t0 < 30
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted: ") and sum("interrupted" in ln for ln in lines) == 1


def test_a_stage_is_skipped_only_while_its_inputs_and_output_are_as_made(tmp_path, capsys):
    """Issue 17: the stage marker keys the command and the contents of its inputs, and records
    the output's digest; an input edited in place, or an output truncated or edited since, runs
    the stage again (make all once skipped a finetune whose final adapter was cut short)."""
    import pipeline
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("one\n")
    cmd = [sys.executable, "-c", f"import shutil; shutil.copy({str(src)!r}, {str(out)!r})"]

    def how():
        return pipeline.run_stage("copy", cmd, str(out), [str(src)], {}, set())[2]
    assert how() == "ran" and how() == "skipped"
    src.write_text("two\n")                            # the same path, other contents
    assert how() == "ran" and out.read_text() == "two\n"
    out.write_text("tw")                               # the output cut short afterwards
    assert how() == "ran" and out.read_text() == "two\n"
    assert "changed since this stage made it; running again" in capsys.readouterr().err
    assert how() == "skipped"
    (tmp_path / "out.txt.stage.json").write_text('{"key": ')     # a damaged marker: run again
    assert how() == "ran" and "not a stage marker JSON file" in capsys.readouterr().err
    assert how() == "skipped"


def test_a_negative_limit_is_a_usage_error(tmp_path):
    """--limit -1 used to run the whole pipeline as if it were 0."""
    r = subprocess.run([sys.executable, "pipeline.py", "--limit", "-1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--limit must be >= 0" in r.stderr.splitlines()[-1]
    assert not os.listdir(tmp_path)


def test_run_folders_of_one_model_differ_by_data_and_name_a_local_model_by_its_folder(tmp_path):
    """A paper run and a geo run of the same model once wrote one folder, named after the whole
    local path (.venv--share--SmolLM2-135M-Instruct); and both read runs/data."""
    import pipeline
    local = tmp_path / ".venv" / "share" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    assert pipeline.slug(str(local), "paper") == "SmolLM2-135M-Instruct"
    assert pipeline.slug(str(local) + "/", "geo") == "SmolLM2-135M-Instruct-geo"
    assert pipeline.slug("meta-llama/Llama-2-7b-chat-hf", "paper") == "meta-llama--Llama-2-7b-chat-hf"
    assert pipeline.slug("world", "world") == "world"
    # each data source has its own default item root (pipeline and data.py agree)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pipeline.py"), "--model", str(local),
                        "--data", "geo", "--out", "runs"], cwd=tmp_path, capture_output=True,
                       text=True)      # in an empty folder: its runs/data-geo is absent
    assert r.returncode != 0 and "runs/data-geo/mcqa/train.jsonl: missing" in r.stderr
    assert data_mod.parse_args(["geo"]).out == "runs/data-geo"
    assert data_mod.parse_args(["mmlu", "--src", "x"]).out == "runs/data"


@pytest.mark.skipif(shutil.which("make") is None, reason="make absent")
def test_make_all_model_smollm2_runs_the_readme_command_and_each_default_can_be_overridden():
    """`make all MODEL=smollm2` is the README's real-facts run: geo items in their own folder,
    LIMIT 150, two jobs and the per-stage CPU flags; a variable given on the command line replaces
    only its own default (make -n: printed, nothing run)."""
    def pipeline_line(*var):
        r = subprocess.run(["make", "-n", "all", "MODEL=smollm2", *var], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return shlex.split([ln for ln in r.stdout.splitlines() if " pipeline.py " in ln][-1])
    argv = pipeline_line()
    flag = {k: argv[argv.index(k) + 1] for k in ("--model", "--data", "--data-dir", "--limit",
                                                   "--jobs")}
    assert flag == {"--model": ".venv/share/SmolLM2-135M-Instruct", "--data": "geo",
                    "--data-dir": "runs/data-geo", "--limit": "150", "--jobs": "2"}
    assert "--finetune-args=--batch-size 8 --grad-accum 1 --lr 1e-3 --epochs 1" in argv
    assert "--eval-args=--max-new-tokens 32" in argv and "--rehearse-args=--batch-size 8 " \
        "--grad-accum 1 --lr 1e-3" in argv and "--probe-args=--max-new-tokens 24" in argv
    argv = pipeline_line("LIMIT=40", "DATA=paper", "EVAL_ARGS=--max-new-tokens 8")
    assert argv[argv.index("--limit") + 1] == "40" and argv[argv.index("--data") + 1] == "paper"
    assert argv[argv.index("--data-dir") + 1] == "runs/data"
    assert "--eval-args=--max-new-tokens 8" in argv and "--jobs" in argv     # the rest stays
    r = subprocess.run(["make", "-n", "all"], cwd=ROOT, capture_output=True, text=True)
    assert "--limit 0" in r.stdout and "--finetune-args" not in r.stdout   # the world: none


def world_rows(task, methods):
    """(pipeline arguments, root, run folder, task paths) of the world's seed-0 run of `task`,
    for pipeline.method() without running anything."""
    import types
    paths = ("runs/world/model", f"runs/world/{task}/train.jsonl", "shots", "id.jsonl",
             "ood.jsonl", "option")
    a = types.SimpleNamespace(model="world", until="all", construct_args="", stage_args="",
                              eval_args="", methods=methods)
    return a, "runs/world", f"runs/world/{task}/s0", paths


def test_grait_rows_run_construct_finetune_evaluate_and_leave_grait_as_it_was():
    """Issue 15: each GRAIT ablation row is `construct.py --method grait` with its flags into its
    own folder, then finetune and evaluate there, and a report input; grait-less first trains
    the LESS warm-up (SPEC 5.3 step 1) on the rehearsal set and builds on it. The default grait
    row's commands are the world's (issue 26: --known, --model, --crss and the 152/38 counts for
    every method) plus GRAIT's warm-up and projection."""
    import evaluate
    import pipeline
    a, root, R, paths = world_rows("mcqa", list(pipeline.GRAIT_ROWS))

    def argvs(m):
        return {label.split(" ", 1)[1]: cmd[2:] for label, cmd, _, _ in
                pipeline.method(a, root, "mcqa", 0, paths, m)}
    assert argvs("grait") == {
        "construct grait": ["--method", "grait", "--items", paths[1], "--state",
                            f"{R}/probe_init.jsonl", "--flow", f"{R}/rehearsal/flow.jsonl",
                            "--out", f"{R}/grait/train.jsonl", "--mcqa-reader", "option",
                            "--seed", "0", "--known", f"{R}/init_basic/pred_pool.jsonl",
                            "--model", paths[0], "--crss", "--n-van", "152", "--n-idk", "38",
                            "--warmup", f"{R}/rehearsal/adapter", "--projection", "sketch"],
        "finetune grait": ["--model", paths[0], "--train", f"{R}/grait/train.jsonl", "--out",
                           f"{R}/grait/adapter", "--seed", "0", "--batch-size", "8",
                           "--grad-accum", "1", "--lr", "3e-3", "--lora-r", "16", "--epochs", "3"],
        **{f"evaluate grait {s}": ["--model", paths[0], "--items", f"{s}.jsonl", "--prompt",
                                   "refuse", "--out", f"{R}/grait/pred_{s}.jsonl",
                                   "--mcqa-reader", "option", "--adapter", f"{R}/grait/adapter"]
           for s in ("id", "ood")}}
    assert evaluate.GRAIT_ABLATIONS == tuple(pipeline.GRAIT_ROWS)[1:]   # each a report row
    report_inputs = pipeline.report(a, root, "mcqa", 0, paths)[0][3]
    for m, (flags, warm) in pipeline.GRAIT_ROWS.items():
        got = argvs(m)
        warmup = f"{R}/{'rehearsal' if warm == 'rehearsal' else 'less-warmup'}/adapter"
        base = argvs("grait")["construct grait"]
        k = base.index("--warmup") + 1
        assert got[f"construct {m}"] == [x.replace("/grait/", f"/{m}/") for x in base[:k]] + [
            warmup] + flags + ["--projection", "sketch"]
        assert got[f"finetune {m}"][got[f"finetune {m}"].index("--train") + 1] == \
            f"{R}/{m}/train.jsonl"
        assert got[f"evaluate {m} id"][-1] == f"{R}/{m}/adapter"
        assert f"{R}/{m}/pred_id.jsonl" in report_inputs
        assert ("finetune less-warmup" in got) == (m == "grait-less")
    less = argvs("grait-less")
    assert list(less)[0] == "finetune less-warmup"                      # before its construct
    assert less["finetune less-warmup"] == ["--model", paths[0], "--train",
                                            f"{R}/rehearsal/train.jsonl", "--out",
                                            f"{R}/less-warmup/adapter", "--seed", "0",
                                            *pipeline.LESS_WARMUP]


def test_token_rows_build_their_method_set_and_fine_tune_per_token():
    """Issue 27: cor-token / craft-token run their method's construct command into their own
    folder (the same training set), fine-tune it with --loss-reduction token, evaluate it, and
    feed the report; the cor and craft rows' commands do not change."""
    import evaluate
    import pipeline
    a, root, R, paths = world_rows("oeqa", list(pipeline.TOKEN_ROWS))

    def argvs(m):
        return {label.split(" ", 1)[1].replace(m, "<m>"): cmd[2:] for label, cmd, _, _ in
                pipeline.method(a, root, "oeqa", 0, paths, m)}
    assert evaluate.LOSS_ABLATIONS == tuple(pipeline.TOKEN_ROWS)          # each a report row
    report_inputs = pipeline.report(a, root, "oeqa", 0, paths)[0][3]
    for row, base in pipeline.TOKEN_ROWS.items():
        got, ref = argvs(row), argvs(base)
        assert list(got) == list(ref)
        assert got["construct <m>"] == [x.replace(f"/{base}/", f"/{row}/")
                                        for x in ref["construct <m>"]]
        assert got["construct <m>"][1] == base
        assert got["finetune <m>"] == [x.replace(f"/{base}/", f"/{row}/")
                                       for x in ref["finetune <m>"]] + ["--loss-reduction", "token"]
        assert "--loss-reduction" not in ref["finetune <m>"]
        for s in ("id", "ood"):
            assert got[f"evaluate <m> {s}"] == [x.replace(f"/{base}/", f"/{row}/")
                                                 for x in ref[f"evaluate <m> {s}"]]
            assert f"{R}/{row}/pred_{s}.jsonl" in report_inputs


def test_grait_less_trains_the_less_warmup_and_builds_on_it(tmp_path, small_world):
    """`--methods grait-less` on the small world (MCQA, up to construct): the LESS warm-up is a
    LoRA r 128, alpha 512, dropout 0.1 on q/k/v/o (its adapter_config.json), trained on the
    rehearsal set in the tulu format with the linear schedule (train_log against lr_at), and
    GRAIT's construct took its features there, in that format (its config)."""
    import finetune
    shutil.copytree(small_world, tmp_path / "world")
    r = sh("pipeline.py", "--world-args", "--preset small", "--tasks", "mcqa", "--methods",
           "grait-less", "--until", "construct", "--jobs", "2", "--out", str(tmp_path))
    R = tmp_path / "world" / "mcqa" / "s0"
    warm = R / "less-warmup" / "adapter"
    assert "world/mcqa/s0 finetune less-warmup: " in r.stderr
    cfg = json.loads((warm / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (128, 512, 0.1)
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "k_proj",
                                                                    "v_proj", "o_proj"}
    made = json.loads((R / "less-warmup" / "adapter.config.json").read_text())["args"]
    assert made["train"] == str(R / "rehearsal" / "train.jsonl")
    assert (made["format"], made["schedule"], made["lr"], made["epochs"]) == ("tulu", "linear",
                                                                              2e-5, 4)
    log = [json.loads(x) for x in open(warm / "train_log.jsonl")]
    steps = log[-1]["steps"]
    assert [row["lr"] for row in log[:-1]] == [
        finetune.lr_at(s, steps, 2e-5, 0.03, schedule="linear") for s in range(steps)]
    c = json.loads((R / "grait-less" / "train.jsonl.config.json").read_text())["args"]
    assert (c["method"], c["warmup"], c["warmup_format"]) == ("grait", str(warm), "tulu")
    ex = files.read_jsonl(str(R / "grait-less" / "train.jsonl"), check=files.check_example)
    assert {e["kind"] for e in ex} == {"van", "idk"}
    assert not (R / "grait").exists() and not (R / "grait-less" / "adapter").exists()

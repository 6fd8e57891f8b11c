"""Issue 9, reliability: interrupted runs resume to the uninterrupted result, bad inputs stop with
one line and no output, a seed gives the same files, and loading never runs pickled or remote code.

Everything runs on one small world (`world.py --preset small`) built once for this module, with the
world's MCQA pool (120 items, option reader) and tiny batches, so each stage has many batches or
steps to be interrupted between. Reference run A and repeat run B are plain subprocesses, each
stage exactly as a user types it, run from an empty working folder (nothing may appear there).
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rait import checkpoint, files, models
from rait.runs import cli
from kernels import lora
from kernels.base import InputError
from conftest import ROOT, sigint_default

PY = os.path.join(ROOT, ".venv", "bin", "python")
BAD = os.path.join(ROOT, "tests", "bad_inputs")
INTERRUPTED = "interrupted: partial results are kept; rerun the same command to resume"
STAGES = ("probe", "rehearse", "construct", "finetune", "evaluate", "world")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: one thread, and a private HF cache that must stay empty (every
    load here is local; nothing may be fetched or cached)."""
    hf = tmp_path_factory.mktemp("hf_home")
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}


def script(stage):
    return os.path.join(ROOT, f"{stage}.py")


def tree(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    out = {}
    for d, _, fs in os.walk(folder):
        for f in fs:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def files_under(folder):
    return sorted(tree(folder)) if os.path.isdir(folder) else []


# ----------------------------------------------------------------------------------------------
# the small world, the stage commands, reference run A and repeat run B
class Runs:
    def __init__(self, root, env):
        self.root, self.env = root, env
        self.cwd = root / "cwd"              # an empty working folder: must stay empty
        self.cwd.mkdir()
        self.W = str(root / "world")
        self.model = os.path.join(self.W, "model")
        self.pool = os.path.join(self.W, "mcqa", "train.jsonl")

    def run(self, cmd, check=True):
        r = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=300)
        if check:
            assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
        return r

    # Each command takes its inputs explicitly, so a stage can be rerun on run A's inputs.
    def probe(self, out):
        return [PY, script("probe"), "--model", self.model, "--items", self.pool, "--task", "mcqa",
                "--mcqa-reader", "option", "--batch-size", "1", "--out", out]

    def rehearse(self, state, out):
        return [PY, script("rehearse"), "--model", self.model, "--items", self.pool, "--state",
                state, "--out", out, "--mcqa-reader", "option", "--size", "32", "--",
                "--batch-size", "2", "--grad-accum", "1", "--epochs", "2", "--lr", "1e-3",
                "--lora-r", "8", "--save-steps", "1"]

    def construct(self, state, flow, out):
        return [PY, script("construct"), "--method", "craft", "--items", self.pool, "--state",
                state, "--flow", flow, "--out", out, "--mcqa-reader", "option"]

    def finetune(self, train, out):
        return [PY, script("finetune"), "--model", self.model, "--train", train, "--out", out,
                "--batch-size", "2", "--grad-accum", "1", "--epochs", "2", "--lr", "1e-3",
                "--lora-r", "8", "--save-steps", "1"]

    def evaluate(self, adapter, out):
        return [PY, script("evaluate"), "--model", self.model, "--adapter", adapter, "--items",
                self.pool, "--prompt", "refuse", "--mcqa-reader", "option", "--max-new-tokens",
                "6", "--batch-size", "1", "--out", out]

    def chain(self, R, a=None):
        """Every stage into folder R; with `a` (run A's folder), each stage reads A's inputs, so
        each stage's determinism is checked on its own."""
        src = a or R
        os.makedirs(R, exist_ok=True)
        self.run(self.probe(f"{R}/probe.jsonl"))
        if a is None:
            self.run(self.rehearse(f"{R}/probe.jsonl", f"{R}/rehearsal"))
        self.run(self.construct(f"{src}/probe.jsonl", f"{src}/rehearsal/flow.jsonl",
                                f"{R}/craft/train.jsonl"))
        self.run(self.finetune(f"{src}/craft/train.jsonl", f"{R}/craft/adapter"))
        self.run(self.evaluate(f"{src}/craft/adapter", f"{R}/craft/pred.jsonl"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    r = Runs(tmp_path_factory.mktemp("reliability"), env)
    # the small preset with 4 of its 12 pre-training epochs, 40 people and hidden 64: these tests
    # need the mechanics of every stage, not a model that knows much (a 120-item pool; the
    # adapter_wrong_shape case names the hidden size)
    r.run([PY, script("world"), "--preset", "small", "--epochs", "4", "--people", "40",
           "--hidden", "64", "--inter", "128", "--out", r.W])
    r.world_tree = tree(r.W)
    r.A = str(r.root / "A")
    r.chain(r.A)
    return r


@pytest.fixture(scope="module")
def run_b(runs):
    B = str(runs.root / "B")
    runs.chain(B, a=runs.A)
    return B


def read(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_weights(a, b, atol):
    """Adapter weights and Adam moments of two finetune.py output folders agree to atol."""
    for name in ("adapter_model.safetensors", "trainer_state.safetensors"):
        wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert wa and sorted(wa) == sorted(wb)
        for k in wa:
            if atol == 0:
                assert torch.equal(wa[k], wb[k]), f"{name}: {k} differs"
            else:
                torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=f"{name}: {k}")


# ----------------------------------------------------------------------------------------------
# interruption: SIGKILL (no chance to clean up) or SIGINT (Ctrl-C), then the same command again
def interrupt(runs, cmd, ready, sig, tmp_path, timeout=120):
    """Start cmd, wait until ready() says it is mid-run, send sig to its process group (as a
    terminal's Ctrl-C, or a kill of the job, reaches rehearse.py's sub-commands too); return
    (exit code, stderr)."""
    err_path = tmp_path / f"stderr-{time.time_ns()}.txt"
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=runs.cwd, env=runs.env, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True, preexec_fn=sigint_default)
        t0 = time.time()
        while p.poll() is None and not ready() and time.time() - t0 < timeout:
            time.sleep(0.005)
        alive = p.poll() is None
        if alive:
            os.killpg(p.pid, sig)
        code = p.wait(timeout=120)
    text = err_path.read_text()
    assert alive, f"the run ended (exit {code}) before it could be interrupted:\n{text[-2000:]}"
    return code, text


def lines_of(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def batches_done(part, n=1):
    """A partial file of resumable_batches holds its key line and at least n finished batches."""
    return lambda: lines_of(part) >= 1 + n


def checkpoint_exists(out_dir):
    return lambda: os.path.isfile(os.path.join(out_dir, "checkpoint", "trainer_state.safetensors"))


def assert_clean_interrupt(code, err):
    """Ctrl-C: exit 130, no traceback, and the last line of stderr is the one-line message."""
    assert code == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last == INTERRUPTED
    assert err.count("interrupted:") == 1


def test_probe_ctrl_c_then_rerun_equals_uninterrupted(runs, tmp_path):
    """(SIGKILL of probe.py is covered in test_probe.py; here Ctrl-C on the world.)"""
    out = str(tmp_path / "probe.jsonl")
    code, err = interrupt(runs, runs.probe(out), batches_done(out + ".part0", 2), signal.SIGINT,
                          tmp_path)
    assert_clean_interrupt(code, err)
    assert not os.path.exists(out) and lines_of(out + ".part0") >= 3      # partial work kept
    r = runs.run(runs.probe(out))
    assert "[resume]" in r.stderr
    assert read(out) == read(f"{runs.A}/probe.jsonl")
    assert not glob.glob(out + ".part*")


def test_finetune_killed_then_rerun_equals_uninterrupted(runs, tmp_path):
    """About 60 steps (batch 2, 2 epochs) with a checkpoint after each; LoRA dropout is on, so
    the RNG state must resume exactly too. (Ctrl-C in training: the rehearse test below.)"""
    out = str(tmp_path / "adapter")
    cmd = runs.finetune(f"{runs.A}/craft/train.jsonl", out)
    code, _ = interrupt(runs, cmd, checkpoint_exists(out), signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "trainer_state.safetensors"))   # not finished
    r = runs.run(cmd)
    assert "[resume]" in r.stderr and "continuing after step" in r.stderr
    assert_same_weights(f"{runs.A}/craft/adapter", out, atol=1e-6)
    assert not glob.glob(os.path.join(out, "checkpoint*"))
    n = len(files.read_jsonl(f"{runs.A}/craft/train.jsonl"))
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(out, "train_log.jsonl"))
             if '"step"' in ln]
    assert steps == list(range(1, 2 * -(-n // 2) + 1))    # the log has each step once


def test_rehearse_ctrl_c_in_training_then_killed_in_reprobe(runs, tmp_path):
    """Ctrl-C while rehearse.py trains (a checkpoint exists), rerun, SIGKILL while it re-probes
    (a partial probe file exists), rerun: every file equals the uninterrupted run's."""
    out = str(tmp_path / "rehearsal")
    cmd = runs.rehearse(f"{runs.A}/probe.jsonl", out)
    code, err = interrupt(runs, cmd, checkpoint_exists(os.path.join(out, "adapter")),
                          signal.SIGINT, tmp_path)
    assert_clean_interrupt(code, err)
    assert not os.path.exists(os.path.join(out, "adapter", "trainer_state.safetensors"))
    part = os.path.join(out, "probe.jsonl.part0")
    code, err = interrupt(runs, cmd, batches_done(part, 2), signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    assert "continuing after step" in err                 # the first rerun resumed training
    assert not os.path.exists(os.path.join(out, "flow.jsonl"))
    r = runs.run(cmd)
    assert "already trained" in r.stderr and "[resume]" in r.stderr
    for f in ("train.jsonl", "probe.jsonl", "flow.jsonl", "flow_summary.json"):
        assert read(os.path.join(out, f)) == read(f"{runs.A}/rehearsal/{f}"), f
    assert_same_weights(f"{runs.A}/rehearsal/adapter", os.path.join(out, "adapter"), atol=1e-6)


def test_evaluate_killed_then_rerun_equals_uninterrupted(runs, tmp_path):
    """(Ctrl-C in evaluate.py runs the same resumable_batches as the probe test above, and
    test_evaluate.py interrupts it in-process.)"""
    out = str(tmp_path / "pred.jsonl")
    cmd = runs.evaluate(f"{runs.A}/craft/adapter", out)
    code, _ = interrupt(runs, cmd, batches_done(out + ".part0", 2), signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    assert not os.path.exists(out) and lines_of(out + ".part0") >= 3
    r = runs.run(cmd)
    assert "[resume]" in r.stderr
    assert read(out) == read(f"{runs.A}/craft/pred.jsonl")
    assert not glob.glob(out + ".part*")


# ----------------------------------------------------------------------------------------------
# stale work (issue 17): resume and "already done" are keyed by the contents of the inputs
def with_flag(cmd, flag, value):
    cmd = list(cmd)
    cmd[cmd.index(flag) + 1] = value
    return cmd


def test_probe_killed_then_an_item_fixed_starts_over(runs, tmp_path):
    """Kill a probe, fix an item's answer (as the README advises for a bad item), rerun: the
    partial work of the old items is not reused; the result equals a fresh run on the fixed
    items."""
    items, out, fresh = tmp_path / "items.jsonl", str(tmp_path / "p.jsonl"), str(tmp_path / "f.jsonl")
    shutil.copy(runs.pool, items)
    cmd = with_flag(runs.probe(out), "--items", str(items))
    code, _ = interrupt(runs, cmd, batches_done(out + ".part0", 3), signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    rows = files.read_jsonl(str(items))
    first = rows[0]                                  # in the first batch: already probed
    first["answer"] = "ABCD"[("ABCD".index(first["answer"]) + 1) % 4]
    files.write_jsonl(str(items), rows)
    r = runs.run(cmd)
    assert "made with other items, starting over" in r.stderr, r.stderr[-2000:]
    runs.run(with_flag(cmd, "--out", fresh))
    assert read(out) == read(fresh)
    old = files.read_jsonl(f"{runs.A}/probe.jsonl")[0]
    assert files.read_jsonl(out)[0]["mu"] != old["mu"]     # the fix changed this item's answer


def test_evaluate_killed_then_the_adapter_retrained_starts_over(runs, tmp_path):
    """Kill an evaluation, replace the adapter in place by another training's, rerun: no
    prediction of the old adapter survives."""
    adapter, out = tmp_path / "adapter", str(tmp_path / "pred.jsonl")
    shutil.copytree(f"{runs.A}/craft/adapter", adapter)
    cmd = runs.evaluate(str(adapter), out)
    code, _ = interrupt(runs, cmd, batches_done(out + ".part0", 3), signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):     # "retrained in place"
        shutil.copy(f"{runs.A}/rehearsal/adapter/{name}", adapter / name)
    r = runs.run(cmd)
    assert "made with other adapter, starting over" in r.stderr, r.stderr[-2000:]
    fresh = str(tmp_path / "fresh.jsonl")
    runs.run(runs.evaluate(f"{runs.A}/rehearsal/adapter", fresh))
    assert read(out) == read(fresh)


def test_a_truncated_final_adapter_is_trained_again(runs, tmp_path):
    """A finished run whose adapter weights were cut short (a kill or a full disk after the
    trainer state) is not `already trained`: the rerun trains again and gets the same weights."""
    out = tmp_path / "adapter"
    shutil.copytree(f"{runs.A}/craft/adapter", out)
    w = out / lora.ADAPTER_WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    r = runs.run(runs.finetune(f"{runs.A}/craft/train.jsonl", str(out)))
    assert "already trained" not in r.stderr
    assert f"{lora.ADAPTER_WEIGHTS}: " in r.stderr and "training again" in r.stderr
    assert_same_weights(f"{runs.A}/craft/adapter", str(out), atol=1e-6)


def test_a_damaged_checkpoint_is_not_resumed(runs, tmp_path):
    """A checkpoint cut short (a kill or a full disk while it was written) is passed over with
    one line; the run trains from the start and gets the uninterrupted run's weights."""
    out = tmp_path / "adapter"
    shutil.copytree(f"{runs.A}/craft/adapter", out / "checkpoint")
    state = out / "checkpoint" / lora.TRAINER_STATE
    state.write_bytes(state.read_bytes()[:300])
    r = runs.run(runs.finetune(f"{runs.A}/craft/train.jsonl", str(out)))
    assert "checkpoint: damaged (trainer_state.safetensors: header length" in r.stderr
    assert "continuing after step" not in r.stderr
    assert_same_weights(f"{runs.A}/craft/adapter", str(out), atol=1e-6)


def test_a_damaged_probe_config_is_one_line(runs, tmp_path):
    """rehearse.py repeats the initial probe's recorded arguments; a damaged record is a
    one-line error naming it, not a JSONDecodeError."""
    state = tmp_path / "probe.jsonl"
    shutil.copy(f"{runs.A}/probe.jsonl", state)
    (tmp_path / "probe.jsonl.config.json").write_text('{"args": ')
    r = runs.run(runs.rehearse(str(state), str(tmp_path / "rehearsal")), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: {state}.config.json: not a stage config JSON file")


def test_the_training_key_follows_the_base_model_contents(runs, tmp_path):
    """The same arguments on a base model whose weights changed are another run (its checkpoint
    and final adapter are not reused)."""
    import argparse
    import finetune
    model = tmp_path / "model"
    shutil.copytree(runs.model, model)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    finetune.add_train_args(ap)
    args = ap.parse_args(["--model", str(model)])
    ex = [{"id": "x", "prompt": "q", "target": "a", "weight": 1.0}]
    k1 = finetune.run_key(args, ex, 1)
    assert finetune.run_key(args, ex, 1) == k1
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1                                  # one bit of one weight
    w.write_bytes(bytes(data))
    assert finetune.run_key(args, ex, 1) != k1


def test_safetensors_problem_finds_truncation_and_garbage(runs, tmp_path):
    good = os.path.join(runs.A, "craft", "adapter", lora.ADAPTER_WEIGHTS)
    assert files.safetensors_problem(good) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(read(good)[:-1])
    assert "truncated" in files.safetensors_problem(str(cut))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\0\0\0\0\0\0\0not json at all!")
    assert "header" in files.safetensors_problem(str(junk))


# ----------------------------------------------------------------------------------------------
# determinism: the same command twice on CPU gives the same bytes (and bit-equal weights)
def test_same_seed_same_files(runs, run_b):
    A, B = runs.A, run_b
    for f in ("probe.jsonl", "craft/train.jsonl", "craft/train.jsonl.summary.json",
              "craft/pred.jsonl"):
        assert read(f"{A}/{f}") == read(f"{B}/{f}"), f
    assert_same_weights(f"{A}/craft/adapter", f"{B}/craft/adapter", atol=0)


def test_a_different_seed_changes_the_result(runs, tmp_path, monkeypatch):
    """The determinism test above could pass if the seed were ignored; it is not."""
    import finetune
    out = str(tmp_path / "adapter")
    argv = runs.finetune(f"{runs.A}/craft/train.jsonl", out)[2:-2] + ["--save-steps", "0",
                                                                      "--seed", "1"]
    monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
    grad = torch.is_grad_enabled()
    cli(finetune.main)
    torch.set_grad_enabled(grad)
    a = load_file(f"{runs.A}/craft/adapter/adapter_model.safetensors")
    b = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# bad inputs: non-zero exit, one line `error: file:line: reason` (or `file: reason`), no output
def bad(name):
    return os.path.join(BAD, name)


# case -> (stage, the flag that gets the bad file, line number or None, reason substring)
BAD_CASES = {
    "items_truncated_json.jsonl": ("probe", "--items", 2, "invalid JSON (Unterminated string"),
    "items_not_utf8.jsonl": ("probe", "--items", 2, "not UTF-8 (invalid start byte at byte"),
    "items_empty.jsonl": ("probe", "--items", None, "empty file (no records)"),
    "items_blank_lines.jsonl": ("probe", "--items", None, "empty file (no records)"),
    "items_duplicate_id.jsonl": ("probe", "--items", 3, "duplicate id 'bad-1' (first on line 1)"),
    "items_answer_letter_outside.jsonl": ("probe", "--items", 2,
                                          "answer 'E' is not one of the letters ABCD"),
    "items_answer_lowercase.jsonl": ("probe", "--items", 2,
                                     "answer 'b' is not one of the letters ABCD"),
    "items_missing_question.jsonl": ("probe", "--items", 2, "missing field 'question'"),
    "items_choices_not_list.jsonl": ("probe", "--items", 2,
                                     "mcqa item needs 'choices', a list of strings"),
    "items_id_not_string.jsonl": ("probe", "--items", 2, "'id' must be a non-empty string"),
    "items_not_object.jsonl": ("probe", "--items", 2, "expected a JSON object, got list"),
    "items_task_mismatch.jsonl": ("probe", "--items", 2, "item task 'oeqa' does not match --task"),
    "items_meta_not_object.jsonl": ("probe", "--items", 2, "'meta' must be an object"),
    "items_oeqa_empty_aliases.jsonl": ("probe", "--items", 2, "needs 'aliases', a non-empty list"),
    # issue 17: values that used to pass and give wrong results, or a traceback
    "items_answer_two_letters.jsonl": ("probe", "--items", 2,
                                       "answer 'BC' is not one of the letters ABCD"),
    "items_answer_empty.jsonl": ("probe", "--items", 2, "answer '' is not one of the letters ABCD"),
    "items_duplicate_key.jsonl": ("probe", "--items", 2, "duplicate key 'answer' in one object"),
    "items_nan_in_meta.jsonl": ("probe", "--items", 2, "'meta.exposure' must be a finite number"),
    "items_huge_integer.jsonl": ("probe", "--items", 2, "invalid JSON (Exceeds the limit"),
    "items_deep_nesting.jsonl": ("probe", "--items", 2, "invalid JSON (nested too deep)"),
    "items_oeqa_blank_alias.jsonl": ("probe", "--items", 2, "a non-empty list of non-blank strings"),
    "adapter_negative_alpha": ("probe", "--adapter", None,
                               "lora_alpha must be a finite number > 0, got -8"),
    "items_mixed_tasks.jsonl": ("evaluate", "--items", None, "mixes tasks ['mcqa', 'oeqa']"),
    "10 MB line (made in the test)": ("probe", "--items", 2, "bytes exceeds 1048576"),
    "state_mu_out_of_range.jsonl": ("rehearse", "--state", 2, "'mu' must lie in [0, 1], got 1.5"),
    "state_nan_sigma.jsonl": ("rehearse", "--state", 2, "'sigma' must be a finite number"),
    "state_unknown_ids.jsonl": ("rehearse", "--state", None, "ids do not match"),
    "flow_not_a_number.jsonl": ("construct", "--flow", 2, "'flow' must be a finite number"),
    "train_nan_weight.jsonl": ("finetune", "--train", 2, "'weight' must be a finite number"),
    "train_infinite_weight.jsonl": ("finetune", "--train", 2, "'weight' must be a finite number"),
    "train_negative_weight.jsonl": ("finetune", "--train", 2, "'weight' must be >= 0, got -0.5"),
    "train_weight_string.jsonl": ("finetune", "--train", 2,
                                  "'weight' must be a finite number, got '1.0'"),
    "train_missing_target.jsonl": ("finetune", "--train", 2,
                                   "missing or non-string field 'target'"),
    "train_unknown_kind.jsonl": ("finetune", "--train", 2, "'kind' must be van or idk"),
    "train_duplicate_id.jsonl": ("finetune", "--train", 3, "duplicate id 'e1'"),
    "model_not_a_model": ("probe", "--model", None, "not a model folder (no config.json)"),
    "model_no_weights": ("probe", "--model", None, "refusing to load: no .safetensors weights"),
    "pickle checkpoint (made in the test)": ("probe", "--model", None,
                                             "refusing to load: only pickle checkpoints "
                                             "(pytorch_model.bin); they can run arbitrary code"),
    "adapter_wrong_shape": ("probe", "--adapter", None, "the model needs (4, 64)"),
    "adapter_wrong_shape (evaluate)": ("evaluate", "--adapter", None, "the model needs (4, 64)"),
    "adapter_no_config": ("probe", "--adapter", None, "missing (not a peft adapter folder)"),
    "pickle adapter (made in the test)": ("probe", "--adapter", None,
                                          "refusing to load a pickle checkpoint (it can run code)"),
    "truncated model.safetensors (made in the test)": (
        "probe", "--model", None, "cannot load model (Error while deserializing header"),
    "truncated tokenizer.json (made in the test)": ("probe", "--model", None,
                                                    "cannot load tokenizer"),
    "mmlu_short_row": ("data", "--src", None, "anatomy_test.csv:2: expected question, 4 options "
                       "and a gold letter"),
    "mmlu_not_utf8": ("data", "--src", None, "anatomy_test.csv:2: not UTF-8"),
    # issue 29: silent wrong labels, non-finite values, tracebacks
    "items_duplicate_option.jsonl": ("probe", "--items", 2, "options B and C repeat the text "
                                     "'pilot'"),
    "items_empty_option.jsonl": ("probe", "--items", 2, "option B is blank"),
    "items_oeqa_zero_width_alias.jsonl": ("probe", "--items", 2, "non-empty list of non-blank"),
    "train_all_zero_weights.jsonl": ("finetune", "--train", None,
                                     "every example has 'weight' 0; nothing would be trained"),
    "long prompt (made in the test)": ("probe", "--items", None, "item 'long': prompt of 30"),
    "long prompt for evaluate (made in the test)": ("evaluate", "--items", None,
                                                 "exceeds the model's context of 2048 tokens"),
    "NaN weights model (made in the test)": ("probe", "--model", None,
                                             "the weights hold NaN or infinite values"),
    "vocab_size config (made in the test)": ("probe", "--model", None, "config.json does not "
                                             "match the weights (model.embed_tokens.weight: "),
    "intermediate_size config (made in the test)": ("probe", "--model", None,
                                                    "config.json does not match the weights"),
    "tokenizer without pad or eos (made in the test)": ("probe", "--model", None,
                                                        "neither a pad nor an eos token"),
    "arc_no_id": ("data", "--src", None, "ARC-Challenge-Test.jsonl:2: expected an id"),
    "arc_no_stem": ("data", "--src", None, "ARC-Challenge-Test.jsonl:2: expected an id, "
                    "question.stem"),
    "nq_not_utf8": ("data", "--src", None, "dev.csv:3: not UTF-8"),
    "nq 200 KiB field (made in the test)": ("data", "--src", None, "dev.csv:3: not a CSV row "
                                            "(field larger than field limit"),
}
# data.py is not ours to fix (see the issue 9 report); these show the gap until it is fixed
XFAIL = {}   # bad inputs whose handling is a known gap (none at present)


class Payload:
    """Unpickling this creates `path`: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_generated(case, tmp, world_model):
    """The bad inputs not committed to tests/bad_inputs/ (10 MB, pickles, copies of the world's
    model); returns the path."""
    if case.startswith("truncated"):
        d = tmp / "truncated_model"
        shutil.copytree(world_model, d)
        name = case.split(" ")[1]
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:len(data) // 3])     # an interrupted download
        return str(d)
    if case.startswith("10 MB"):
        p = tmp / "items_10mb_line.jsonl"
        with open(p, "w") as f:
            f.write(json.dumps({"id": "a", "task": "oeqa", "question": "Q?", "answer": "x",
                                "aliases": ["x"]}) + "\n")
            f.write(json.dumps({"id": "b", "task": "oeqa", "question": "Q" * 10_000_000,
                                "answer": "x", "aliases": ["x"]}) + "\n")
        return str(p)
    if case.startswith("long prompt"):         # 3,000 words: the world's context is 2,048
        p = tmp / "items_long.jsonl"
        item = files.read_jsonl(os.path.join(os.path.dirname(world_model), "mcqa",
                                             "train.jsonl"))[0]
        files.write_jsonl(str(p), [dict(item, id="short", question="Who?"),
                                   dict(item, id="long", question="word " * 3000)])
        return str(p)
    if case.startswith("nq"):
        d = tmp / "nq_huge_field"
        d.mkdir()
        (d / "dev.csv").write_text("qid,lang,question,answer,answers\nq1,en,who?,bob,\"['bob']\"\n"
                                   f"q2,en,{'x' * 200_000},bob,\"['bob']\"\n")
        return str(d)
    if not case.startswith("pickle"):          # a copy of the world's model, changed
        d = tmp / "changed_model"
        shutil.copytree(world_model, d)
        if case.startswith("NaN"):
            from safetensors.torch import save_file
            w = load_file(d / "model.safetensors")
            k = sorted(w)[-1]
            w[k] = torch.full_like(w[k], float("nan"))
            save_file(w, d / "model.safetensors", metadata={"format": "pt"})
        else:
            name = "tokenizer_config.json" if case.startswith("tokenizer") else "config.json"
            cfg = json.loads((d / name).read_text())
            if case.startswith("tokenizer"):
                cfg.pop("eos_token"), cfg.pop("pad_token")
            else:
                key = case.split(" ")[0]
                cfg[key] = cfg[key] + 10 if key == "vocab_size" else cfg[key] // 2
            (d / name).write_text(json.dumps(cfg))
        return str(d)
    evil = {"weights": torch.zeros(2), "payload": Payload(str(tmp / "UNPICKLED"))}
    d = tmp / ("pickle_model" if case.startswith("pickle checkpoint") else "pickle_adapter")
    d.mkdir()
    if case.startswith("pickle checkpoint"):
        shutil.copy(os.path.join(world_model, "config.json"), d / "config.json")
        torch.save(evil, d / "pytorch_model.bin")
    else:
        shutil.copy(bad("adapter_wrong_shape/adapter_config.json"), d / "adapter_config.json")
        torch.save(evil, d / "adapter_model.bin")
    return str(d)


def stage_argv(runs, stage, flag, path, out, tmp):
    """A command line for `stage` whose inputs are good except `flag`, which gets `path`."""
    good_state = str(tmp / "state.jsonl")     # a valid knowledge state for every pool item
    files.write_jsonl(good_state, [{"id": it["id"], "mu": 0.5, "sigma": -0.5}
                                    for it in files.read_jsonl(runs.pool)])
    pool, model = runs.pool, runs.model
    if flag == "--items" and stage == "probe":
        task = "oeqa" if "oeqa" in path or "10mb" in path else "mcqa"
        args = {"--model": model, "--items": path, "--task": task, "--out": f"{out}/probe.jsonl",
                **({"--mcqa-reader": "option"} if task == "mcqa" else {})}
    elif stage == "probe":
        args = {"--model": model, "--items": pool, "--task": "mcqa", "--mcqa-reader": "option",
                "--out": f"{out}/probe.jsonl", flag: path}
    elif stage == "rehearse":
        args = {"--model": model, "--items": pool, "--state": path, "--out": f"{out}/rehearsal"}
    elif stage == "construct":
        args = {"--method": "craft", "--items": pool, "--state": good_state, "--flow": path,
                "--out": f"{out}/train.jsonl"}
    elif stage == "finetune":
        args = {"--model": model, "--train": path, "--out": f"{out}/adapter"}
    elif stage == "evaluate":
        args = {"--model": model, "--items": pool, "--prompt": "refuse", "--mcqa-reader": "option",
                "--out": f"{out}/pred.jsonl", flag: path}
    elif stage == "data":       # the dataset is the folder's first word: mmlu_..., arc_..., nq_...
        return [os.path.basename(path).split("_")[0], "--src", path, "--out", f"{out}/data"]
    return [x for kv in args.items() for x in kv]


def run_stage(stage, argv, monkeypatch, capsys):
    """Run a stage in this process exactly as its __main__ does; (exit code, stderr lines)."""
    import importlib
    mod = importlib.import_module(stage)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", *argv])     # finetune.main reads sys.argv
    grad = torch.is_grad_enabled()
    capsys.readouterr()
    code = 0                            # a run that ends without sys.exit
    try:
        cli(lambda: mod.main(argv) if stage != "finetune" else mod.main())
    except SystemExit as e:
        code = e.code
    torch.set_grad_enabled(grad)
    unlock_all()
    err = capsys.readouterr().err.replace("\r", "\n")
    return code, err


def unlock_all():
    for lock in list(files._LOCKS):     # what the process's exit does (files.lock_output)
        files._unlock(lock)


def assert_one_line_error(code, err, where, reason):
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    # the only other stderr lines allowed are transformers' weight-loading bar, stage logs and
    # a stage's progress bar (a bad item can stop a run in its first batch)
    other = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("error:")
             and not ln.startswith(("Loading weights", "[")) and "%|" not in ln]
    assert len(errors) == 1 and not other, err
    assert errors[0].startswith(f"error: {where}"), errors[0]
    assert reason in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c])) if c in XFAIL else c
    for c in BAD_CASES])
def test_bad_input(case, runs, tmp_path, monkeypatch, capsys):
    stage, flag, line, reason = BAD_CASES[case]
    if case.endswith("(made in the test)"):
        path = make_generated(case, tmp_path, runs.model)
    else:
        path = bad(case.split(" ")[0])
    out = tmp_path / "out"
    argv = stage_argv(runs, stage, flag, path, str(out), tmp_path)
    code, err = run_stage(stage, argv, monkeypatch, capsys)
    if os.path.isdir(path):   # a folder's message names the folder or the file in it at fault
        where = path
    else:
        where = f"{path}:{line}: " if line else f"{path}: "
    assert_one_line_error(code, err, where, reason)
    assert files_under(out) == [], "a failed run left output files"
    assert not os.path.exists(tmp_path / "UNPICKLED"), "a pickle was loaded"


def test_bad_inputs_folder_is_complete():
    """Every committed bad input is exercised by test_bad_input."""
    committed = sorted(os.listdir(BAD))
    used = sorted({c.split(" ")[0] for c in BAD_CASES if not c.endswith("(made in the test)")})
    assert committed == used
    assert len(committed) >= 20 and len(BAD_CASES) - len(XFAIL) >= 20


def test_bad_input_in_a_subprocess_has_no_traceback(runs, tmp_path):
    """The same through the real entry point: exit 2, exactly one stderr line."""
    path = bad("items_not_utf8.jsonl")
    r = runs.run([PY, script("probe"), "--model", runs.model, "--items", path, "--task", "mcqa",
                  "--out", str(tmp_path / "o.jsonl")], check=False)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {path}:2: not UTF-8 (invalid start byte at byte 70)"]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# safe loading and output confinement
def test_remote_code_is_never_run(runs, tmp_path, monkeypatch, capsys):
    """A model folder whose config asks for its own Python code: refused with one line, and the
    code never runs (no stage passes trust_remote_code=True)."""
    d = tmp_path / "remote_code_model"
    d.mkdir()
    marker = tmp_path / "REMOTE_CODE_RAN"
    cfg = json.load(open(os.path.join(runs.model, "config.json")))
    cfg.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import LlamaConfig as EvilConfig\n"
                                        "from transformers import LlamaForCausalLM as "
                                        "EvilForCausalLM\n")
    shutil.copy(os.path.join(runs.model, "model.safetensors"), d)
    out = tmp_path / "out"
    code, err = run_stage("probe", ["--model", str(d), "--items", runs.pool, "--task", "mcqa",
                                    "--mcqa-reader", "option", "--out", str(out / "p.jsonl")],
                          monkeypatch, capsys)
    assert_one_line_error(code, err, f"{d}: cannot load model", "")
    assert not marker.exists(), "the model folder's own code ran"
    assert files_under(out) == []


@pytest.mark.parametrize("stage", [
    "probe", "rehearse", "finetune", "evaluate", "world", "data", "pipeline", "construct"])
def test_help_works(stage, monkeypatch, capsys):
    """`--help` is the first thing a user runs after an error message."""
    import importlib
    mod = importlib.import_module(stage)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        mod.main() if stage in ("finetune", "pipeline") else mod.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["probe", "rehearse", "construct", "finetune", "evaluate"])
def test_stage_has_trust_remote_code_flag(stage, monkeypatch, capsys):
    import importlib
    mod = importlib.import_module(stage)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", "--help"])
    with pytest.raises(SystemExit):
        mod.main() if stage == "finetune" else mod.main(["--help"])
    assert "--trust-remote-code" in capsys.readouterr().out


UNWRITABLE = {   # stage -> argv with OUT standing for the output
    "probe": lambda r: ["--model", r.model, "--items", r.pool, "--task", "mcqa",
                        "--mcqa-reader", "option", "--out", "OUT"],
    "rehearse": lambda r: ["--model", r.model, "--items", r.pool, "--state",
                           f"{r.A}/probe.jsonl", "--out", "OUT", "--mcqa-reader", "option"],
    "construct": lambda r: ["--method", "craft", "--items", r.pool, "--state",
                            f"{r.A}/probe.jsonl", "--flow", f"{r.A}/rehearsal/flow.jsonl",
                            "--out", "OUT"],
    "finetune": lambda r: ["--model", r.model, "--train", f"{r.A}/craft/train.jsonl",
                           "--out", "OUT"],
    "evaluate": lambda r: ["--model", r.model, "--items", r.pool, "--prompt", "basic",
                           "--out", "OUT"],
    "world": lambda r: ["--preset", "small", "--out", "OUT"],
}


@pytest.mark.parametrize("stage", list(UNWRITABLE))
def test_unwritable_output_fails_before_any_work(stage, runs, tmp_path, monkeypatch, capsys):
    """--out below a regular file (a real OSError even as root): one line saying so, before any
    model is loaded or trained."""
    import world
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    out = str(blocker / "sub" / ("out" if stage in ("rehearse", "finetune", "world")
                                 else "out.jsonl"))
    argv = [out if a == "OUT" else a for a in UNWRITABLE[stage](runs)]

    def no(*a, **k):
        raise AssertionError("started work before checking the output folder")
    monkeypatch.setattr(models, "load_model", no)
    monkeypatch.setattr(world, "pretrain", no)
    code, err = run_stage(stage, argv, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{blocker}/sub/", "output location is not writable "
                          "(Not a directory)")
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("stage", ["probe", "construct", "evaluate"])
def test_output_that_is_a_folder_fails_before_any_work(stage, runs, tmp_path, monkeypatch,
                                                       capsys):
    """--out naming an existing folder used to fail only at the final rename, after all the
    work, with a traceback and a stray temporary file."""
    out = tmp_path / "out.jsonl"
    out.mkdir()
    argv = [str(out) if a == "OUT" else a for a in UNWRITABLE[stage](runs)]
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run_stage(stage, argv, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{out}: ", "is a folder; the output must be a file name")
    assert os.listdir(tmp_path) == ["out.jsonl"] and os.listdir(out) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(OSError):
        files.write_jsonl(str(tmp_path / "out.jsonl"), [{"id": "a"}])
    assert os.listdir(tmp_path) == ["out.jsonl"]


def run_flags(stage, argv, monkeypatch, capsys):
    """(exit code, last stderr line) of a stage run in-process with bad flags."""
    code, err = run_stage(stage, argv, monkeypatch, capsys)
    assert "Traceback" not in err
    return code, [ln for ln in err.splitlines() if ln.strip()][-1]


@pytest.mark.parametrize("stage,flags,message", [
    ("finetune", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("finetune", ["--lora-r", "0", "--epochs", "0"],
     "--epochs must be >= 1; --lora-r must be >= 1"),
    ("finetune", ["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    ("rehearse", ["--size", "0"], "--size must be >= 1"),
    ("rehearse", ["--launcher", "torchrun '"], "--launcher: No closing quotation"),
    ("probe", ["--temperature", "1e-300"],           # was a RuntimeError in the sampler
     "need 0.01 <= --temperature < inf, 0 < --top-p <= 1, --max-new-tokens >= 1"),
    # issue 29: tracebacks in files.dumps after training, or an overflow after the output began
    ("finetune", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("finetune", ["--lora-alpha", "1e400"], "--lora-alpha must be a finite number, got inf"),
    ("finetune", ["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    ("finetune", ["--seed", str(2 ** 64)], f"--seed must lie in [0, 2**63), got {2 ** 64}"),
])
def test_training_flags_out_of_range(stage, flags, message, runs, tmp_path, monkeypatch, capsys):
    """They used to end in a ZeroDivisionError traceback (batch 0, r 0), in an "adapter" trained
    for 0 steps (epochs 0), or with rehearse's train.jsonl written before the error (size 0).
    (rehearse's training flags are finetune.py's to check: the next test.)"""
    out = tmp_path / "out"
    argv = [a if a != "OUT" else str(out) for a in UNWRITABLE[stage](runs)] + flags
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, last = run_flags(stage, argv, monkeypatch, capsys)
    assert code == 2 and last == f"{stage}.py: error: {message}"
    assert not out.exists()


def test_rehearse_training_flags_are_checked_by_finetune(runs, tmp_path):
    """rehearse.py hands the flags after `--` to finetune.py, which rejects a bad one before loading
    anything: its usage error, then rehearse's one line naming the command and its exit status;
    no traceback, and nothing made but the rehearsal set (cheap; the rerun writes it again)."""
    out = tmp_path / "rehearsal"
    cmd = runs.rehearse(f"{runs.A}/probe.jsonl", str(out))
    cmd = cmd[:cmd.index("--") + 1] + ["--epochs", "1", "--lr=-1e-3"]
    r = runs.run(cmd, check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "finetune.py: error: --lr must be > 0" in lines
    assert lines[-1].startswith("error: ") and "finetune.py --model" in lines[-1]
    assert lines[-1].endswith("--epochs 1 --lr=-1e-3: failed (exit 2)"), lines[-1]
    assert files_under(out) == ["train.jsonl"]


@pytest.mark.parametrize("flag", ["--grad-batch-size", "--grad-dim", "--grait-temperature"])
def test_grait_flags_out_of_range(flag, runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "train.jsonl"
    argv = [a if a != "OUT" else str(out) for a in UNWRITABLE["construct"](runs)]
    argv[argv.index("craft")] = "grait"
    argv += ["--model", bad("model_not_a_model"), "--warmup", f"{runs.A}/rehearsal/adapter",
             flag, "0"]
    code, last = run_flags("construct", argv, monkeypatch, capsys)
    assert code == 2 and flag in last        # rejected for the flag, before loading a model
    assert not out.exists()


def test_outputs_stay_in_the_output_folder(runs, run_b, env):
    """After every run above: the working folder is still empty, the world's folder (an input)
    is unchanged, nothing was cached under HF_HOME, and run B wrote only under B."""
    assert os.listdir(runs.cwd) == []
    assert tree(runs.W) == runs.world_tree
    assert files_under(env["HF_HOME"]) == []
    top = sorted(os.listdir(runs.root))
    assert set(top) <= {"cwd", "world", "A", "B"}, top
    assert {f.split(os.sep)[0] for f in files_under(run_b)} == {"probe.jsonl",
                                                                 "probe.jsonl.config.json",
                                                                 "craft"}


def test_train_log_torn_by_a_kill_is_cut_at_the_checkpoint(tmp_path):
    """A SIGKILL mid-write can leave half a log line; the resumed run drops it with the steps
    after its checkpoint instead of failing on it."""
    import finetune
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)]
    done = json.dumps({"done": True, "steps": 4}) + "\n"    # killed before the final save
    (tmp_path / checkpoint.LOG).write_text("".join(lines) + done + '{"step": 5, "lo')
    finetune.open_log(str(tmp_path), 3).close()
    assert (tmp_path / checkpoint.LOG).read_text() == "".join(lines[:3])


def test_kill_after_the_final_save_is_completed_by_a_rerun(runs, tmp_path, monkeypatch, capsys):
    """finetune.py writes its config and log, then the trainer state (the completion mark), then
    removes its checkpoints; killed between the last two, a rerun only tidies up."""
    import finetune
    out = tmp_path / "adapter"
    shutil.copytree(f"{runs.A}/craft/adapter", out)
    shutil.copytree(out, tmp_path / "checkpoint")
    shutil.move(tmp_path / "checkpoint", out / "checkpoint")          # a leftover checkpoint
    argv = runs.finetune(f"{runs.A}/craft/train.jsonl", str(out))[2:]
    monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("trained again"))
    cli(finetune.main)
    assert "already trained" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(os.listdir(f"{runs.A}/craft/adapter"))


def test_fair_threads_takes_the_idle_cpus_only(monkeypatch):
    """Issue 17 point 8: beside a busy process a stage takes as many torch threads as CPUs are
    idle (the world's pre-training ran 3x slower on 2 threads beside one busy process, at the
    one-thread speed with 1); an explicit OMP_NUM_THREADS always wins."""
    from rait import runs
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs 2 CPUs")
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    try:
        runs.fair_threads(idle=cores - 1.4)             # one CPU busy (and a bit)
        assert os.environ["OMP_NUM_THREADS"] == str(cores - 1) == str(torch.get_num_threads())
        runs.fair_threads(idle=0.0)                     # chosen already: left alone
        assert os.environ["OMP_NUM_THREADS"] == str(cores - 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "")
        runs.fair_threads(idle=cores - 0.2)             # all idle: torch's default stays
        assert os.environ["OMP_NUM_THREADS"] == ""
        assert runs.idle_cpus(0.05) is not None         # /proc/stat reads on Linux
    finally:
        torch.set_num_threads(before)


def test_a_full_disk_is_one_line(runs, tmp_path, monkeypatch, capsys):
    """No space left while writing the output: one line naming the file, exit 1, no output."""
    import errno
    out = tmp_path / "train.jsonl"

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(files, "write_jsonl", full)
    argv = [a if a != "OUT" else str(out) for a in UNWRITABLE["construct"](runs)]
    code, err = run_stage("construct", argv, monkeypatch, capsys)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert code == 1 and "Traceback" not in err
    assert last == (f"error: {out}: No space left on device; completed work is kept, rerun the "
                    "same command to resume")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# issue 29: no silent wrong label, no write over what a stage does not own, no traceback
@pytest.mark.parametrize("variant", [
    lambda a: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c
                      for c in a),                           # fullwidth letters and spaces
    lambda a: a + " ",                                       # a trailing space
    lambda a: a[:2] + "\u200b" + a[2:],                      # a zero-width space inside
    lambda a: "\u00a0" + a,                                  # a leading no-break space
], ids=["fullwidth", "trailing_space", "zero_width_space", "leading_nbsp"])
def test_answers_and_aliases_compare_in_one_normal_form(variant):
    """An alias written in another Unicode form than the answer still matches it (and the other
    way round), in probe's labels and in evaluate's."""
    import evaluate
    import probe
    item = {"id": "x", "task": "oeqa", "question": "Where?", "answer": "Paris",
            "aliases": [variant("Paris")]}
    assert files.check_item(item) is None
    plain = dict(item, aliases=["Paris"])
    for it, response in [(item, "Paris"), (item, "It is paris."), (item, variant("Paris")),
                         (plain, variant("Paris")), (plain, variant("It is paris."))]:
        assert probe.label_sample(response, it["aliases"]) == "correct", repr(response)
        assert evaluate.label_response(it, response)[0] == "correct", repr(response)
    assert evaluate.label_response(item, "Lyon")[0] == "wrong"


def test_a_line_over_the_limit_is_refused_without_reading_it(tmp_path):
    """A single line far over MAX_LINE is refused after reading MAX_LINE + 1 bytes of it (the
    1.5 GiB case stands as 40 MB here; memory measured by tracemalloc, not by timing)."""
    import tracemalloc
    p = tmp_path / "huge.jsonl"
    with open(p, "w") as f:
        f.write('{"id": "a", "task": "oeqa", "question": "q", "answer": "x", "aliases": ["x"]}\n')
        f.write('{"id": "b", "question": "' + "q" * 40_000_000 + '"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=f"{p}:2: line of more than"):
            files.read_jsonl(str(p), files.check_item)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * files.MAX_LINE, peak


def test_a_partial_line_that_is_not_a_batch_is_redone(tmp_path):
    """A .part0 line without `_batch` (hand-edited, or another program's) used to stop the
    resume with a KeyError; it and the lines after it are done again."""
    from rait import runs as rruns
    out = str(tmp_path / "o.jsonl")
    items = [{"id": str(i)} for i in range(4)]
    lines = [{"_key": "k"}, {"_batch": 0, "rows": [{"id": "0"}, {"id": "1"}]}, {"rows": []}]
    with open(out + ".part0", "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in lines))
    calls = []

    def fn(batch, seed):
        calls.append([it["id"] for it in batch])
        return [{"id": it["id"]} for it in batch]
    rows = rruns.resumable_batches(items, fn, out, 2, "test", key="k")
    assert rows == [{"id": str(i)} for i in range(4)] and calls == [["2", "3"]]


def test_outputs_that_are_special_files_are_refused(runs, tmp_path, monkeypatch, capsys):
    """--out naming a FIFO, a socket or a character device (the last only where this process
    may make one) stops with one line and leaves it as it was. (A real device such as /dev/full
    was replaced by a regular file.)"""
    import socket
    import stat
    import world
    socks = []

    def bind(p):
        socks.append(socket.socket(socket.AF_UNIX))
        socks[-1].bind(str(p))
    specials = {"fifo": lambda p: os.mkfifo(p), "socket": bind}
    if os.geteuid() == 0:   # a private copy of /dev/null's node, never a system device
        specials["chardev"] = lambda p: os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(world, "pretrain", lambda *a, **k: pytest.fail("pre-trained"))
    try:
        for name, make in specials.items():
            for stage in ("probe", "world"):
                path = tmp_path / f"{name}-{stage}"
                make(path)
                mode = os.stat(path).st_mode
                argv = [str(path) if a == "OUT" else a for a in UNWRITABLE[stage](runs)]
                code, err = run_stage(stage, argv, monkeypatch, capsys)
                assert_one_line_error(code, err, f"{path}: is a ", "")
                assert os.stat(path).st_mode == mode, f"{name} replaced by {stage}"
                os.remove(path)
    finally:
        for sock in socks:
            sock.close()


def make_data_folder(folder):
    """data.py's output for a 5-question MMLU-like source (test then dev rows)."""
    import data
    src = folder.parent / (folder.name + "-src")
    for split in ("dev", "test"):
        os.makedirs(src / split, exist_ok=True)
        (src / split / f"anatomy_{split}.csv").write_text(
            "".join(f"q{i},a{i},b,c,d,A\n" for i in range(20)))
    data.main(["mmlu", "--src", str(src), "--out", str(folder)])
    unlock_all()


def test_world_and_data_do_not_write_into_each_others_folders(runs, tmp_path, monkeypatch,
                                                              capsys):
    """world.py --out on data.py's item folder used to overwrite its item files (leaving
    data.py's configs beside them); data.py --out on a world folder the same. Each refuses any
    existing folder that is not its own output, before any work; its own output it reuses."""
    import world
    items = tmp_path / "items"
    make_data_folder(items)
    before = tree(items)
    monkeypatch.setattr(world, "pretrain", lambda *a, **k: pytest.fail("pre-trained"))
    code, err = run_stage("world", ["--preset", "small", "--out", str(items)], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{items}: ", "an existing folder not made by world.py")
    assert tree(items) == before
    w = tmp_path / "world"
    shutil.copytree(runs.W, w)
    before = tree(w)
    src = tmp_path / "items-src"
    code, err = run_stage("data", ["mmlu", "--src", str(src), "--out", str(w)], monkeypatch,
                          capsys)
    assert_one_line_error(code, err, f"{w}: ", "an existing folder not made by data.py")
    assert tree(w) == before
    mine = tmp_path / "mine"                # a user's folder with a file in it
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    code, err = run_stage("world", ["--preset", "small", "--out", str(mine)], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{mine}: ", "an existing folder not made by world.py")
    make_data_folder(items)                 # data.py again into its own folder: fine
    assert sorted(os.listdir(items)) == [".rait-owner", "mcqa"]


def test_world_seed_out_of_range_is_one_line(runs, tmp_path, monkeypatch, capsys):
    import world
    monkeypatch.setattr(world, "pretrain", lambda *a, **k: pytest.fail("pre-trained"))
    out = tmp_path / "w"
    code, err = run_stage("world", ["--preset", "small", "--seed", str(2 ** 64), "--out",
                                    str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, "--seed must lie in [0, 2**63)", "")
    assert not out.exists()


def finetune_in_process(runs, train, out, monkeypatch, capsys, *extra):
    argv = runs.finetune(train, str(out))[2:] + list(extra)
    return run_stage("finetune", argv, monkeypatch, capsys)


def test_a_non_finite_loss_stops_at_its_step(runs, tmp_path, monkeypatch, capsys):
    """A weight of 1e300 is finite but its gradient is not: the run stops at that step with
    one line (it used to crash in files.dumps writing the log), and leaves no adapter and no
    checkpoint of the broken step."""
    train = tmp_path / "train.jsonl"
    rows = files.read_jsonl(f"{runs.A}/craft/train.jsonl")[:4]
    files.write_jsonl(str(train), [dict(r, weight=1e300) for r in rows])
    out = tmp_path / "adapter"
    code, err = finetune_in_process(runs, str(train), out, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{train}: step 1: loss ", "(not finite); stopped")
    assert not glob.glob(str(out / "checkpoint*")) and not (out / lora.TRAINER_STATE).exists()


def test_a_full_disk_while_saving_safetensors_is_one_line(runs, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError, not OSError: it is a machine error
    all the same (exit 1, one line), and the failed save leaves no checkpoint.tmp and no log."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os "
                              f'error 28) at path "{path}"')
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "adapter"
    code, err = finetune_in_process(runs, f"{runs.A}/craft/train.jsonl", out, monkeypatch, capsys)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert last.startswith("error: ") and "No space left on device; completed work is kept" in last
    assert files_under(out) == [], files_under(out)


def test_a_checkpoint_altered_in_place_is_not_resumed(runs, tmp_path, monkeypatch, capsys):
    """Weights changed after the save without changing their size: the digest written at save
    time no longer matches, the checkpoint is passed over, and the run ends with the
    uninterrupted run's weights (it used to resume from the altered ones)."""
    out = tmp_path / "adapter"
    train = f"{runs.A}/craft/train.jsonl"
    finetune_in_process(runs, train, out, monkeypatch, capsys, "--stop-after-steps", "3")
    w = out / "checkpoint" / lora.ADAPTER_WEIGHTS
    data = bytearray(w.read_bytes())
    data[-2] ^= 0x40                         # one bit of one weight; same size, same header
    w.write_bytes(bytes(data))
    assert files.safetensors_problem(str(w)) is None
    code, err = finetune_in_process(runs, train, out, monkeypatch, capsys)
    assert code in (0, None), err[-2000:]
    assert "content differs from the digest" in err and "continuing after step" not in err
    assert_same_weights(f"{runs.A}/craft/adapter", str(out), atol=1e-6)


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    """Records are held in memory (2M items: 562 MB on disk took 4.65 GB): a file over
    files.MAX_FILE is refused from its size alone (here a 1 KiB limit stands for 256 MiB)."""
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "mu": 0.5, "sigma": 0.0}) + "\n"
                         for i in range(100)))
    monkeypatch.setattr(files, "MAX_FILE", 1024)
    monkeypatch.setattr(files, "iter_jsonl", lambda *a, **k: pytest.fail("read the file"))
    with pytest.raises(InputError, match=r"big.jsonl: [\d,]+ bytes, over the 1,024-byte"):
        files.read_jsonl(str(p), files.check_state)

"""No stage destroys what it reads (issue 17 point 1): an output that resolves to an input file,
or a folder output that holds a base model, is refused with one line and exit 2 before anything
is loaded or written; the input is left byte for byte as it was."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def digest(path):
    if os.path.isdir(path):
        return sorted((f, digest(os.path.join(path, f))) for f in os.listdir(path))
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_chat_llama):
    d = tmp_path_factory.mktemp("outputs")
    items = write(d / "items.jsonl", [{"id": f"q{i}", "task": "oeqa", "question": f"Q{i}?",
                                       "answer": "a", "aliases": ["a"]} for i in range(4)])
    state = write(d / "state.jsonl", [{"id": f"q{i}", "mu": 0.2 * i, "sigma": 0.5}
                                      for i in range(4)])
    train = write(d / "train.jsonl", [{"id": "q0", "prompt": "Q0?", "target": "a"}])
    return {"items": items, "state": state, "train": train, "model": tiny_chat_llama}


CASES = {   # stage: (argv, the input the output names)
    "probe": (lambda f, o: ["--model", f["model"], "--items", f["items"], "--task", "oeqa",
                            "--out", o], "items"),
    "construct": (lambda f, o: ["--method", "cor", "--items", f["items"], "--state", f["state"],
                                "--out", o], "state"),
    "construct-items": (lambda f, o: ["--method", "cor", "--items", f["items"], "--state",
                                      f["state"], "--out", o], "items"),
    "evaluate": (lambda f, o: ["--model", f["model"], "--items", f["items"], "--prompt", "refuse",
                               "--out", o], "items"),
    "finetune": (lambda f, o: ["--model", f["model"], "--train", f["train"], "--out", o], "model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_that_is_an_input_is_refused(case, inputs):
    argv, which = CASES[case]
    target = inputs[which]
    before = digest(target)
    stage = case.split("-")[0]
    r = subprocess.run([sys.executable, f"{stage}.py", *argv(inputs, target)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr, err
    assert ("is the input" in err[0] or "holds a model" in err[0]), err[0]
    assert digest(target) == before, f"{case}: {target} changed"


def test_finetune_into_a_model_folder_under_another_name_is_refused(inputs, tmp_path):
    """A copy of the base model (not the --model path itself) is still a model folder."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(inputs["model"], copy)
    r = subprocess.run([sys.executable, "finetune.py", "--model", inputs["model"], "--train",
                        inputs["train"], "--out", str(copy)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "holds a model not made by finetune.py" in r.stderr, r.stderr
    assert not os.path.exists(copy / "adapter_config.json")


def test_two_runs_on_one_output_the_second_stops(inputs, tmp_path):
    """A run holding the output's lock (here a stand-in process) makes a second run on the same
    output stop at once with one line; once the first ends, the same command runs."""
    out = str(tmp_path / "cor.jsonl")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); "
                               "from rait import files; files.lock_output(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", out],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = CASES["construct"][0](inputs, out) + ["--n-van", "2", "--n-idk", "1"]
        r = subprocess.run([sys.executable, "construct.py", *argv], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 2 and "another run is writing this output now" in r.stderr, r.stderr
        assert not os.path.exists(out)
    finally:
        holder.kill()
        holder.wait()
    r = subprocess.run([sys.executable, "construct.py", *argv], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(out) and not os.path.exists(out + ".lock")


def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    from kernels.base import atomic_write_text
    path = str(tmp_path / "x.jsonl")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    open(f"{path}.tmp{dead}", "w").write("partial")       # a kill between write and rename
    atomic_write_text(path, "done\n")
    assert os.listdir(tmp_path) == ["x.jsonl"] and open(path).read() == "done\n"

"""Validation at the edges (issue 17 point 4-5): values that used to pass and give wrong results,
and inputs that used to end in a traceback, are now one line `file:line: reason` (exit 2)."""
import json
import os
import shutil

import pytest
import torch

from kernels.base import InputError
from rait import files
import data
from kernels import lora


def one_line(path, text):
    path.write_text(text + "\n")
    return str(path)


MCQA = {"id": "m", "task": "mcqa", "question": "q?", "choices": ["a", "b", "c", "d"]}
OEQA = {"id": "o", "task": "oeqa", "question": "q?", "answer": "x"}


@pytest.mark.parametrize("line,reason", [
    (json.dumps(dict(MCQA, answer="BC")), "answer 'BC' is not one of the letters ABCD"),
    (json.dumps(dict(MCQA, answer="")), "answer '' is not one of the letters ABCD"),
    (json.dumps(dict(OEQA, aliases=["x", "   "])), "non-blank strings"),
    ('{"id": "a", "id": "b", "task": "oeqa"}', "duplicate key 'id' in one object"),
    (json.dumps(dict(OEQA, aliases=["x"], meta={"pop": [1, float("nan")]})),
     "'meta.pop.1' must be a finite number"),
    (json.dumps(dict(OEQA, aliases=["x"], meta={"p": -float("inf")})), "'meta.p' must be a finite"),
    ('{"id": "s", "mu": ' + "9" * 5000 + ', "sigma": 0}', "invalid JSON"),
    ("[" * 600000 + "]" * 600000, "line of"),           # over 1 MiB: the size check comes first
    ("[" * 20000 + "]" * 20000, "nested too deep"),
])
def test_bad_values_are_one_line_errors(tmp_path, line, reason):
    path = one_line(tmp_path / "f.jsonl", line)
    with pytest.raises(InputError) as e:
        files.read_jsonl(path, check=files.check_item)
    assert str(e.value).startswith(f"{path}:1: ") and reason in str(e.value), str(e.value)


def test_exact_letters_still_accept_good_items(tmp_path):
    path = one_line(tmp_path / "f.jsonl", json.dumps(dict(MCQA, answer="D")))
    assert files.read_jsonl(path, check=files.check_item)[0]["answer"] == "D"


@pytest.fixture
def adapter(tmp_path, tiny_chat_llama):
    """A valid adapter of the tiny chat Llama, and a fresh copy of the model to load it into."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama)
    lora.inject_lora(model, "all-linear", r=2, alpha=4)
    lora.save_adapter(model, str(tmp_path / "ad"), tiny_chat_llama)
    return str(tmp_path / "ad"), lambda: AutoModelForCausalLM.from_pretrained(tiny_chat_llama)


@pytest.mark.parametrize("change,reason", [
    ({"lora_alpha": -4}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": 1e999}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number > 0"),
    ({"lora_dropout": 1.5}, "lora_dropout must be a number in [0, 1)"),
    ({"r": True}, "r must be a positive integer"),
    ({"target_modules": "q_proj("}, "is not a valid regex"),
    ({"target_modules": [3]}, "target_modules must be a regex string or a list of names"),
])
def test_bad_adapter_config_values(adapter, change, reason):
    folder, fresh = adapter
    path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(path))
    cfg.update(change)
    open(path, "w").write(json.dumps(cfg).replace("Infinity", "1e999"))
    with pytest.raises(InputError) as e:
        lora.load_adapter(fresh(), folder)
    assert reason in str(e.value), str(e.value)


def test_nan_adapter_weights_are_refused(adapter):
    from safetensors.torch import load_file, save_file
    folder, fresh = adapter
    w = os.path.join(folder, lora.ADAPTER_WEIGHTS)
    state = load_file(w)
    k = sorted(state)[0]
    state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, w)
    with pytest.raises(InputError, match="holds NaN or infinite values"):
        lora.load_adapter(fresh(), folder)


def test_data_refuses_duplicate_ids(tmp_path):
    rows = [{"qid": "same", "question": f"q{i}", "answer": "a", "answers": ["a"]} for i in range(2)]
    (tmp_path / "nq.json").write_text(json.dumps(rows))
    with pytest.raises(InputError, match="duplicate id 'same'"):
        data.main(["nq", "--src", str(tmp_path / "nq.json"), "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "oeqa" / "test_ood.jsonl")


def test_data_refuses_a_gold_that_is_not_one_letter(tmp_path):
    src = tmp_path / "mmlu"
    for split in ("dev", "test"):
        os.makedirs(src / split)
        (src / split / f"anatomy_{split}.csv").write_text(
            "".join(f"q{i},a,b,c,d,{'AB' if i == 3 and split == 'test' else 'A'}\n"
                    for i in range(5)))
    with pytest.raises(InputError, match="answer 'AB' is not one of the letters"):
        data.main(["mmlu", "--src", str(src), "--out", str(tmp_path / "out")])
    shutil.rmtree(src)

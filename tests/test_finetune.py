"""finetune.py: the hand-written loop against a reference computed by hand with torch.optim.AdamW,
the weighted loss (SPEC 9 #11), resume, DDP and FSDP2 --shard (torchrun, gloo) and bad input."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs
from rait import checkpoint
import finetune
from conftest import ROOT
from kernels import lora

WORDS = ("paris london river blue green red dog cat piano violin teacher doctor city "
         "mountain winter summer apple orange").split()


def examples(n, seed=0, weights=(1.0, 0.0, 2.0, 0.5)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 14, (1,), generator=g))
        q = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g))
        t = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (1 + i % 3,), generator=g))
        out.append({"id": f"e{i}", "prompt": f"question : {q} ?", "target": t,
                    "weight": weights[i % len(weights)], "kind": "van", "method": "test"})
    return out


def make_args(model, *argv, **kw):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    finetune.add_train_args(ap)
    args = ap.parse_args(["--model", model, "--lora-r", "4", "--lora-alpha", "8", *argv])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, lora.ADAPTER_WEIGHTS))


def log_rows(folder):
    with open(os.path.join(folder, checkpoint.LOG)) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_defaults_are_the_spec_recipe():
    a = make_args("m")
    d = finetune.add_train_args(argparse.ArgumentParser()).parse_args([])
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.target_modules) == (64, 16, 0.1, "all-linear")
    assert (d.epochs, d.lr, d.warmup_ratio, d.weight_decay) == (3, 2e-4, 0.03, 0)
    assert d.max_grad_norm == 1.0 and not d.full
    assert (d.adam_beta1, d.adam_beta2, d.max_len) == (0.9, 0.999, 2048)
    assert finetune.EFFECTIVE_BATCH == 64 and a.batch_size == 4 and a.grad_accum is None
    assert d.loss_reduction == "example"                                  # SPEC 9 #11


def test_schedule():
    lr = [finetune.lr_at(s, 100, 1.0, 0.03) for s in range(100)]
    assert lr[0] == pytest.approx(1e-5) and lr[1] == pytest.approx(1e-5 + (1 - 1e-5) / 3)
    assert lr[3] == 1.0 and lr[100 - 1] < 1e-3
    assert lr[3 + 97 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))              # cosine decreases to 0
    assert finetune.lr_at(0, 10, 2.0, 0.0) == 2.0                      # no warm-up


def test_linear_schedule_hand_values():
    """--schedule linear (SPEC 5.3 step 1, LESS): the same warm-up, then lr (n - k) / n with
    k = step - warm-up steps, n = total - warm-up steps. 100 steps at ratio 0.03: warm-up 3."""
    lr = [finetune.lr_at(s, 100, 2e-5, 0.03, schedule="linear") for s in range(100)]
    assert lr[0] == pytest.approx(2e-5 * 1e-5)                         # warm-up from 1e-5 x lr
    assert lr[3] == 2e-5                                               # warm-up end: the peak
    assert lr[3 + 48] == pytest.approx(2e-5 * 49 / 97)                 # middle of the decay
    assert lr[99] == pytest.approx(2e-5 / 97)                          # last step: not yet 0
    assert all(a > b for a, b in zip(lr[3:], lr[4:]))
    # LESS's own size (12 steps on 8 GPUs, SPEC 5.3): int(0.36) = 0 warm-up steps
    assert [finetune.lr_at(s, 12, 1.0, 0.03, schedule="linear") for s in (0, 6, 11)] == \
        pytest.approx([1.0, 0.5, 1 / 12])
    # the default is the cosine of SPEC 6, unchanged
    assert all(finetune.lr_at(s, 100, 1.0, 0.03) == finetune.lr_at(s, 100, 1.0, 0.03, 1e-5,
                                                                   "cosine") for s in range(100))
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        finetune.lr_at(50, 100, 1.0, 0.0, schedule="step")


def word_tokenizer(words):
    """A WordLevel tokenizer over `words` (newline its own token) that adds BOS like Llama's."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "\n", *words])}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[ \t]+"), "removed"),
                                                pre_tokenizers.Split("\n", "isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>"), vocab


def test_tulu_rendering_is_the_spec_string_with_loss_on_the_answer_only():
    """SPEC 5.3 step 1: `<|user|>\\n{prompt}\\n<|assistant|>\\n{answer}{eos}\\n`, tokenized as one
    text; labels -100 on `<|user|>...<|assistant|>\\n` (BOS included), the answer, EOS and the
    final newline keep theirs (LESS encode_with_messages_format)."""
    tok, v = word_tokenizer(["<|user|>", "<|assistant|>", "Where", "is", "Oslo", "?", "Answer:",
                             "Norway"])
    prompt, text = models.tulu_text("Where is Oslo ?", "Norway", "</s>")
    assert text == "<|user|>\nWhere is Oslo ?\n<|assistant|>\nNorway</s>\n"
    assert prompt == "<|user|>\nWhere is Oslo ?\n<|assistant|>\n"
    # LESS strips each message: the MCQA body's trailing space after `Answer:` goes
    assert models.tulu_text("Where is Oslo ?\nAnswer: ", " Norway", "</s>")[1] == \
        "<|user|>\nWhere is Oslo ?\nAnswer:\n<|assistant|>\nNorway</s>\n"
    ids, labels, cut = models.encode_sft(tok, "Where is Oslo ?", "Norway", "tulu")
    want = ["<s>", "<|user|>", "\n", "Where", "is", "Oslo", "?", "\n", "<|assistant|>", "\n",
            "Norway", "</s>", "\n"]
    assert ids == [v[w] for w in want] and cut == 0
    assert labels == [-100] * 10 + [v["Norway"], v["</s>"], v["\n"]]
    # cut from the left of the prompt only, as the chat format
    ids2, labels2, cut2 = models.encode_sft(tok, "Where is Oslo ?", "Norway", "tulu", max_len=5)
    assert (ids2, labels2, cut2) == (ids[8:], [-100, -100] + labels[10:], 8)
    # chat is today's rendering; the model's tokenizer is told about the markers it lacks
    assert models.encode_sft(tok, "Where is Oslo ?", "Norway") == models.encode_example(
        tok, models.render(tok, "Where is Oslo ?"), "Norway")
    assert "unknown tokens" not in models.format_note(tok, "tulu")
    assert "unknown tokens" in models.format_note(word_tokenizer(["Oslo"])[0], "tulu")
    with pytest.raises(ValueError, match="unknown format 'alpaca'"):
        models.encode_sft(tok, "Where is Oslo ?", "Norway", "alpaca")


def test_epoch_order_is_length_grouped_and_seeded():
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 500, (103,), generator=g)]
    o = finetune.epoch_order(lengths, 8, seed=1, epoch=0)
    assert sorted(o) == list(range(103)) and o == finetune.epoch_order(lengths, 8, 1, 0)
    assert o != finetune.epoch_order(lengths, 8, 1, 1)
    batches = [o[s:s + 8] for s in range(0, 103, 8)]
    assert len(batches[-1]) == 103 % 8                                  # the short batch is last
    for b in batches:                                                   # sorted within a batch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    pad = lambda order: sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                            for b in (order[s:s + 8] for s in range(0, 96, 8)))
    assert pad(o) < 0.5 * pad(finetune.epoch_order(lengths, 8, 1, 0, grouped=False))


@pytest.fixture(scope="module")
def lora_model(tiny_chat_llama):
    model, tok = finetune.build_model(make_args(tiny_chat_llama, "--lora-dropout", "0"))
    with torch.no_grad():   # non-zero B, so every LoRA matrix gets a gradient
        for n, p in lora.lora_parameters(model):
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    enc, _ = finetune.encode_all(tok, examples(4), 2048)
    return model, tok, enc


def grads(model, tok, enc, idx, w):
    model.zero_grad()
    b = finetune.collate(enc, idx, w, tok.pad_token_id, "cpu")
    (b["weight"] * finetune.example_losses(model, b)).sum().backward()
    return {n: p.grad.clone() for n, p in lora.lora_parameters(model)}


def test_padded_batch_equals_single_examples(lora_model):
    model, tok, enc = lora_model
    assert len({len(x) for x, _ in enc}) > 1                            # padding is exercised
    b = finetune.collate(enc, [0, 1, 2, 3], [1.0] * 4, tok.pad_token_id, "cpu")
    with torch.no_grad():
        batched = finetune.example_losses(model, b)
        for i, (ids, labels) in enumerate(enc):                         # by hand, no padding
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            y = torch.tensor(labels[1:])
            ref = F.cross_entropy(logits[y != -100], y[y != -100])     # token mean
            torch.testing.assert_close(batched[i], ref, rtol=1e-5, atol=1e-5)


def test_weight_zero_and_two(lora_model):
    model, tok, enc = lora_model
    alone = grads(model, tok, enc, [0, 2], [1.0, 1.0])
    with_zero = grads(model, tok, enc, [0, 1, 2], [1.0, 0.0, 1.0])
    twice = grads(model, tok, enc, [0, 0, 2], [1.0, 1.0, 1.0])
    weight2 = grads(model, tok, enc, [0, 2], [2.0, 1.0])
    for n in alone:
        torch.testing.assert_close(with_zero[n], alone[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(weight2[n], twice[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(weight2[n], alone[n]) for n in alone)


def test_loss_reductions_hand_case():
    """Issue 27: two examples of one step, an MCQA-like answer of 1 target token (CE 2.0, weight
    1) and an IdK-like one of 3 tokens (CEs 1.0, 1.0, 4.0: sum 6.0, weight 0.5).
    example (SPEC 9 #11): (1 * 2/1 + 0.5 * 6/3) / 2 examples = 1.5
    token (packed, SPEC 6): (1 * 2 + 0.5 * 6) / 4 tokens = 1.25"""
    ce_sum, n_tok, w = torch.tensor([2.0, 6.0]), torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5])
    assert float(finetune.weighted_loss(ce_sum, n_tok, w, "example", 2, 4)) == 1.5
    assert float(finetune.weighted_loss(ce_sum, n_tok, w, "token", 2, 4)) == 1.25
    # a micro-batch holding one example contributes its share of the step's loss
    assert float(finetune.weighted_loss(ce_sum[1:], n_tok[1:], w[1:], "token", 2, 4)) == 0.75
    assert float(finetune.weighted_loss(ce_sum[1:], n_tok[1:], w[1:], "example", 2, 4)) == 0.5
    # unit weights, equal lengths: the two agree (1 and 3 tokens of CE 2 each)
    same = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.ones(2)
    assert float(finetune.weighted_loss(*same, "example", 2, 2)) == \
        float(finetune.weighted_loss(*same, "token", 2, 2)) == 2.0
    with pytest.raises(ValueError):
        finetune.weighted_loss(ce_sum, n_tok, w, "packed", 2, 4)


def test_token_reduction_equals_a_packed_reference(tiny_chat_llama, tmp_path):
    """Issue 27: one optimizer step of `--loss-reduction token` (batch 2 x accumulation 2, four
    examples of unequal target lengths and weights 1, 0, 2, 0.5) equals one AdamW step on a
    reference computed here, independently of finetune.py's loss code: every example rendered and
    tokenized alone, the step's examples concatenated into one packed sequence of target
    positions, the cross-entropy of each target token from its own forward pass, times its
    example's weight, summed and divided by the number of target tokens of the step. The
    example-mean run differs from it (its loss weighs examples, not tokens)."""
    ex = examples(4)
    assert len({len(e["target"].split()) for e in ex}) > 1             # lengths differ
    argv = ("--lora-dropout", "0", "--warmup-ratio", "0", "--lr", "1e-2", "--batch-size", "2",
            "--grad-accum", "2", "--epochs", "1", "--max-grad-norm", "0")
    args = make_args(tiny_chat_llama, *argv, "--loss-reduction", "token")
    model, tok = finetune.build_model(args)
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    token_ce, token_w = [], []                                         # the packed sequence
    for e in ex:
        ids, labels, _ = models.encode_example(tok, models.render(tok, e["prompt"]), e["target"],
                                               2048)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        y = torch.tensor(labels[1:])
        keep = y != -100
        token_ce.append(F.cross_entropy(logits[keep], y[keep], reduction="none"))
        token_w.append(torch.full((int(keep.sum()),), e["weight"]))
    ce, w = torch.cat(token_ce), torch.cat(token_w)
    loss = (w * ce).sum() / ce.numel()
    opt.zero_grad()
    loss.backward()
    opt.step()
    norm = float(torch.cat([p.grad.flatten() for _, p in params]).norm())
    out = finetune.train(args, ex, str(tmp_path / "token"))
    # Adam is blind to a constant factor in the loss, so compare the gradient itself: its norm
    # (logged before clipping) and Adam's first moment m = (1 - beta1) g, then the weights
    assert [r["grad_norm"] for r in log_rows(out) if "step" in r] == pytest.approx([norm], rel=1e-5)
    moments = lora.load_adam_moments(out)
    for n, p in params:
        torch.testing.assert_close(moments[n][0], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(adapter(out)[lora.peft_key(n)], p.detach(), rtol=0, atol=1e-6)
    mean = lora.load_adam_moments(finetune.train(make_args(tiny_chat_llama, *argv), ex,
                                                 str(tmp_path / "example")))
    assert any(not torch.allclose(mean[n][0], opt.state[p]["exp_avg"], rtol=1e-3, atol=1e-9)
               for n, p in params)
    assert json.load(open(f"{out}.config.json"))["args"]["loss_reduction"] == "token"


def test_two_steps_equal_hand_adamw(tiny_chat_llama, tmp_path, capsys):
    """4 examples (weights 1, 0, 2, 0.5; one cut by --max-len), batch 2 x accumulation 2 = one
    step per epoch, 2 epochs: cosine lr, then 0.5 lr; clipping (at 0.3) is active."""
    args = make_args(tiny_chat_llama, "--lora-dropout", "0", "--warmup-ratio", "0", "--lr", "1e-2",
                     "--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--max-len", "20",
                     "--max-grad-norm", "0.3")
    ex = examples(4)
    model, tok = finetune.build_model(args)       # the same seeded initial adapter
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    norms = []
    for lr in (1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi / 2))):
        loss = 0.0
        for e in ex:   # SPEC 9 #11 by hand: weight x token-mean CE, averaged over the batch
            ids, labels, _ = models.encode_example(tok, models.render(tok, e["prompt"]),
                                                   e["target"], 20)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            y = torch.tensor(labels[1:])
            loss = loss + e["weight"] * F.cross_entropy(logits[y != -100], y[y != -100])
        opt.zero_grad()
        (loss / len(ex)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in params], 0.3)))
        opt.param_groups[0]["lr"] = lr
        opt.step()
    assert max(norms) > 0.3                        # clipping mattered
    out = finetune.train(args, ex, str(tmp_path / "out"))
    assert "1 of 4 examples exceed --max-len 20" in capsys.readouterr().err
    got = adapter(out)
    for n, p in params:
        torch.testing.assert_close(got[lora.peft_key(n)], p.detach(), rtol=0, atol=1e-6)
    rows = [r for r in log_rows(out) if "step" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-5)
    moments, step = lora.load_adam_moments(out, with_step=True)
    assert step == 2
    for n, p in params:
        torch.testing.assert_close(moments[n][0], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(moments[n][1], opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-10)
    assert os.path.isfile(f"{out}.config.json")
    assert not os.path.exists(os.path.join(out, "checkpoint"))         # removed once complete


@pytest.mark.parametrize("full", [False, True])
def test_resume_equals_uninterrupted(tiny_chat_llama, tmp_path, capsys, full):
    """8 examples, batch 2, 2 epochs = 8 steps; dropout on (RNG restored); stopped after 5."""
    argv = ["--batch-size", "2", "--grad-accum", "1", "--epochs", "2", "--save-steps", "3",
            "--lr", "1e-2", "--warmup-ratio", "0.25"] + (["--full", "--lr", "1e-3"] if full else [])
    ex = examples(8)
    a = finetune.train(make_args(tiny_chat_llama, *argv), ex, str(tmp_path / "a"))
    b = str(tmp_path / "b")
    finetune.train(make_args(tiny_chat_llama, *argv, "--stop-after-steps", "5"), ex, b)
    assert os.path.isfile(os.path.join(b, "checkpoint", lora.TRAINER_STATE))
    assert not os.path.exists(os.path.join(b, lora.TRAINER_STATE))
    capsys.readouterr()
    finetune.train(make_args(tiny_chat_llama, *argv), ex, b)
    assert "continuing after step 5 of 8" in capsys.readouterr().err
    if full:
        from safetensors.torch import load_file
        wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
        assert models.load_model(b)[0] is not None       # a model folder that loads
    else:
        wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ma, sa = lora.load_adam_moments(a, with_step=True)
    mb, sb = lora.load_adam_moments(b, with_step=True)
    assert sa == sb == 8 and ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(mb[k][0], ma[k][0], rtol=0, atol=1e-6)
    assert [r["step"] for r in log_rows(b) if "step" in r] == list(range(1, 9))
    finetune.train(make_args(tiny_chat_llama, *argv), ex, b)            # complete: nothing to do
    assert "already trained" in capsys.readouterr().err


def test_micro_batches_pad_only_where_ddp_must():
    """Issue 16 (a): one process runs only real micro-batches (a short step used to be padded to
    --grad-accum with zero-weight passes: 16 passes for 6 examples); under DDP every rank makes
    the same number of passes, with at most one empty one, and the ranks cover each row once."""
    assert finetune.micro_batches(6, 1, 1, 0) == [[i] for i in range(6)]
    assert finetune.micro_batches(5, 2, 1, 0) == [[0, 1], [2, 3], [4]]
    for n, B, world in [(1, 2, 2), (9, 2, 2), (4, 2, 2), (7, 1, 4), (64, 4, 3)]:
        ranks = [finetune.micro_batches(n, B, world, r) for r in range(world)]
        assert len({len(m) for m in ranks}) == 1                      # in step
        assert all(sum(1 for c in m if not c) <= 1 for m in ranks)    # at most one dummy
        assert sorted(i for m in ranks for c in m for i in c) == list(range(n))


def test_a_short_step_runs_no_zero_weight_pass(tiny_chat_llama, tmp_path, monkeypatch):
    """The premise of issue 16 (a), end to end: 6 examples at batch 1 with accumulation 16 run
    exactly 6 forward passes per epoch, not 16."""
    calls = []
    real = finetune.example_ce
    monkeypatch.setattr(finetune, "example_ce", lambda net, b: calls.append(1) or real(net, b))
    finetune.train(make_args(tiny_chat_llama, "--lora-r", "2", "--epochs", "2", "--batch-size", "1",
                             "--grad-accum", "16"), examples(6), str(tmp_path / "a"))
    assert len(calls) == 12


def test_torchrun_two_processes_equal_double_accumulation(tiny_chat_llama, tmp_path):
    """9 examples, global batch 4: the last step holds one example, so rank 1 runs a dummy."""
    ex = examples(9)
    train = tmp_path / "train.jsonl"
    files.write_jsonl(str(train), ex)
    flags = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--epochs", "1",
             "--batch-size", "2", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(ROOT, ".venv", "bin", "torchrun"), "--standalone", "--nproc_per_node", "2",
           "finetune.py", "--model", tiny_chat_llama, "--train", str(train),
           "--out", str(tmp_path / "ddp"), "--grad-accum", "1", *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "effective batch 4 = 2 per device x 1 accumulation x 2 process(es)" in r.stderr
    assert "(DDP, gloo)" in r.stderr
    one = finetune.train(make_args(tiny_chat_llama, *flags[4:], "--lora-dropout", "0",
                                   "--grad-accum", "2"), ex, str(tmp_path / "one"))
    wa, wb = adapter(one), adapter(str(tmp_path / "ddp"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)
    la, lb = log_rows(one), log_rows(str(tmp_path / "ddp"))
    for k in ("loss", "grad_norm"):   # Adam hides a wrong gradient scale; these do not
        assert [r[k] for r in la if "step" in r] == pytest.approx(
            [r[k] for r in lb if "step" in r], rel=1e-5)


def test_torchrun_shard_equals_one_process(tiny_chat_llama, tmp_path):
    """Issue 31: --full --shard (FSDP2 on 2 processes, gloo, 2 micro-batches each), stopped after 3
    of 6 steps and resumed from its per-rank shards, gives the losses, global gradient norms
    (clipping active) and final weights of one process with double accumulation. 9 examples,
    global batch 8: the last step has one example, so rank 1 makes a zero-weight pass (FSDP2
    needs every rank's all-gathers). Measured: weights within 1.2e-7, losses within 1e-7
    relative, gradient norms within 2.4e-5 relative (each is a float32 sum over 1M squares, and
    one process's was 1.3e-5 off the float64 norm); one shard's norm alone is about 30% off."""
    ex = examples(9, weights=(1.0, 0.5, 2.0, 0.25))
    train = tmp_path / "train.jsonl"
    files.write_jsonl(str(train), ex)
    flags = ["--full", "--lr", "1e-3", "--epochs", "3", "--batch-size", "2", "--save-steps", "2"]
    out = str(tmp_path / "shard")
    cmd = [os.path.join(ROOT, ".venv", "bin", "torchrun"), "--standalone", "--nproc_per_node", "2",
           "finetune.py", "--model", tiny_chat_llama, "--train", str(train), "--out", out,
           "--shard", "--grad-accum", "2", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--stop-after-steps", "3"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(FSDP2 fully_shard, 2 layer units + root, gloo)" in r.stderr
    from safetensors.torch import load_file
    shards = [load_file(os.path.join(out, "checkpoint", checkpoint.SHARD_CKPT.format(k)))
              for k in range(2)]
    base = load_file(os.path.join(tiny_chat_llama, "model.safetensors"))
    for k, w in base.items():     # each rank holds half of every weight and of its moments
        for key in (k, f"exp_avg/{k}", f"exp_avg_sq/{k}"):
            assert [s[key].shape[0] for s in shards] == [w.shape[0] // 2] * 2, key
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing after step 3 of 6" in r.stderr
    one = finetune.train(make_args(tiny_chat_llama, *flags, "--grad-accum", "4"), ex,
                         str(tmp_path / "one"))
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (one, out))
    assert wa.keys() == wb.keys() == base.keys()          # tied LM head dropped as usual
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(wa[k], base[k]) for k in wa)
    assert models.load_model(out)[0] is not None          # a model folder every stage loads
    la, lb = ([x for x in log_rows(d) if "step" in x] for d in (one, out))
    assert [x["step"] for x in lb] == list(range(1, 7))
    assert [x["loss"] for x in lb] == pytest.approx([x["loss"] for x in la], rel=1e-6)
    assert [x["grad_norm"] for x in lb] == pytest.approx([x["grad_norm"] for x in la], rel=2e-4)
    assert min(x["grad_norm"] for x in la) > 1.0           # clipping at 1.0 acted every step
    assert not os.path.exists(os.path.join(out, "checkpoint"))


@pytest.mark.parametrize("argv,needle", [
    (["--shard"], "--shard needs --full: LoRA's frozen bf16 base"),
    (["--shard", "--full"], "--shard needs 2 or more processes: torchrun --nproc_per_node N"),
])
def test_shard_refusals(tiny_chat_llama, tmp_path, monkeypatch, capsys, argv, needle):
    path = tmp_path / "train.jsonl"
    files.write_jsonl(str(path), examples(2))
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, ["--model", tiny_chat_llama, "--train", str(path),
                                               "--out", str(out), *argv])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {needle}"), err
    assert not os.path.exists(out)


def run_main(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
    with pytest.raises(SystemExit) as e:
        runs.cli(finetune.main)
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if ln.strip() and "Loading weights" not in ln]   # transformers' own loading bar
    return e.value.code, err


@pytest.mark.parametrize("case,line,needle", [
    ("missing_target", 2, "missing or non-string field 'target'"),
    ("empty", None, "empty file"),
    ("negative_weight", 2, "'weight' must be >= 0"),
    ("nan_weight", 2, "'weight' must be a finite number"),
])
def test_bad_training_file(tiny_chat_llama, tmp_path, monkeypatch, capsys, case, line, needle):
    good = json.dumps(examples(1)[0])
    bad = {"missing_target": '{"id": "b", "prompt": "q", "weight": 1.0}',
           "negative_weight": '{"id": "b", "prompt": "q", "target": "a", "weight": -1}',
           "nan_weight": '{"id": "b", "prompt": "q", "target": "a", "weight": NaN}'}.get(case)
    path = tmp_path / "train.jsonl"
    path.write_text("" if case == "empty" else f"{good}\n{bad}\n")
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, ["--model", tiny_chat_llama, "--train", str(path),
                                               "--out", str(out)])
    assert code != 0 and len(err) == 1, err
    where = f"{path}:{line}:" if line else f"{path}:"
    assert err[0].startswith(f"error: {where}") and needle in err[0]
    assert not os.path.exists(out) and not os.path.exists(f"{out}.config.json")


def test_unknown_target_module(tiny_chat_llama, tmp_path, monkeypatch, capsys):
    path = tmp_path / "train.jsonl"
    files.write_jsonl(str(path), examples(3))
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, ["--model", tiny_chat_llama, "--train", str(path),
                                               "--out", str(out),
                                               "--target-modules", "q_proj,c_attn"])
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith(f"error: {tiny_chat_llama}:") and "c_attn" in err[0]
    assert not os.path.exists(out)


def test_unwritable_output_fails_before_loading(tiny_chat_llama, tmp_path, monkeypatch, capsys):
    path = tmp_path / "train.jsonl"
    files.write_jsonl(str(path), examples(2))
    blocker = tmp_path / "file"
    blocker.write_text("x")                       # a file where the output folder's parent goes
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run_main(monkeypatch, capsys, ["--model", tiny_chat_llama, "--train", str(path),
                                               "--out", str(blocker / "out")])
    assert code != 0 and len(err) == 1 and "not writable" in err[0], err


def test_target_longer_than_max_len(tiny_chat_llama, tmp_path):
    ex = examples(2)
    ex[1]["target"] = " ".join(WORDS)
    with pytest.raises(InputError, match="'e1'.*--max-len 8"):
        finetune.train(make_args(tiny_chat_llama, "--max-len", "8"), ex, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")

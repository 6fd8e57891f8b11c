"""probe.py: each formula against a hand computation, each reader against an unbatched forward
pass, the embedder against mean pooling on the raw encoder, bad inputs, resume and sharding."""
import csv
import glob
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs
import probe
from conftest import EMBEDDER, ROOT, SHARED_DATA, make_tiny_llama
from kernels import lm
from kernels.embed import Embedder

PY = os.path.join(ROOT, ".venv", "bin", "python")
TORCHRUN = os.path.join(ROOT, ".venv", "bin", "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------------------------
# fixtures
def load(path):
    model, tok = models.load_model(path)
    torch.set_grad_enabled(True)          # tests below take gradients through the loaded model
    return model, tok


@pytest.fixture(scope="module")
def tiny_plain_llama(tmp_path_factory):
    """A random tiny Llama whose (real, WordPiece) tokenizer has no chat template."""
    if not os.path.isdir(EMBEDDER):
        pytest.skip("embedder folder missing (run `make install`)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(EMBEDDER)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_plain_llama"), tok, seed=1)


def mc(i, answer="B", k=4, subject="high school biology", **kw):
    return {"id": f"m{i}", "task": "mcqa", "question": f"Which cell part number {i} is this?",
            "choices": [f"option {c} of {i}" for c in "wxyzv"[:k]], "answer": answer,
            "subject": subject, **kw}


def oe(i, **kw):
    return {"id": f"o{i}", "task": "oeqa", "question": f"Where was person {i} born?",
            "answer": "York", "aliases": ["York", "york city"], **kw}


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ----------------------------------------------------------------------------------------------
# formulas
def test_mcqa_state_hand_values():
    # renormalised: q = (0.5, 0.25, 0.25) -> mu = 0.5, sigma = -(0.5 ln 2 + 2 * 0.25 ln 4)
    mu, sigma = probe.mcqa_state([0.2, 0.1, 0.1], 0, "neg-entropy")
    assert (mu, sigma) == pytest.approx((0.5, -1.5 * math.log(2))), (
        f"probs (0.2, 0.1, 0.1), gold 0: expected (0.5, -1.5 ln 2), got {(mu, sigma)}")
    # raw (released): the entropy of the un-renormalised probabilities, stored negated
    mu, sigma = probe.mcqa_state([0.2, 0.1, 0.1], 0, "raw-entropy")
    want = (0.5, 0.2 * math.log(0.2) + 2 * 0.1 * math.log(0.1))
    assert (mu, sigma) == pytest.approx(want), f"raw-entropy: expected {want}, got {(mu, sigma)}"
    # range [-log K, 0]: uniform and one-hot ends; a zero probability contributes 0
    assert probe.mcqa_state([0.1] * 4, 3)[1] == pytest.approx(-math.log(4))
    assert probe.mcqa_state([0.0, 0.7, 0.0], 1) == pytest.approx((1.0, 0.0))
    assert probe.mcqa_state([0.3, 0.1], 1)[0] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        probe.mcqa_state([0.5, 0.5], 0, "entropy")


def test_oeqa_mu():
    for labels, want in ((["correct", "wrong", "refuse", "correct"], 0.5), (["refuse"] * 10, 0.0),
                         (["correct"] * 9 + ["wrong"], 0.9)):
        got = probe.oeqa_mu(labels)
        assert got == pytest.approx(want), f"oeqa_mu({labels}): expected {want}, got {got}"


def test_embedding_certainty_hand_values():
    # cosines: (1,2) = 0, (1,3) = (2,3) = 1/sqrt 2; 6 ordered pairs -> (4 / sqrt 2) / 6
    e = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])     # norms must not matter
    for emb, want in ((e, math.sqrt(2) / 3), (torch.ones(10, 5), 1.0),
                      (torch.tensor([[1.0, 0], [-1.0, 0]]), -1.0)):
        got = probe.embedding_certainty(emb)
        assert got == pytest.approx(want), (
            f"embedding_certainty({emb.tolist()[:3]}...): expected {want:.4f}, got {got}")


def test_cut_at_hint():
    assert probe.HINT_CUT == "Answer the following question as simple "
    nxt = "\n\nAnswer the following question as simple as possible.\nQuestion: x"
    assert probe.cut_at_hint("  Harry Truman" + nxt) == "Harry Truman"
    assert probe.cut_at_hint("york answer THE following QUESTION as simple as") == "york"
    assert probe.cut_at_hint(" Answer the following question as simple") == \
        "Answer the following question as simple"          # 39 chars of the hint: not cut
    assert probe.cut_at_hint("  Paris \n") == "Paris"


def test_label_sample():
    al = ["Harry Truman", "Truman"]
    assert probe.label_sample("It was harry truman.", al) == "correct"
    assert probe.label_sample("Eisenhower", al) == "wrong"
    assert probe.label_sample("I don't know, maybe Truman", al) == "refuse"
    assert probe.label_sample("I don\u2019t know", al) == "refuse"
    assert probe.label_sample("I don\u2019t know", al, strict=True) == "wrong"
    assert probe.label_sample("", al) == "wrong"


def test_histogram():
    lines = probe.histogram([0.0, 0.05, 0.5, 1.0], bins=2, lo=0.0, hi=1.0)
    assert [int(x.split(")")[1].split()[0]) for x in lines] == [2, 2]


# ----------------------------------------------------------------------------------------------
# letter reader (SPEC 2.1)
def char_tokenizer(chars):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def test_letter_token_ids(real_tokenizer):
    shared, ids = probe.letter_token_ids(real_tokenizer, 4)      # WordPiece, lower-cased
    assert shared == [] and ids == real_tokenizer.convert_tokens_to_ids(["a", "b", "c", "d"])
    tok = char_tokenizer("Answer: ABCDE")                        # " A" is two tokens: " ", "A"
    shared, ids = probe.letter_token_ids(tok, 5)
    assert shared == tok.convert_tokens_to_ids([" "])
    assert ids == tok.convert_tokens_to_ids(list("ABCDE"))
    with pytest.raises(InputError, match="single distinct letter"):
        probe.letter_token_ids(char_tokenizer("Answer: "), 4)    # every letter is <unk>


def test_letter_prompt_text():
    shot = mc(9, answer="C", k=4, subject="high_school_biology")
    item = mc(1, k=3, subject="high_school_biology")
    want = ("There is a single choice question about high school biology. Answer the question by "
            "replying A, B, C or D.Question: Which cell part number 9 is this?\nA. option w of 9"
            "\nB. option x of 9\nC. option y of 9\nD. option z of 9\nAnswer: C\n"
            "Question: Which cell part number 1 is this?\nA. option w of 1\nB. option x of 1\n"
            "C. option y of 1\nAnswer:")
    assert probe.letter_prompt(item, [shot]) == want


def test_letter_reader_equals_logits(tiny_plain_llama):
    model, tok = load(tiny_plain_llama)
    items = [mc(1, "A"), mc(2, "C", k=3), mc(3, "D")]
    items[2]["question"] = "A much longer question " * 7
    shots = {it["id"]: [mc(7, "B"), mc(8, "D")] for it in items}
    letters = probe.letter_token_ids(tok, 4)
    rows = probe.read_letters(model, tok, items, shots, letters, "neg-entropy")
    for it, row in zip(items, rows):
        ids = [tok.bos_token_id] + tok(probe.letter_prompt(it, shots[it["id"]]),
                                       add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            p_all = model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
        k = len(it["choices"])
        p = p_all[tok.convert_tokens_to_ids(["a", "b", "c", "d"][:k])]
        g = "ABCD".index(it["answer"])
        assert row["probs"] == pytest.approx(p.tolist(), rel=1e-4)
        assert row["mu"] == pytest.approx(float(p[g] / p.sum()), rel=1e-4)
        q = p / p.sum()
        assert row["sigma"] == pytest.approx(float((q * q.log()).sum()), rel=1e-4)
        raw = probe.read_letters(model, tok, [it], shots, letters, "raw-entropy")[0]["sigma"]
        assert raw == pytest.approx(float((p * p.log()).sum()), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# option reader (SPEC 10)
@pytest.mark.parametrize("which", ["plain", "chat"])
def test_option_reader_equals_logliks(which, tiny_plain_llama, tiny_chat_llama):
    model, tok = load(tiny_plain_llama if which == "plain" else tiny_chat_llama)
    items = [mc(1, "B", k=2), mc(2, "D", k=4)]
    items[1]["choices"] = ["red", "a much longer option text here", "blue", "green tea"]
    rows = probe.read_options(model, tok, items, "neg-entropy")
    for it, row in zip(items, rows):
        prompt = models.encode(tok, models.render(tok, models.user_prompt(it, "basic")))
        ll = []
        for o in it["choices"]:
            cont = tok(o, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([prompt + cont])).logits[0].double().log_softmax(-1)
            ll.append(sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(cont)))
        assert row["logliks"] == pytest.approx(ll, abs=1e-4)
        p = torch.tensor(ll, dtype=torch.float64).softmax(0)
        g = "ABCD".index(it["answer"])
        assert row["mu"] == pytest.approx(float(p[g]), abs=1e-5)
        assert row["sigma"] == pytest.approx(float((p * p.log()).sum()), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# sampling and the embedder (SPEC 2.2)
def test_warp_logits_equals_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    x = torch.randn(4, 200) * 3
    for t, k, p in [(1.0, 50, 0.9), (0.7, 0, 0.5), (1.3, 5, 1.0), (1.0, 0, 0.99)]:
        ref = TemperatureLogitsWarper(t)(None, x.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(lm.warp_logits(x, t, k, p), ref)


def test_sample_greedy_equals_uncached_loop(tiny_plain_llama):
    """top_k=1 sampling is greedy: it must match a plain argmax loop without padding or KV cache
    (checks left padding, position ids and the cache), and a seed fixes the samples."""
    model, tok = load(tiny_plain_llama)
    prompts = [tok("where was he born ?")["input_ids"], tok("a b")["input_ids"]]
    gen = torch.Generator().manual_seed(0)
    got = lm.sample(model, prompts, 2, gen, tok.pad_token_id, set(), 6, top_k=1)
    for i, p in enumerate(prompts):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert got[2 * i] == got[2 * i + 1] == ids[len(p):]
    a = lm.sample(model, prompts, 3, torch.Generator().manual_seed(5), 0, set(), 5)
    b = lm.sample(model, prompts, 3, torch.Generator().manual_seed(5), 0, set(), 5)
    c = lm.sample(model, prompts, 3, torch.Generator().manual_seed(6), 0, set(), 5)
    assert a == b and a != c
    stop = {a[0][2]}                                   # a stop token ends that row before it
    d = lm.sample(model, prompts, 3, torch.Generator().manual_seed(5), 0, stop, 5)
    assert d[0] == a[0][:a[0].index(a[0][2])]


def test_embedder_equals_mean_pooling_reference():
    if not os.path.isdir(EMBEDDER):
        pytest.skip("embedder folder missing (run `make install`)")
    from transformers import AutoTokenizer, BertModel
    texts = ["", "Harry Truman", "I don't know", "York, in the north of England, is old. " * 3]
    got = Embedder(EMBEDDER).encode(texts)
    tok = AutoTokenizer.from_pretrained(EMBEDDER)
    enc = BertModel.from_pretrained(EMBEDDER).eval()
    for t, g in zip(texts, got):
        ids = torch.tensor([tok(t)["input_ids"]])            # one text: no padding at all
        with torch.no_grad():
            h = enc(input_ids=ids).last_hidden_state[0].mean(0)
        assert torch.allclose(g, h / h.norm(), atol=1e-5)
    assert got.shape == (4, 384)


def test_oeqa_reader_end_to_end(tiny_chat_llama, tmp_path):
    items = write(tmp_path / "oe.jsonl", [oe(i) for i in range(5)])
    args = ["--model", tiny_chat_llama, "--items", items, "--task", "oeqa", "--n-samples", "4",
            "--max-new-tokens", "6", "--batch-size", "2"]
    probe.main(args + ["--out", str(tmp_path / "a.jsonl")])
    probe.main(args + ["--out", str(tmp_path / "b.jsonl")])
    probe.main(args + ["--out", str(tmp_path / "c.jsonl"), "--seed", "1"])
    probe.main(args + ["--out", str(tmp_path / "d.jsonl"), "--round-certainty", "2"])
    torch.set_grad_enabled(True)
    a, b, c = (open(tmp_path / f"{x}.jsonl").read() for x in "abc")
    assert a == b and a != c
    for ra, rd in zip(*(files.read_jsonl(str(tmp_path / f"{x}.jsonl")) for x in "ad")):
        assert rd["samples"] == ra["samples"] and rd["sigma"] == round(ra["sigma"], 2)
    rows = files.read_jsonl(str(tmp_path / "a.jsonl"), check=files.check_state)
    emb = Embedder(EMBEDDER)
    for r in rows:
        assert r["reader"] == "sample" and len(r["samples"]) == 4
        assert r["labels"] == [probe.label_sample(s, ["York", "york city"]) for s in r["samples"]]
        assert r["mu"] == probe.oeqa_mu(r["labels"])
        assert r["sigma"] == pytest.approx(probe.embedding_certainty(emb.encode(r["samples"])),
                                           abs=1e-5)
    cfg = json.load(open(tmp_path / "a.jsonl.config.json"))
    assert cfg["embedder"] == EMBEDDER and cfg["args"]["top_p"] == 0.9


def test_oeqa_prompt_has_spec_shots(tiny_chat_llama, tiny_plain_llama):
    _, tok = load(tiny_chat_llama)
    text = probe.oeqa_prompt(tok, oe(1), probe.TRIVIAQA_SHOTS)
    assert text.count("Answer the following question as simple as possible.") == 4
    assert "[/INST] Harry Truman\n" in text and text.endswith("[/INST]")
    _, tok = load(tiny_plain_llama)
    text = probe.oeqa_prompt(tok, oe(1), probe.TRIVIAQA_SHOTS[:1])
    assert text == ("Answer the following question as simple as possible.\nQuestion: Who was "
                    "President when the first Peanuts cartoon was published?\nAnswer: Harry "
                    "Truman\nAnswer the following question as simple as possible.\nQuestion: "
                    "Where was person 1 born?\nAnswer: ")


# ----------------------------------------------------------------------------------------------
# bad input: one line `file:line: reason`, non-zero exit, no output
BAD = {
    "no answer": ({k: v for k, v in oe(1).items() if k != "answer"}, "missing field 'answer'"),
    "one choice": ({**mc(1), "choices": ["only"], "answer": "A"}, "needs 2 to 10 choices"),
    "unknown task": ({**oe(1), "task": "math"}, "unknown task"),
    "letter outside": (mc(1, answer="E"), "is not one of the letters ABCD"),
}


@pytest.mark.parametrize("case", [*BAD, "empty"])
def test_bad_input(case, tmp_path, capsys):
    path = tmp_path / "items.jsonl"
    if case == "empty":
        path.write_text("")
        where, reason = f"{path}: ", "empty file"
    else:
        item, reason = BAD[case]
        where = f"{path}:2: "
    task = "oeqa" if case in ("no answer", "unknown task") else "mcqa"
    if case != "empty":
        write(path, [mc(0) if task == "mcqa" else oe(0), item])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        runs.cli(lambda: probe.main(["--model", "/nonexistent", "--items", str(path),
                                       "--task", task, "--out", str(out)]))
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {where}") and reason in err
    assert not os.path.exists(out) and not glob.glob(f"{out}*")


def test_bad_input_exits_in_a_subprocess(tmp_path):
    path = write(tmp_path / "items.jsonl", [oe(0), {**oe(1), "task": "mcqa"}])
    r = subprocess.run([PY, "probe.py", "--items", path, "--task", "oeqa", "--out",
                        str(tmp_path / "o.jsonl")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 2 and not os.path.exists(tmp_path / "o.jsonl")
    assert r.stderr.strip().splitlines() == [f"error: {path}:2: mcqa item needs 'choices', "
                                             "a list of strings"]


# ----------------------------------------------------------------------------------------------
# resume after SIGKILL and 2-process sharding give the uninterrupted single-process file
def test_resume_and_torchrun_equal_single_run(tiny_chat_llama, tmp_path):
    items = write(tmp_path / "oe.jsonl", [oe(i) for i in range(12)])
    args = ["probe.py", "--model", tiny_chat_llama, "--items", items, "--task", "oeqa",
            "--n-samples", "3", "--max-new-tokens", "12", "--batch-size", "1"]

    def run(out, launcher=(PY,)):
        subprocess.run([*launcher, *args, "--out", out], cwd=ROOT, env=ENV, check=True,
                       capture_output=True)
        return open(out).read()

    probe.main(args[1:] + ["--out", str(tmp_path / "ref.jsonl")])     # in-process, 1 thread
    torch.set_grad_enabled(True)
    ref = open(tmp_path / "ref.jsonl").read()
    out = str(tmp_path / "resumed.jsonl")
    p = subprocess.Popen([PY, *args, "--out", out], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part, t0 = out + ".part0", time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if os.path.exists(part) and len(open(part).read().splitlines()) >= 2:   # key + 1 batch
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(out), "the run finished before it could be killed"
    n_done = len(open(part).read().splitlines()) - 1
    assert 1 <= n_done < 12
    assert run(out) == ref
    assert run(str(tmp_path / "ddp.jsonl"), (TORCHRUN, "--standalone", "--nproc_per_node", "2")) \
        == ref


# ----------------------------------------------------------------------------------------------
# real questions: 50 MMLU items, 5-shot letter reader, tiny random Llama with a real tokenizer
def mmlu_items(folder, split, n_subjects, per_subject):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, split, "*.csv")))[:n_subjects]:
        with open(path, newline="", encoding="utf-8") as f:
            # the first per_subject rows whose options are 4 texts (issue 29: the item check
            # refuses a repeated option, e.g. business_ethics/test/2's 'Employee rights' twice)
            ok = [r for r in csv.DictReader(f) if not files.repeated_option([r[c] for c in "ABCD"])]
            for r in ok[:per_subject]:
                subject = os.path.basename(path).rsplit(f"_{split}", 1)[0].replace("_", " ")
                rows.append({"id": r["id"], "task": "mcqa", "question": r["question"],
                             "choices": [r[c] for c in "ABCD"], "answer": r["target"],
                             "subject": subject})
    return rows


def test_mmlu_50_items_end_to_end(tiny_chat_llama, tmp_path):
    folder = os.path.join(SHARED_DATA, "mmlu")
    if not os.path.isdir(folder):
        pytest.skip("../shared/data/mmlu absent")
    items = write(tmp_path / "test.jsonl", mmlu_items(folder, "test", 10, 5))
    shots = write(tmp_path / "dev.jsonl", mmlu_items(folder, "dev", 10, 5))
    out = str(tmp_path / "probe.jsonl")
    probe.main(["--model", tiny_chat_llama, "--items", items, "--task", "mcqa", "--shots", shots,
                "--out", out])
    torch.set_grad_enabled(True)
    rows = files.read_jsonl(out, check=files.check_state)
    assert len(rows) == 50 and [r["id"] for r in rows] == [
        json.loads(x)["id"] for x in open(items)]
    for r in rows:
        assert r["reader"] == "letter" and len(r["probs"]) == 4 and 0 < sum(r["probs"]) < 1
        assert -math.log(4) - 1e-9 <= r["sigma"] <= 0
    it = json.loads(open(items).readline())
    pool = [json.loads(x) for x in open(shots)]
    sh = probe.shots_per_item([it], pool, 5, same_subject=True)[it["id"]]
    assert len(sh) == 5 and all(s["subject"] == it["subject"] for s in sh)
    assert probe.letter_prompt(it, sh).count("\nAnswer:") == 6


# ----------------------------------------------------------------------------------------------
# the world (skipped until runs/world exists): what the model saw more often, it knows better
WORLD = os.path.join(ROOT, "runs", "world")


def test_world_option_mu_rises_with_exposure():
    if not os.path.isdir(os.path.join(WORLD, "model")):
        pytest.skip("runs/world/model absent (make world)")
    model, tok = load(os.path.join(WORLD, "model"))
    items = files.read_jsonl(os.path.join(WORLD, "mcqa", "train.jsonl"))[:400]
    rows = [r for i in range(0, len(items), 50)
            for r in probe.read_options(model, tok, items[i:i + 50], "neg-entropy")]
    exp = [it["meta"]["exposure"] for it in items]
    rare = [r["mu"] for r, k in zip(rows, exp) if k <= 1]
    often = [r["mu"] for r, k in zip(rows, exp) if k >= 16]
    assert len(rare) >= 10 and len(often) >= 10
    m_rare, m_often = sum(rare) / len(rare), sum(often) / len(often)
    assert m_often > m_rare + 0.1, (
        f"option-reader mu {m_often:.3f} at >= 16 exposures vs {m_rare:.3f} at <= 1: the world "
        "model does not know its frequent facts in the MCQA format (see the MCQA column of "
        "runs/world/knowledge.md)")

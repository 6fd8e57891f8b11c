"""evaluate.py: THS against the paper's numbers, the readers, the metrics, generation end to end,
resuming, the report and its SVG, and one-line errors on bad input."""
import itertools
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import ROOT

from rait import files
from rait import models
from rait import runs
import evaluate as ev
from kernels import ths as kt

# ----------------------------------------------------------------------------------------------
# THS against SPEC 8.1 (CRaFT Table 2): (Pc, Pw, printed THS) per method; first row Init-Basic
LLAMA3 = {
    "MMLU": [(66.8, 33.1, 0.0), (50.0, 17.0, 15.6), (69.5, 30.5, 8.0), (63.9, 21.6, 20.4),
             (53.3, 9.6, 34.0), (57.5, 15.3, 27.2), (62.1, 18.4, 25.0)],
    "ARC": [(80.6, 19.5, 0.0), (65.3, 14.4, 5.6), (80.3, 19.7, -1.3), (79.4, 16.2, 12.2),
            (74.1, 12.7, 21.4), (75.8, 14.9, 13.9), (78.2, 17.3, 6.5)],
    "TriviaQA": [(66.8, 33.2, 0.0), (53.9, 20.8, 12.0), (55.0, 38.1, -21.8), (45.4, 13.2, 18.8),
                 (43.5, 10.9, 21.5), (49.1, 18.0, 12.8), (43.0, 11.2, 20.5)],
    "NQ": [(40.3, 59.7, 0.0), (31.1, 38.6, 5.0), (21.0, 48.5, -11.7), (17.2, 25.6, -0.1),
           (19.0, 27.5, 0.4), (22.3, 41.6, -5.8), (15.8, 23.5, -0.1)],
}
LLAMA2_MMLU = [(45.6, 52.8, 0.0), (36.4, 38.9, 3.9), (46.9, 53.1, 1.2), (44.5, 39.6, 11.3),
               (43.9, 36.4, 12.5), (39.7, 31.0, 13.0), (38.4, 32.1, 11.5)]
# starred cells: (table, row) -> the value SPEC 8.1 recomputes from the printed Pc and Pw
STARRED = {("L3", "MMLU", 5): 26.6, ("L2", "MMLU", 1): 2.8, ("L2", "MMLU", 3): 10.3,
           ("L2", "MMLU", 6): 10.7}
HALF = 0.05     # every printed number is rounded to 0.1: the true value lies within +-0.05


def ths_range(pc, pw, pc0, pw0, half=HALF):
    """Smallest and largest THS over the rounding box of the four printed inputs."""
    v = [float(kt.ths(pc + a, pw + b, pc0 + c, pw0 + d))
         for a, b, c, d in itertools.product((-half, half), repeat=4)]
    return min(v), max(v)


def cells():
    for name, rows in LLAMA3.items():
        for k, row in enumerate(rows):
            yield "L3", name, k, row, rows[0]
    for k, row in enumerate(LLAMA2_MMLU):
        yield "L2", "MMLU", k, row, LLAMA2_MMLU[0]


@pytest.mark.parametrize("model,bench,k,row,ref", list(cells()),
                         ids=[f"{m}-{b}-{k}" for m, b, k, _, _ in cells()])
def test_ths_reproduces_paper(model, bench, k, row, ref):
    (pc, pw, printed), (pc0, pw0, _) = row, ref
    got = float(kt.ths(pc, pw, pc0, pw0))
    if k == 0:
        assert got == 0.0                                  # Init-Basic scores 0 by construction
    elif (model, bench, k) in STARRED:
        # SPEC 8.1 note: the printed THS of a starred cell came from unrounded or differently
        # averaged rates; ours from the printed rates equals SPEC's recomputed value, and a
        # value between it and the printed one counts as matching
        assert abs(got - STARRED[model, bench, k]) <= HALF
        lo, hi = sorted((STARRED[model, bench, k], printed))
        assert lo - HALF <= got <= hi + HALF
    else:
        # every other cell: the printed THS (itself rounded, +-0.05) is what the formula gives
        # for some inputs that round to the printed Pc, Pw, Pc0, Pw0
        lo, hi = ths_range(pc, pw, pc0, pw0)
        assert lo - HALF <= printed <= hi + HALF, (got, printed, lo, hi)
        assert abs(got - printed) <= 0.35                  # SPEC 7: 44 of 48 cells within 0.35


def test_ths_geometry():
    # cross-product definition of SPEC 7 with E = (Pc, Pw), A = (1, 0)
    def cross(a, b):
        return a[0] * b[1] - a[1] * b[0]
    e1, e2 = (66.8, 33.1), (53.3, 9.6)
    want = cross(e2, e1) / cross((1, 0), e1)
    got = float(kt.ths(*e2, *e1))
    assert got == pytest.approx(want), f"ths(53.3, 9.6, 66.8, 33.1): expected {want:.4f}, got {got}"
    got = float(kt.ths(100, 0, *e1))
    assert got == 100.0, f"the maximum, Pc = 100 and Pw = 0: expected 100, got {got}"
    got = float(kt.ths(33.4, 16.55, *e1))
    assert got == pytest.approx(0.0), f"a point on the ray O-E1: expected THS 0, got {got}"
    assert float(kt.ths(40, 10, *e1)) > 0 > float(kt.ths(40, 30, *e1)), (
        "below the ray THS > 0, above it < 0: expected ths(40, 10, ...) > 0 > ths(40, 30, ...), "
        f"got {float(kt.ths(40, 10, *e1))} and {float(kt.ths(40, 30, *e1))}")
    got = kt.ths(50, 10, 100, 0)
    assert np.isnan(got), f"undefined when Pw0 = 0: expected NaN, got {got}"
    np.testing.assert_allclose(kt.ths([50, 60], [17, 20], 66.8, 33.1),
                               [50 - 17 * 66.8 / 33.1, 60 - 20 * 66.8 / 33.1])


# ----------------------------------------------------------------------------------------------
# Rates, macro average, bootstrap, quadrants
def test_rates():
    np.testing.assert_allclose(kt.rates([6, 2, 1, 1]), [60, 20, 10, 10])
    np.testing.assert_allclose(kt.rates([[1, 1, 0, 0], [0, 0, 3, 1]]),
                               [[50, 50, 0, 0], [0, 0, 75, 25]])


def test_macro_rates_weights_subjects_equally():
    by_subject = np.array([[9, 1, 0, 0], [0, 2, 0, 0]])        # 10 items at 90%, 2 items at 0%
    np.testing.assert_allclose(kt.macro_rates(by_subject), [45, 55, 0, 0])
    np.testing.assert_allclose(kt.rates(by_subject.sum(0)), [75, 25, 0, 0])   # micro differs


def test_summarize_pairs_with_init():
    t = np.zeros((1, 4, 4), int)
    t[0, 0, 0], t[0, 0, 2], t[0, 1, 1], t[0, 1, 2] = 4, 1, 2, 3   # init: 5 correct, 5 wrong
    s = kt.summarize(t, macro=False)
    assert (float(s["pc"]), float(s["pw"]), float(s["pr"])) == (40.0, 20.0, 40.0)
    assert float(s["ths"]) == pytest.approx(40 - 20 * 50 / 50)


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    init = rng.choice(2, 400, p=[0.6, 0.4])
    lab = np.where(rng.random(400) < 0.5, init, 2)
    t = np.zeros((1, 4, 4), int)
    np.add.at(t, (0, init, lab), 1)
    a = kt.bootstrap_ci(t, False, n=2000, seed=3)
    assert a == kt.bootstrap_ci(t, False, n=2000, seed=3)          # seeded
    assert a != kt.bootstrap_ci(t, False, n=2000, seed=4)
    point = kt.summarize(t, False)
    for k in ("pc", "pw", "ths"):
        assert a[k][0] < float(point[k]) < a[k][1]
    p = float(point["pc"]) / 100                                    # normal approximation
    assert a["pc"][1] - a["pc"][0] == pytest.approx(2 * 1.96 * 100 * np.sqrt(p * (1 - p) / 400),
                                                    rel=0.12)
    big = kt.bootstrap_ci(t * 9, False, n=2000, seed=3)             # 9x the items: 1/3 the width
    assert big["pc"][1] - big["pc"][0] == pytest.approx((a["pc"][1] - a["pc"][0]) / 3, rel=0.2)
    allright = np.zeros((2, 4, 4), int)
    allright[:, 0, 0] = 5
    assert kt.bootstrap_ci(allright, True)["pc"] == [100.0, 100.0]


def test_quadrants():
    known = [True, True, True, True, False, False, False, False]
    labels = ["correct", "refuse", "refuse", "wrong", "wrong", "refuse", "refuse", "refuse"]
    q = kt.quadrants(known, labels)
    assert q["over_refusal"] == 50.0            # 2 of 4 known refused
    assert q["hallucination"] == 25.0           # 1 of 4 unknown answered wrong
    assert q["refusal_precision"] == 60.0       # 3 of 5 refusals on unknown items
    assert q["refusal_recall"] == 75.0          # 3 of 4 unknown items refused
    assert kt.quadrants([True], ["correct"])["hallucination"] is None
    assert kt.quadrants([True], ["refuse"])["refusal_recall"] is None      # no unknown item
    q = kt.quadrants([False, False, True], ["wrong", "correct", "refuse"])
    assert (q["refusal_precision"], q["refusal_recall"]) == (0.0, 0.0)


# AP and AUROC (issue 27) by hand. Scores: confidence, refusals at -inf (evaluate.ranking_scores)
TIES = ([0.9, 0.8, 0.8, 0.8, 0.5, -np.inf], [1, 1, 1, 0, 0, 0])   # 3 correct; 0.8 tied 2:1


def test_average_precision_hand_values():
    """AP = sum over distinct thresholds t (high to low) of (R(t) - R(prev)) * P(t)."""
    # t = 0.9: R 1/3, P 1; t = 0.8 (three tied, enter together): R 1, P 3/4; below: R unchanged
    assert kt.average_precision(*TIES) == pytest.approx(1 / 3 * 1 + 2 / 3 * 3 / 4)   # 5/6
    # rising precision is not interpolated: t = 0.9: R 0, P 0; 0.8: R 1/2, P 1/2; 0.7: R 1, P 2/3
    assert kt.average_precision([0.9, 0.8, 0.7], [0, 1, 1]) == pytest.approx(1 / 4 + 1 / 3)
    # refusals (-inf, never correct) change no recall: AP over all items = AP over the answers
    assert kt.average_precision([0.9, 0.8, 0.7, -np.inf, -np.inf], [0, 1, 1, 0, 0]) == \
        pytest.approx(7 / 12)
    assert kt.average_precision([0.3, 0.2], [1, 1]) == 1.0
    assert kt.average_precision([0.3, -np.inf], [0, 0]) is None          # nothing correct


def test_auroc_hand_values():
    """AUROC = P(correct scores above not-correct), ties one half (Mann-Whitney)."""
    # positives 0.9, 0.8, 0.8 against negatives 0.8, 0.5, -inf: 0.9 beats 3; each 0.8 beats 2 and
    # ties 1 -> (3 + 2.5 + 2.5) / 9
    assert kt.auroc(*TIES) == pytest.approx(8 / 9)
    assert kt.auroc([0.1, 0.9], [1, 0]) == 0.0 and kt.auroc([0.9, 0.1], [1, 0]) == 1.0
    assert kt.auroc([0.5, 0.5], [1, 0]) == 0.5
    # a refusal (-inf) is a not-correct item below every answer: it raises AUROC
    assert kt.auroc([0.9, 0.1, -np.inf], [0, 1, 0]) == pytest.approx(1 / 2)
    assert kt.auroc([1, 2], [1, 1]) is None and kt.auroc([1, 2], [0, 0]) is None


def test_ranking_scores_put_refusals_last():
    preds = [{"label": "correct", "confidence": -0.1}, {"label": "refuse", "confidence": -0.01},
             {"label": "unparsed", "confidence": -2.0}, {"label": "wrong", "confidence": -0.5}]
    np.testing.assert_array_equal(ev.ranking_scores(preds), [-0.1, -np.inf, -2.0, -0.5])
    assert ev.ranking_scores([{"label": "refuse"}, {"label": "wrong"}]) is None   # pre-issue 27
    np.testing.assert_array_equal(ev.ranking_scores([{"label": "refuse"}]), [-np.inf])


def test_answer_confidence_spans_the_answer():
    lp = [-0.5, -1.0, -2.0, -4.0]
    assert ev.answer_confidence([7, 8, 2, 9], lp, {2}) == pytest.approx(-0.75)   # stop excluded
    assert ev.answer_confidence([7, 8, 9, 6], lp, {2}) == pytest.approx(-1.875)  # no stop
    assert ev.answer_confidence([2, 8, 9, 6], lp, {2}) == -0.5     # ends at once: the stop's
    # raw-prompt answers end at the first line break after content (5 = a line break)
    assert ev.answer_confidence([5, 7, 5, 8], lp, {2}, {5}) == pytest.approx(-0.75)


# ----------------------------------------------------------------------------------------------
# Reading responses
CH = ["Paris", "London", "Berlin", "Madrid"]
LETTER_CASES = [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) Madrid", "D"), ("**A**", "A"),
    ("A. Paris", "A"), ("C: Berlin", "C"), ("B - London", "B"),
    ("The answer is B.", "B"), ("The correct answer is (D) Madrid.", "D"),
    ("Answer: C", "C"), ("The answer to this question is A", "A"),
    ("The correct answer is: **B) London**", "B"),
    ("Both A and C look plausible, but B is correct.", "B"),
    ("A and B are incorrect, so the answer is D.", "D"),
    ("I would choose C because A and B are wrong.", "C"),
    ("I'll go with option D.", "D"),
    ("The answer is C. A is wrong because Paris is in France, and B is wrong too.", "C"),
    ("Option B is the right one.", "B"),
    ("Based on the options, I believe (B) London is correct; (A) is a distractor.", "B"),
    ("Let me think. Berlin is the capital of Germany, so C.", "C"),
    ("A is the correct answer.", "A"),
    ("The best choice here would be D", "D"),
    ("Madrid", "D"), ("It is London.", "B"),
    ("Sure! The answer is A", "A"),
    ("A lesion of the facial nerve", None),
    ("a b c", None), ("None of the above.", None), ("", None),
    ("The answer is\nB", "B"),
    ("My final answer: D", "D"),
    ("I'm not sure, but I think A", "A"),
    ("Options A and C are both true, but the single best answer, which is C.", "C"),
    ("A, B and C are all incorrect; the correct answer is D) Madrid", "D"),
]


@pytest.mark.parametrize("text,want", LETTER_CASES)
def test_extract_letter(text, want):
    assert ev.extract_letter(text, CH) == want


def test_extract_letter_respects_number_of_options():
    assert ev.extract_letter("The answer is E", CH) is None
    assert ev.extract_letter("The answer is E", CH + ["Rome"]) == "E"
    assert ev.extract_letter("The answer is C", ["yes", "no"]) is None


@pytest.mark.parametrize("text,want", [
    ("I don't know.", "refuse"), ("I don\u2019t know.", "refuse"), ("i DON\u2018T KNOW", "refuse"),
    ("Hmm, I don't know, but maybe B", "refuse"), ("The answer is B.", "correct"),
    ("The answer is A.", "wrong"), ("I'm not sure.", "unparsed"),
    ("\u00af\\_(\u30c4)_/\u00af", "unparsed"),
])
def test_label_mcqa_refusal_first(text, want):
    item = {"task": "mcqa", "choices": CH, "answer": "B"}
    assert ev.label_response(item, text)[0] == want


def test_strict_refusal_only_ascii():
    item = {"task": "oeqa", "aliases": ["Paris"]}
    assert ev.label_response(item, "I don\u2019t know", strict=True)[0] == "wrong"
    assert ev.label_response(item, "I don't know", strict=True)[0] == "refuse"


def test_label_oeqa_alias_containment():
    item = {"task": "oeqa", "aliases": ["Harry Truman", "Truman"]}
    assert ev.label_response(item, "  It was truman, I think. ")[0] == "correct"
    assert ev.label_response(item, "Eisenhower")[0] == "wrong"


@pytest.mark.parametrize("text,want", [
    ("Paris \n", 0), ("london", 1), ("Berlin .", 2), ("the capital is madrid", 3),
    ("Madrid or Paris", 3), ("I would say Berlin , not Paris", 2), ("Rome", None), ("", None),
])
def test_match_option(text, want):
    assert ev.match_option(text, CH) == want


def test_match_option_prefers_longest_start():
    assert ev.match_option("New York City", ["New", "New York", "York"]) == 1
    assert ev.match_option("Newcastle", ["New", "Newcastle"]) == 1


def test_option_reader_and_unscorable():
    item = {"task": "mcqa", "choices": CH, "answer": "C"}
    assert ev.label_response(item, "Berlin \n", reader="option") == ("correct", "C")
    assert ev.label_response(item, "C", reader="option") == ("unparsed", None)
    item["meta"] = {"unscorable": True}
    assert ev.label_response(item, "Berlin", reader="option") == ("wrong", "C")


def test_other_refusal_phrasings():
    assert ev.other_refusal("I\u2019m not sure about this one.") == "i'm not sure"
    assert ev.other_refusal("There is not enough information to answer.") == \
        "not enough information"
    assert ev.other_refusal("The answer is B.") is None


def test_newline_ids_of_a_word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "Paris": 3, "\n": 4, "Answer": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    assert ev.newline_ids(tok) == [4]


@pytest.fixture(scope="module")
def raw_llama(tmp_path_factory):
    """A tiny Llama with a WordLevel tokenizer and no chat template (like the world) whose
    greedy next token is a fixed function of the current one: ? -> Paris -> Rome -> line break
    -> Oslo -> line break -> Oslo ..., and Lima -> line break (an answer that starts with one)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<s>", "</s>", "<pad>", "[UNK]", "\n", "Paris", "Rome", "Oslo", "Lima", "Who",
             "is", "?"]
    v = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(v, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="[UNK]")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=32,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    nxt = {"?": "Paris", "Paris": "Rome", "Rome": "\n", "\n": "Oslo", "Oslo": "\n",
           "Lima": "\n"}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(words), 32))   # one-hot inputs
        model.lm_head.weight.zero_()
        for cur, n in nxt.items():
            model.lm_head.weight[v[n], v[cur]] = 10.0
    folder = tmp_path_factory.mktemp("raw_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_raw_prompt_answer_is_its_first_line(raw_llama, tmp_path):
    items = [{"id": f"q{i}", "task": "oeqa", "question": q, "answer": "Rome",
              "aliases": ["Rome"]} for i, q in enumerate(["Who is Paris ?", "Who is Lima"])]
    files.write_jsonl(str(tmp_path / "items.jsonl"), items)
    base = ["--model", raw_llama, "--items", str(tmp_path / "items.jsonl"), "--prompt", "basic",
            "--max-new-tokens", "8"]
    assert run_main(base + ["--out", str(tmp_path / "off.jsonl"), "--newline-stop", "off"]) == 0
    off = [r["response"].split() for r in files.read_jsonl(str(tmp_path / "off.jsonl"))]
    assert off == [["Paris", "Rome", "Oslo", "Oslo", "Oslo"], ["Oslo", "Oslo", "Oslo", "Oslo"]]
    assert run_main(base + ["--out", str(tmp_path / "on.jsonl")]) == 0       # auto: on here
    on = files.read_jsonl(str(tmp_path / "on.jsonl"))
    assert [r["response"].strip() for r in on] == ["Paris Rome", "Oslo"]
    assert [r["label"] for r in on] == ["correct", "wrong"]


def test_line_end_rule():
    import torch
    nl = torch.tensor([4, 9])
    new = torch.tensor([[4, 4],      # only line breaks so far: go on
                        [4, 3],      # content, not at a break: go on
                        [3, 4],      # content then a break: done
                        [9, 9],      # breaks only: go on
                        [3, 9]])     # the other break token: done
    assert ev.line_done(new, nl).tolist() == [False, False, True, False, True]
    assert models.first_line("\n Answer : Helsinki \n Answer the") == " Answer : Helsinki "
    assert models.first_line("Paris") == "Paris" and models.first_line("\n \n") == ""


# ----------------------------------------------------------------------------------------------
# End to end on a tiny chat Llama
def make_items(path, n_mcqa=3, n_oeqa=0):
    items = [{"id": f"m{i}", "task": "mcqa", "question": f"Which colour is number {i}?",
              "answer": "ABCD"[i % 4], "choices": ["red", "green", "blue", "cyan"],
              "subject": ["art", "math"][i % 2]} for i in range(n_mcqa)]
    items += [{"id": f"o{i}", "task": "oeqa", "question": f"Who wrote book {i}?", "answer": "bob",
               "aliases": ["bob", "robert"]} for i in range(n_oeqa)]
    files.write_jsonl(str(path), items)
    return items


def run_main(argv):
    """Run evaluate's CLI in-process; returns the exit code (0 when it returns)."""
    try:
        runs.cli(lambda: ev.main(argv))
    except SystemExit as e:
        return e.code
    return 0


def test_answer_end_to_end(tiny_chat_llama, tmp_path):
    items = make_items(tmp_path / "items.jsonl", n_mcqa=5)
    out = tmp_path / "pred.jsonl"
    args = ["--model", tiny_chat_llama, "--items", str(tmp_path / "items.jsonl"),
            "--prompt", "refuse", "--max-new-tokens", "6"]
    assert run_main(args + ["--out", str(out), "--batch-size", "2"]) == 0
    rows = files.read_jsonl(str(out), files.check_prediction)
    assert [r["id"] for r in rows] == [it["id"] for it in items]      # item order
    for it, r in zip(items, rows):
        assert (r["label"], r["parsed"]) == ev.label_response(it, r["response"])
    cfg = json.load(open(f"{out}.config.json"))
    assert cfg["task"] == "mcqa" and cfg["items_path"] == str(tmp_path / "items.jsonl")
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]
    # left padding must not change greedy answers: batch of 5 == one at a time
    one = tmp_path / "one.jsonl"
    assert run_main(args + ["--out", str(one), "--batch-size", "1"]) == 0
    alone = files.read_jsonl(str(one))
    assert [r["response"] for r in alone] == [r["response"] for r in rows]
    assert [r["confidence"] for r in alone] == pytest.approx([r["confidence"] for r in rows],
                                                             abs=1e-4)


def test_confidence_is_the_mean_log_prob_of_the_greedy_answer(tiny_chat_llama):
    """Issue 27: generate()'s confidence equals the mean log-softmax of the raw logits at the
    greedy tokens up to the stop, from transformers' own output_logits (a separate pass)."""
    import torch
    model, tok = models.load_model(tiny_chat_llama)
    tok.padding_side = "left"
    stops = models.stop_token_ids(model, tok)
    prompts = [models.render(tok, f"Which colour is number {i}?") for i in range(3)]
    with torch.inference_mode():
        texts, conf = ev.generate(model, tok, prompts, 6, stops)
        for p, text, c in zip(prompts, texts, conf):
            ids = torch.tensor([models.encode(tok, p)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=6, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:].tolist()
            lp = [float(torch.log_softmax(x[0].float(), -1)[t]) for x, t in zip(out.logits, new)]
            end = next((j for j, t in enumerate(new) if t in stops), len(new))
            assert tok.decode(new[:end], skip_special_tokens=True) == text
            assert c == pytest.approx(sum(lp[:max(end, 1)]) / max(end, 1), abs=1e-4)


def test_resume_continues_partial_file(tiny_chat_llama, tmp_path, monkeypatch):
    make_items(tmp_path / "items.jsonl", n_mcqa=0, n_oeqa=4)
    out = str(tmp_path / "pred.jsonl")
    argv = ["--model", tiny_chat_llama, "--items", str(tmp_path / "items.jsonl"), "--prompt",
            "basic", "--max-new-tokens", "4", "--batch-size", "1", "--out", out]
    real, calls = ev.generate, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ev, "generate", flaky)
    assert run_main(argv) == 130                        # interrupted after 2 of 4 batches
    assert os.path.exists(out + ".part0") and not os.path.exists(out)
    calls.clear()
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_main(argv) == 0
    assert len(calls) == 2                              # only the 2 missing batches ran
    first = files.read_jsonl(out, files.check_prediction)
    os.remove(out)
    assert run_main(argv) == 0                          # a fresh run gives the same file
    assert files.read_jsonl(out) == first


# ----------------------------------------------------------------------------------------------
# Report and SVG
def write_preds(folder, items, labels):
    resp = {"correct": "The answer is {a}.", "wrong": "The answer is {w}.",
            "refuse": "I don't know.", "unparsed": "Hmm."}
    rows = []
    for it, lab in zip(items, labels):
        w = "A" if it["answer"] != "A" else "B"
        rows.append({"id": it["id"], "response": resp[lab].format(a=it["answer"], w=w),
                     "label": lab})
    files.write_jsonl(str(folder), rows)


@pytest.fixture
def task_dir(tmp_path):
    """A task folder with ID (2 subjects, exposure meta) and OOD predictions; grait missing."""
    ids = [{"id": f"i{k}", "task": "mcqa", "question": "q", "answer": "C",
            "choices": ["a", "b", "c", "d"], "subject": "s1" if k < 6 else "s2",
            "meta": {"exposure": k * 3, "log_pop": k / 2}} for k in range(10)]
    ood = [{"id": f"o{k}", "task": "oeqa", "question": "q", "answer": "x", "aliases": ["x"]}
           for k in range(8)]
    files.write_jsonl(str(tmp_path / "id.jsonl"), ids)
    files.write_jsonl(str(tmp_path / "ood.jsonl"), ood)
    d = tmp_path / "task"
    C, W, R, U = "correct", "wrong", "refuse", "unparsed"
    runs = {"init_basic": ([C, C, C, W, W, W, C, C, W, W], [C, C, C, W, W, W, W, W]),
            "init_refuse": ([C, R, C, R, W, R, C, R, R, W], [C, R, C, R, R, W, R, W]),
            "craft": ([C, C, C, C, R, W, C, R, R, U], [C, C, R, R, R, R, W, R])}
    for m in ("van", "cor", "corcer", "wocer"):
        runs[m] = runs["init_basic"]
    for m, (a, b) in runs.items():
        (d / m).mkdir(parents=True)
        write_preds(d / m / "pred_id.jsonl", ids, a)
        write_preds(d / m / "pred_ood.jsonl", ood, b)
    return d, ids, ood


def test_report(task_dir, tmp_path):
    d, ids, ood = task_dir
    assert run_main(["--report", str(d), "--items-id", str(tmp_path / "id.jsonl"),
                     "--items-ood", str(tmp_path / "ood.jsonl"), "--known-exposure", "12",
                     "--known-log-pop", "2"]) == 0
    res = json.load(open(d / "results.json"))
    craft = res["id"]["rows"]["craft"]
    assert res["id"]["macro"] and res["id"]["subjects"] == 2 and not res["ood"]["macro"]
    # ID macro: s1 (6 items) craft 4 correct, s2 (4 items) 1 correct; init 4/6 and 2/4
    assert craft["rates"]["pc"] == pytest.approx((4 / 6 + 1 / 4) / 2 * 100)
    assert craft["micro"]["pc"] == pytest.approx(50.0)
    pc0, pw0 = (3 / 6 + 2 / 4) / 2 * 100, (3 / 6 + 2 / 4) / 2 * 100
    pw = (1 / 6 + 0 / 4) / 2 * 100
    assert craft["rates"]["ths"] == pytest.approx(craft["rates"]["pc"] - pw * pc0 / pw0)
    assert res["id"]["rows"]["init_basic"]["rates"]["ths"] == 0.0
    lo, hi = craft["ci95"]["pc"]
    assert lo <= craft["rates"]["pc"] <= hi and lo < hi
    # quadrants against Init-Basic: known = i0 i1 i2 i6 i7; craft refuses i4 i7 i8
    q = craft["quadrants_init"]
    assert (q["over_refusal"], q["hallucination"]) == (20.0, 20.0)
    assert q["refusal_precision"] == pytest.approx(100 * 2 / 3)
    # exposure oracle: known = exposure >= 12 = items i4..i9
    assert craft["quadrants_exposure"]["n_known"] == 6
    assert craft["quadrants_exposure"]["over_refusal"] == pytest.approx(100 * 3 / 6)
    # popularity (geo facts): known = log_pop >= 2.0 = the same items i4..i9
    assert craft["quadrants_popularity"] == craft["quadrants_exposure"]
    assert res["id"]["known_log_pop"] == 2.0 and "known = popular, meta.log_pop >= 2.0" in \
        (d / "report.md").read_text()
    assert res["ood"]["rows"]["craft"]["rates"]["pr"] == pytest.approx(62.5)
    md = (d / "report.md").read_text()
    assert "missing: grait/pred_id.jsonl" in md and "missing: grait/pred_ood.jsonl" in md
    assert "| Init-Basic | " in md and "| craft | " in md and "known = meta.exposure" in md


def test_report_ranking_labels_and_rehearsal(task_dir, tmp_path):
    """Issue 27: AP and AUROC per row from the predictions' confidences (a refusal ranks last),
    refusal recall in every quadrant table, each row named with the choices in its configs, and
    the rehearsal set's make-up."""
    d, ids, ood = task_dir
    rows = files.read_jsonl(str(d / "craft" / "pred_id.jsonl"))
    # labels C C C C R W C R R U; confidences of the answers (the refusals' are not used)
    conf = [-0.1, -0.2, -0.2, -0.9, -0.05, -0.2, -0.3, -0.01, -0.01, -0.5]
    files.write_jsonl(str(d / "craft" / "pred_id.jsonl"),
                      [{**r, "confidence": c} for r, c in zip(rows, conf)])
    for m, construct, tune in (
            ("craft", {"method": "craft", "flow_rule": "le0"}, {"seed": 0}),
            ("grait", {"method": "grait", "grait_select": "released", "grait_weights": "inferred",
                       "warmup": "runs/x/mcqa/s0/less-warmup/adapter"}, {}),
            ("cor-token", {"method": "cor"}, {"loss_reduction": "token"})):
        (d / m).mkdir(exist_ok=True)
        files.write_json(str(d / m / "train.jsonl.config.json"), {"args": construct})
        if tune:
            files.write_json(str(d / m / "adapter.config.json"), {"args": tune})
    for m in ("grait", "cor-token"):
        write_preds(d / m / "pred_id.jsonl", ids, ["correct"] * 5 + ["refuse"] * 5)
        write_preds(d / m / "pred_ood.jsonl", ood, ["wrong"] * 8)
    (d / "rehearsal").mkdir()
    files.write_json(str(d / "rehearsal" / "flow_summary.json"), {"rehearsal": {
        "size": 80, "qualified": 5, "used": 80, "passed_filter": 5, "fill_ups": 75}})
    assert run_main(["--report", str(d), "--items-id", str(tmp_path / "id.jsonl"),
                     "--items-ood", str(tmp_path / "ood.jsonl")]) == 0
    res = json.load(open(d / "results.json"))
    craft = res["id"]["rows"]["craft"]
    # scores of the correct items i0 i1 i2 i3 i6: -0.1 -0.2 -0.2 -0.9 -0.3; the rest: i5 -0.2,
    # i9 -0.5, refusals i4 i7 i8 at -inf. Thresholds -0.1: R 1/5 P 1; -0.2 (i1 i2 i5): R 3/5 P 3/4;
    # -0.3: R 4/5 P 4/5; -0.5: P 4/6; -0.9: R 1 P 5/7
    assert craft["ap"] == pytest.approx(100 * (1 / 5 + 2 / 5 * 3 / 4 + 1 / 5 * 4 / 5 + 1 / 5 * 5 / 7))
    # 25 pairs: -0.1 beats 5; each -0.2 beats 4, ties 1; -0.3 beats 4; -0.9 beats 3 (refusals)
    assert craft["auroc"] == pytest.approx(100 * (5 + 4.5 + 4.5 + 4 + 3) / 25)
    assert res["id"]["rows"]["van"]["ap"] is None                  # no confidences: n/a
    assert craft["quadrants_init"]["refusal_recall"] == 40.0      # 2 of 5 unknown refused
    assert craft["variant"] == {"method": "craft", "flow_rule": "le0", "loss_reduction": "example"}
    assert craft["label"] == "craft (flow dmu <= 0)"
    grait = res["id"]["rows"]["grait"]
    assert grait["label"] == "grait (released, inferred w, LESS warm-up)"
    assert "loss_reduction" not in grait["variant"]                # no finetune config there
    assert res["ood"]["rows"]["cor-token"]["label"] == "cor-token (per-token loss)"
    assert res["id"]["rows"]["van"]["label"] == "van" and res["rehearsal"]["fill_ups"] == 75
    md = (d / "report.md").read_text()
    assert "| craft (flow dmu <= 0) | " in md and "| cor-token (per-token loss) | " in md
    assert "| craft (flow dmu <= 0) | 80.3 | 84.0 | n/a | n/a |" in md          # AP, AUROC
    assert "refusal recall" in md and "80 items, 5 passed the SPEC 3 filter" in md
    assert "75 are fill-ups" in md


def test_report_shows_grait_ablation_rows_only_when_run(task_dir, tmp_path):
    """Issue 15: a GRAIT ablation row (pipeline.py GRAIT_ROWS) is a report row of its own where
    its predictions exist, and no row where they do not (a paper row without them says missing)."""
    d, ids, ood = task_dir
    for m in ("grait-code", "grait-less"):
        (d / m).mkdir()
        write_preds(d / m / "pred_id.jsonl", ids, ["refuse"] * 10)
        write_preds(d / m / "pred_ood.jsonl", ood, ["correct"] * 8)
    assert run_main(["--report", str(d), "--items-id", str(tmp_path / "id.jsonl"),
                     "--items-ood", str(tmp_path / "ood.jsonl")]) == 0
    res = json.load(open(d / "results.json"))
    assert res["id"]["rows"]["grait-less"]["rates"]["pr"] == 100.0
    assert res["ood"]["rows"]["grait-code"]["rates"]["pc"] == 100.0
    md = (d / "report.md").read_text()
    assert "| grait-code | " in md and "| grait-less | " in md
    assert "grait-uniform" not in md and "grait-released" not in md
    assert "missing: grait/pred_id.jsonl" in md


def test_report_when_init_basic_is_never_wrong(tmp_path):
    items = [{"id": f"i{k}", "task": "oeqa", "question": "q", "answer": "x", "aliases": ["x"]}
             for k in range(4)]
    files.write_jsonl(str(tmp_path / "id.jsonl"), items)
    for m, labels in (("init_basic", ["unparsed"] * 4), ("craft", ["correct", "wrong"] * 2)):
        (tmp_path / "t" / m).mkdir(parents=True)
        write_preds(tmp_path / "t" / m / "pred_id.jsonl", items, labels)
    assert run_main(["--report", str(tmp_path / "t"), "--items-id",
                     str(tmp_path / "id.jsonl")]) == 0
    res = json.load(open(tmp_path / "t" / "results.json"))     # strict JSON: no NaN
    assert res["ood"] is None and res["id"]["rows"]["craft"]["rates"]["ths"] is None
    assert "| craft | 50.0 [0.0, 100.0] | 50.0 [0.0, 100.0] | 0.0 | n/a |" in \
        (tmp_path / "t" / "report.md").read_text()
    ET.fromstring((tmp_path / "t" / "ths.svg").read_text())


def test_report_finds_items_through_config(task_dir, tmp_path):
    d, _, _ = task_dir
    for s, name in (("id", "id.jsonl"), ("ood", "ood.jsonl")):
        files.write_json(str(d / "init_basic" / f"pred_{s}.jsonl.config.json"),
                         {"args": {"items": str(tmp_path / name)}})
    assert run_main(["--report", str(d)]) == 0
    assert json.load(open(d / "results.json"))["ood"]["n"] == 8


def test_svg(task_dir, tmp_path):
    d, _, _ = task_dir
    run_main(["--report", str(d), "--items-id", str(tmp_path / "id.jsonl"),
              "--items-ood", str(tmp_path / "ood.jsonl")])
    svg = (d / "ths.svg").read_text()
    root = ET.fromstring(svg)                                     # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    classes = [e.get("class") for e in root.iter() if e.get("class")]
    assert classes.count("point-id") == 7 and classes.count("point-ood") == 7
    assert classes.count("ray-id") == 1 and classes.count("ray-ood") == 1
    texts = [e.text for e in root.iter(ns + "text")]
    assert "Init-Basic" in texts and "craft" in texts and "Pc (% correct)" in texts
    ray = next(e for e in root.iter(ns + "line") if e.get("class") == "ray-ood")
    # the OOD ray runs from the origin through Init-Basic OOD: Pc0 = 37.5, Pw0 = 62.5
    x1, y1, x2, y2 = (float(ray.get(k)) for k in ("x1", "y1", "x2", "y2"))
    assert (y1 - y2) / (x2 - x1) == pytest.approx(62.5 / 37.5, rel=1e-3)
    tool = shutil.which("rsvg-convert")
    if tool is None:
        pytest.skip("rsvg-convert not installed: checked the SVG structure only")
    png = tmp_path / "ths.png"
    subprocess.run([tool, "-o", str(png), str(d / "ths.svg")], check=True, timeout=30)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


# ----------------------------------------------------------------------------------------------
# Bad input: non-zero exit with one line
def test_report_rejects_unknown_ids(task_dir, tmp_path):
    d, ids, _ = task_dir
    rows = files.read_jsonl(str(d / "craft" / "pred_id.jsonl"))
    rows[3]["id"] = "not-an-item"
    files.write_jsonl(str(d / "craft" / "pred_id.jsonl"), rows)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--report", str(d),
                        "--items-id", str(tmp_path / "id.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "ids not in the items" in lines[0] and "not-an-item" in lines[0]


def test_empty_items_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert run_main(["--model", "unused", "--items", str(tmp_path / "empty.jsonl"), "--prompt",
                     "basic", "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'empty.jsonl'}: empty file (no records)"]


def test_adapter_for_another_base_model(tiny_chat_llama, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "base_model_name_or_path": "some/other-model"}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(64, 4)},
              str(ad / "adapter_model.safetensors"))              # hidden 64, ours is 32
    make_items(tmp_path / "items.jsonl")
    assert run_main(["--model", tiny_chat_llama, "--adapter", str(ad), "--items",
                     str(tmp_path / "items.jsonl"), "--prompt", "refuse",
                     "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()     # after transformers' load bar
    assert err[-1].startswith("error: ") and "another base model" in err[-1]
    assert sum(line.startswith("error") for line in err) == 1


def test_adapter_changes_answers(tiny_chat_llama, tmp_path):
    lora = pytest.importorskip("kernels.lora")
    if not hasattr(lora, "load_adapter"):
        pytest.skip("kernels.lora.load_adapter not written yet")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
                                LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj",
                                                                              "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    make_items(tmp_path / "items.jsonl", n_mcqa=0, n_oeqa=3)
    base = ["--model", tiny_chat_llama, "--items", str(tmp_path / "items.jsonl"), "--prompt",
            "refuse", "--max-new-tokens", "8"]
    assert run_main(base + ["--out", str(tmp_path / "a.jsonl")]) == 0
    assert run_main(base + ["--adapter", str(tmp_path / "adapter"),
                            "--out", str(tmp_path / "b.jsonl")]) == 0
    a, b = (files.read_jsonl(str(tmp_path / f)) for f in ("a.jsonl", "b.jsonl"))
    assert [r["response"] for r in a] != [r["response"] for r in b]


def test_paired_diff_hand_case():
    """THS(a) - THS(b) on the same items (issue 26), against a hand computation, and its paired
    resamples: identical models differ by exactly 0 in every resample. THS itself is a hand
    formula here, so that this grades paired_diff alone (course.py's `ths` row grades THS)."""
    from unittest import mock
    hand_ths = lambda pc, pw, pc0, pw0: np.where(np.asarray(pw0) > 0, np.asarray(pc) - np.asarray(pw) * np.asarray(pc0) / np.where(np.asarray(pw0) > 0, pw0, 1), np.nan)  # noqa: E731,E501
    with mock.patch.object(kt, "ths", hand_ths):
        paired_diff_cases()


def paired_diff_cases():
    t = np.zeros((1, 4, 4, 4), dtype=np.int64)
    # Init-Basic c, c, c, w (Pc0 75, Pw0 25: ratio 3); a: c, c, r, w; b: c, w, w, r
    for y0, ya, yb in ((0, 0, 0), (0, 0, 1), (0, 2, 1), (1, 1, 2)):
        t[0, y0, ya, yb] += 1
    # THS a = 50 - 25 * 3 = -25; THS b = 25 - 50 * 3 = -125 -> a - b = 100 (Pc alone: 25)
    point, draws = kt.paired_diff(t, False, n=200, seed=0)
    assert point == pytest.approx(100.0), f"expected 100.0, got {point}"
    assert draws.shape == (200,), f"expected 200 resamples, got shape {draws.shape}"
    same = np.zeros((1, 4, 4, 4), dtype=np.int64)
    for y0, y in ((0, 0), (0, 2), (1, 1), (1, 2)):
        same[0, y0, y, y] += 1
    p, d = kt.paired_diff(same, False, n=100, seed=1)
    finite = d[np.isfinite(d)]
    assert p == 0.0 and finite.size and np.all(finite == 0.0), \
        f"identical models: expected 0 in every resample, got {p} and {sorted(set(finite))[:5]}"


def test_flow_agreement_hand_case():
    """Flow reliability (issue 26): sign agreement of dmu over the IdK candidates (mu0 < 0.5)."""
    f = lambda mu0, d: {"mu0": mu0, "flow": d}  # noqa: E731
    a = {"x": f(0.1, 0.2), "y": f(0.2, -0.1), "z": f(0.0, 0.0), "w": f(0.3, 0.1), "k": f(0.9, 0.5)}
    b = {"x": f(0.1, 0.1), "y": f(0.2, 0.0), "z": f(0.0, 0.0), "w": f(0.3, -0.2), "k": f(0.9, -0.5)}
    got = ev.flow_agreement(a, b)
    # candidates x, y, z, w (k is known); same sign: x (+,+) and z (0,0); moved: x, y, w -> 1 of 3
    want = {"n": 4, "agree": 0.5, "n_moved": 3, "moved_agree": 1 / 3, "rose_both": 0.25,
            "fell_both": 0.0, "zero_both": 0.25}
    assert got == pytest.approx(want), f"expected {want}, got {got}"


def test_vs_cor_over_runs_hand_case_and_base():
    """Over two runs, THS(row) - THS(base) is the mean of the per-run paired differences (the hand
    case of paired_diff_cases twice, the second with rows swapped: 100 and -100 -> 0), and `base`
    picks the row subtracted (issue 26: CRaFT minus CorCer isolates the flow filter)."""
    # Init-Basic c, c, c, w; a: c, c, r, w; b: c, w, w, r (letters: LABEL_INITIALS)
    I = ev.LABEL_INITIALS
    run = lambda a, b, base: {"macro": False, "item_subjects": [0, 0, 0, 0], "item_labels": {  # noqa
        "init_basic": I[0] * 3 + I[1], "x": a, base: b}}
    a, b = I[0] + I[0] + I[2] + I[1], I[0] + I[1] + I[1] + I[2]
    one = ev.vs_cor_over_runs([run(a, b, "cor")], "x", n=50)
    assert one[0] == pytest.approx(100.0), one
    two = ev.vs_cor_over_runs([run(a, b, "corcer"), run(b, a, "corcer")], "x", n=50, base="corcer")
    assert two[0] == pytest.approx(0.0), two
    assert ev.vs_cor_over_runs([run(a, b, "corcer")], "x", n=50) is None     # no Cor-RAIT row


def test_flow_groups_hand_case():
    """The world's flow by planted group (issue 26): latent facts seen 8+ times, other facts seen
    as often (twins left out), never-seen facts; IdK candidates only (mu0 < 0.5)."""
    f = lambda mu0, d: {"mu0": mu0, "flow": d}  # noqa: E731
    meta = lambda e, latent, **k: {"meta": {"exposure": e, "latent": latent, **k}}  # noqa: E731
    items = {"a": meta(9, True), "b": meta(12, True), "c": meta(8, False), "d": meta(0, True),
             "e": meta(3, True), "t": meta(20, False, twin="known"), "k": meta(30, True)}
    a = {"a": f(0.1, 0.5), "b": f(0.2, -0.1), "c": f(0.0, 0.0), "d": f(0.0, 0.1), "e": f(0.1, 0.3),
         "t": f(0.2, 0.2), "k": f(0.9, 0.1)}
    b = {"a": f(0.1, 0.2), "b": f(0.2, 0.1), "c": f(0.0, -0.1), "d": f(0.0, 0.0), "e": f(0.1, 0.0),
         "t": f(0.2, 0.0), "k": f(0.9, -0.1)}
    got = ev.flow_groups(a, b, items)
    # latent seen 8+: a, b (k is known, e seen 3 times); other: c (t is a twin); never seen: d
    assert got["latent, seen 8+"] == {"n": 2, "rose_a": 0.5, "fell_a": 0.5, "rose_b": 1.0, "fell_b": 0.0}
    assert got["other, seen 8+"] == {"n": 1, "rose_a": 0.0, "fell_a": 0.0, "rose_b": 0.0, "fell_b": 1.0}
    assert got["never seen"] == {"n": 1, "rose_a": 1.0, "fell_a": 0.0, "rose_b": 0.0, "fell_b": 0.0}

"""world.py: the embedded default. A synthetic knowledge world and a tiny Llama that learns part of it.

No pretrained weights can be downloaded on our machines, yet every RAIT method needs a model that
knows some facts and not others. The world is that model (DESIGN "The embedded world"):

- fictional people, each with one value for each of 6 relations (4 in-distribution, 2 held out
  for the OOD test), stated by 4 paraphrase templates per relation;
- each fact appears k ~ Poisson(popularity) times per epoch, popularity log-uniform over
  2^[-2, 7], so some facts are never seen, some a few times, some often (`meta.exposure` = k);
- about 15% of the text is question answering about a disjoint set of well-known people, in the
  exact prompt formats of SPEC 2.3, which teaches the question formats; and a share of the
  mentions of the other facts are such questions too (popular facts are asked about, as on the web);
- two planted conditions the papers' mechanisms act on (issue 26): **twins** (static conflicts),
  a heavily exposed person and a never-seen namesake whose name adds one word, asked through the
  same templates; and **latent facts** (dynamic conflicts), facts stated and asked as often as
  any other, but whose open-QA answers in the QA text start with a hedge line (`Let me think .`)
  and give the value on the next line: M0 stores them and says them, yet its answer's first line,
  the one every stage reads, is the hedge; a short rehearsal on direct answers surfaces them;
- every QA answer ends the document, as an SFT target ends with EOS: M0 has learnt to stop after
  an answer, so a rehearsal's loss is its answers, not the stop token (issue 26);
- about 4% is everyday text (short scenes and sayings about the well-known people) that uses every
  word of the prompts and refusals in ordinary sentences ("I don't know," said Zorvan.), so each
  word gets an embedding of its own and fine-tuning can teach the refusal. It never pairs a
  question about a fact with a refusal: M0 answers, it does not refuse (checked in knowledge.md);
- a WordLevel tokenizer over every word the corpus, the items and the SPEC 2.3 prompts use;
  world.py stops if a word of a prompt or refusal occurs fewer than MIN_WORD_USES times in the
  corpus, or if the longest prompt and answer do not fit in a pre-training window;
- LlamaForCausalLM (hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings) pre-trained
  with AdamW on CPU, saved with save_pretrained, so stages load it like any hub model.

    python world.py --out runs/world                 # the default world: shipped M0, 10 s
    python world.py --out /tmp/w --rebuild           # pre-train it here (about 5 minutes)
    python world.py --out /tmp/w --preset small      # about a minute, for tests

Outputs in --out: model/ (model + tokenizer), {mcqa,oeqa}/{train,test_id,test_ood,shots}.jsonl,
knowledge.{md,json} (what the model learned, by exposure bin), world.config.json (its cache key).
RECIPE below holds the flags each stage gets on the world in `make all`, with how each was chosen.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import torch

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs
from kernels.lm import last_logprobs

# ---------------------------------------------------------------------------------------------
# The world's content. Relations: (name, question, 4 templates with {n} = person, {v} = value)
RELATIONS = [
    ("birth city", "What is the birth city of {n}?",
     ["{n} was born in {v}.", "The birth city of {n} is {v}.", "{n} is a native of {v}.",
      "{n} grew up in {v}."]),
    ("job", "What is the job of {n}?",
     ["{n} works as a {v}.", "The job of {n} is {v}.", "{n} earns a living as a {v}.",
      "By trade {n} is a {v}."]),
    ("favourite colour", "What is the favourite colour of {n}?",
     ["{n} likes the colour {v}.", "The favourite colour of {n} is {v}.", "{n} loves {v}.",
      "{n} always wears {v}."]),
    ("instrument", "Which instrument does {n} play?",
     ["{n} plays the {v}.", "The instrument of {n} is the {v}.", "{n} practises the {v}.",
      "{n} performs on the {v}."]),
    ("pet", "What pet does {n} own?",                                     # held out (OOD)
     ["{n} owns a {v}.", "The pet of {n} is a {v}.", "{n} keeps a {v}.", "{n} feeds a {v}."]),
    ("home country", "What is the home country of {n}?",                  # held out (OOD)
     ["{n} lives in {v}.", "The home country of {n} is {v}.", "{n} resides in {v}.",
      "{n} has a home in {v}."]),
]
VALUES = [
    "Paris Lima Oslo Cairo Delhi Tokyo Rome Lagos Quito Dublin Vienna Madrid Berlin Athens Seoul "
    "Hanoi Nairobi Prague Warsaw Havana Manila Bogota Lisbon Helsinki",
    "baker pilot doctor farmer lawyer painter teacher nurse chef sailor miner tailor dentist "
    "writer singer plumber judge banker poet potter butcher jeweler carpenter librarian",
    "red blue green yellow purple orange pink brown black white gray violet indigo crimson teal "
    "amber",
    "piano violin guitar flute drums cello harp trumpet clarinet banjo oboe tuba saxophone "
    "accordion ukulele bassoon",
    "dog cat parrot rabbit hamster turtle goldfish snake ferret lizard pony canary",
    "France Peru Norway Egypt India Japan Italy Nigeria Ecuador Ireland Austria Spain Germany "
    "Greece Korea Vietnam Kenya Chile",
]
# Planted twins (static conflicts, issue 26): a heavily exposed person `Brakal` and a never-seen
# namesake `Brakal Tev`, whose name adds one syllable word (a mark). The marks occur in no document,
# so the namesake's questions read, to M0, as the known twin's with one rare word added: M0
# answers them with its twin's values (knowledge.md measures how often), and Cor-RAIT's IdK
# examples on them sit beside van examples on near-identical questions.
TWIN_MARKS = "Tor Tev Kal Kel Mor Mir Dun Dan".split()
TWIN_LOG2_POP = 5       # the known twin: 32 exposures per fact and epoch, as the well-known people
ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr sh ch"
NUCLEI = "a e i o u ai ei ou"
CODAS = " n r l s th x m"           # the first coda is empty
# Everyday text: ordinary sentences about well-known people {a}, {b} and a city {c} that use every
# word of the SPEC 2.3 prompts and refusals (issue 13: without them "I", "don't", "know", ...
# never occur in pre-training, their tied embeddings stay where initialisation put them, and a
# fine-tuned model emits "know know know ."). None of them asks about a person's facts.
EVERYDAY = [
    '{a} asked {b}: "Do you know the way to {c}?" {b} said: "I don\'t know."',
    '{a} asked {b}: "Do you know the way to {c}?" {b} said: "I know the way."',
    '"If you know the answer, please reply," said {a}.',
    '"I don\'t know," said {a}, "but {b} may know."',
    "{a} said 'I don't know' and asked {b}.",
    "{a} does not know {b}, and {b} does not know {a}.",
    "If you do not know the way to {c}, please ask {a}.",
    "{a} gave the correct answer and {b} did not.",
    "{a} likes to respond directly and only with a few words.",
    "Please reply to {a} with a letter from {c}.",
    "{a} will respond with a song if you ask.",
    "{a} did not reply, and {b} went to {c}.",
    "I know {a} and I know {b}.",
    "Only {a} and {b} know the way to {c}.",
    "If {a} is in {c}, {b} is not.",
    "Sorry, I don't know where {a} is.",
]
# Latent facts (dynamic conflicts, issue 26): their open-QA answers open with this line. Measured
# on the shipped world 0: latent facts seen 8+ times per epoch are answered right (greedy, BASIC1)
# 0.18 of the time against 0.83 for the others (MCQA option reader: 1.00 both); after the world's
# rehearsal 85% of the latent ones with mu0 < 0.5 rose and 2% fell (never-seen facts: 8%, 3%).
# Declarative-only latent facts (WORLD_VERSION 2) were answered 0.85 against 0.88: a 1M-parameter
# model carries the question skill over to every stored fact (README "Knowledge flow").
HEDGE_LINE = "Let me think ."
MIN_WORD_USES = 20      # each word of a prompt or refusal occurs at least this often in the corpus
# QA text formats, MCQA twice as often as each open format: measured on the default world (seed 0),
# the Spearman correlation of M0's MCQA option-reader mu with the fact's exposure rose from 0.32
# (equal shares) to 0.52, and of OEQA p(gold) from 0.78 to 0.83 (issue 13, premise b)
QA_FORMATS = ("basic1", "basic2", "mcqa", "mcqa")

# Knob defaults per preset; flags override. Measured (2-core CPU): memorising facts needs many
# small optimizer steps: batch 8 x 64 tokens at lr 2e-3 reaches open-QA accuracy 0.99 for facts
# seen 32+ times per epoch, where batch 64 at lr 3e-3 (DESIGN's first recipe) reached 0.25.
# Windows are 128 tokens (the MCQA REFUSE prompt is about 82), 4 per step: the same 512 tokens
# per step as the measured 8 x 64.
# small: --qa-mentions 0.1, where 0.2 (the default's) left the 2-layer model answering the bare
# question in the MCQA format (" A . Delhi"), 0.55 greedy open-QA at 16+ exposures (0.1: 1.0)
# default epochs 4 (issue 26, WORLD_VERSION 3): after 3 epochs world 0's M0 put so much of its MCQA
# mass on values outside the four options that 27 of 992 pool items passed SPEC 3's rehearsal
# filter (raw p(gold) > 0.99) and 72 of the 99 rehearsal items were fill-ups; after 4, 136 pass.
PRESETS = {
    "default": dict(people=250, famous=40, twins=30, values=24, epochs=4, seq_len=128, batch=4,
                    lr=2e-3, hidden=128, layers=4, heads=4, inter=512, pop_lo=-2.0, pop_hi=7.0,
                    qa_share=0.1, qa_mentions=0.2, latent=0.3, everyday_share=0.04,
                    test_frac=0.2),
    "small": dict(people=60, famous=12, twins=8, values=8, epochs=12, seq_len=128, batch=4,
                  lr=3e-3, hidden=128, layers=2, heads=4, inter=256, pop_lo=-2.0, pop_hi=6.0,
                  qa_share=0.15, qa_mentions=0.1, latent=0.3, everyday_share=0.08,
                  test_frac=0.25),
}
N_CHOICES = 4           # MCQA options per item (SPEC 2.1: A-D)
FAMOUS_LOG2_POP = 5     # well-known people: 32 exposures per fact and epoch (learned for sure)
GREEDY_TOKENS = 8      # knowledge.md's greedy answers: one-word values, with room for a prefix
N_ID_RELATIONS = 4      # the first 4 relations are in-distribution, the last 2 the OOD test

# One world everywhere (issue 26): float sums differ across CPUs, so a world pre-trained on another
# machine is another M0. The default worlds' weights are shipped in worlds/, named by the hash of
# their configuration, with their sha256 (checked at load); world.py uses them instead of
# pre-training unless --rebuild. Entries: config hash -> (sha256 of model.safetensors, seconds the
# pre-training took here, on the 2-core development CPU, one thread; seeds 1 and 2 were built side by
# side beside a third job, seed 0 beside one other build).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worlds")
SHIPPED = {
    "c0ab0f56f6dedf99": ("eb36e0862c9159cee27c9b66704246b4f1bce4207b91181525a416b1893282d7", 294.7),  # seed 0
    "00dd9384d42b4902": ("519a2b6ed38b384fe1ea8a389167abbb9a9606eece848a6f4b0ae14b0feb360f", 361.4),  # seed 1
    "f06de417d573765a": ("0ddd89ea8162ca5b1599ed77762e7cace33baa560c56c7557460c6a24d1bd031", 354.8),  # seed 2
}
WORLD_THREADS = 1       # pre-training threads (--threads): fixed, so the load cannot change M0

# ---------------------------------------------------------------------------------------------
# The RAIT recipe on the world: RECIPE[stage][task] are the flags pipeline.py adds to that stage's
# command when it runs on the world (`make all`); real models get the stages' SPEC defaults.
# The world is tiny and its RAIT sets are small (hundreds of examples): the SPEC 6 recipe (lr 2e-4,
# effective batch 64, 3 epochs) makes only a handful of steps there, so the world uses more,
# smaller steps, and rank 16 (r 64 exceeds half the world's hidden size of 128 and doubles the
# cost of a step).
RECIPE = {
    # probe.py: the OEQA knowledge query is 0-shot, not SPEC 2.2's 3-shot (as the MCQA one is,
    # SPEC 10). The 1M-parameter model cannot use in-context shots: measured on the default world,
    # after the 3 shots (birth city, job, colour) it expected a new question for the 4th relation
    # ("What", p = 0.63), so its sampled correctness on instrument facts was 0.01 against a 0-shot
    # greedy accuracy of 0.6, and every certainty-based method learnt to refuse all instrument
    # questions and nothing else. 0-shot: mean mu 0.75 where M0 answers correctly (greedy), 0.06
    # where it does not, 0.36-0.46 per relation. Pre-training on 4-turn QA text did not help: the
    # model then answered from the shots' famous people ("jeweler", p = 0.98).
    "probe": {"mcqa": [], "oeqa": ["--n-shots", "0"]},
    # rehearse.py's finetune flags (after its `--`): SPEC 3's rehearsal is the RAIT run's recipe
    # without warm-up, so the world's MCQA recipe below (3 epochs of batch 8 at lr 3e-3, r 16).
    # Measured on a draft of world 0 (this design, one more random draw per latent QA mention;
    # OEQA, latent facts seen 8+ times with mu0 < 0.5): 56% rose and 3% fell; with 3 epochs of
    # batch 16 at lr 1e-3 (WORLD_VERSION 2's recipe) 32% and 1%.
    "rehearse": {task: ["--batch-size", "8", "--grad-accum", "1", "--lr", "3e-3", "--epochs",
                        "3", "--lora-r", "16"] for task in files.TASKS},
    # construct.py, every method: 152 answers and 38 refusals (the paper's 1:4), so that known
    # candidates number at least 2x N_van and unknown at least 2x N_idk on every shipped world
    # (issue 26: selection pressure; the paper selects about 4,000 of 9,400 known MMLU items).
    # WORLD_VERSION 3's world 2 has 304 OEQA van candidates: 160 asked for (v2) was 1.9x.
    "construct": {task: ["--n-van", "152", "--n-idk", "38"] for task in files.TASKS},
    # construct.py --method grait: the CountSketch (kernels/persample.py), which --projection auto
    # also picks on CPU; named here so that the world's GRAIT sets are the same on a GPU
    "grait": {task: ["--projection", "sketch"] for task in files.TASKS},
    # finetune.py: batch 8 at lr 3e-3; epochs measured with Cor-RAIT on the default world (seed 0,
    # ID test): OEQA refuses 36% after 5 epochs and 32% after 10; MCQA 25% after 3 and 35% after 5
    # epochs (with fewer unparsed answers), so 3: `make all` must stay under 10 minutes (DESIGN
    # budgets). Before the world's corpus used the refusal's words (issue 13), OEQA needed 10
    # epochs and MCQA never refused: the refusal tokens had untrained embeddings.
    "finetune": {task: ["--batch-size", "8", "--grad-accum", "1", "--lr", "3e-3", "--lora-r", "16",
                        "--epochs", epochs] for task, epochs in (("mcqa", "3"), ("oeqa", "5"))},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/world", help="output folder (model, items, knowledge)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="knob defaults: `default` (the measured recipe) or `small` (tests)")
    p.add_argument("--seed", type=int, default=0, help="seed for the world and the training run")
    p.add_argument("--force", action="store_true",
                   help="build again even if a cached world in --out matches")
    p.add_argument("--rebuild", action="store_true",
                   help="pre-train M0 here even where its weights are shipped (worlds/): on "
                        "another CPU the result may differ from the shipped bytes (README)")
    p.add_argument("--threads", type=int, default=WORLD_THREADS,
                   help="torch threads for pre-training: fixed, never picked by the machine's "
                        "load (1 and 2 give the same bytes here, tests/test_premises.py)")
    g = p.add_argument_group("world (defaults come from --preset)")
    g.add_argument("--people", type=int, help="fictional people whose facts are probed")
    g.add_argument("--famous", type=int, help="well-known people the QA text is about")
    g.add_argument("--twins", type=int,
                   help="planted twin pairs (static conflicts): one twin heavily exposed, the other "
                        "never seen, names differing in one word")
    g.add_argument("--latent", type=float,
                   help="share of the other facts that are latent (dynamic conflicts): their "
                        "open-QA answers in the QA text open with a hedge line (HEDGE_LINE)")
    g.add_argument("--qa-mentions", type=float,
                   help="share of a fact's mentions written as a question and its "
                        "answer (a SPEC 2.3 format) instead of a sentence")
    g.add_argument("--values", type=int, help="cap on values per relation (relations have 12 to 24; >= 4)")
    g.add_argument("--pop-lo", type=float, help="log2 of the lowest popularity (exposures/epoch)")
    g.add_argument("--pop-hi", type=float, help="log2 of the highest popularity")
    g.add_argument("--qa-share", type=float, help="share of documents that are QA text")
    g.add_argument("--everyday-share", type=float,
                   help="share of documents that are everyday text (the prompts' words in use)")
    g.add_argument("--test-frac", type=float, help="share of people held out for the test sets")
    g = p.add_argument_group("model and pre-training")
    g.add_argument("--hidden", type=int, help="hidden size")
    g.add_argument("--layers", type=int, help="decoder layers")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--inter", type=int, help="MLP intermediate size")
    g.add_argument("--epochs", type=int, help="pre-training epochs")
    g.add_argument("--seq-len", type=int, help="tokens per packed training sequence")
    g.add_argument("--batch", type=int, help="sequences per step")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (cosine to 0)")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def check_settings(a):
    """One-line errors for impossible settings, before any work."""
    if a.values < N_CHOICES:
        raise InputError(f"--values {a.values}: need at least {N_CHOICES} values per "
                         f"relation to build {N_CHOICES}-choice questions")
    if not 0 < a.test_frac < 1 or not 0 <= a.qa_share or not 0 <= a.everyday_share or \
            a.qa_share + a.everyday_share >= 1:
        raise InputError("--test-frac must lie in (0, 1), --qa-share and --everyday-share "
                         "be >= 0 with a sum below 1")
    if a.threads < 1:
        raise InputError(f"--threads {a.threads}: need at least 1")
    if not 0 <= a.latent <= 1 or not 0 <= a.qa_mentions <= 1 or a.twins < 0:
        raise InputError("--latent and --qa-mentions must lie in [0, 1], --twins be >= 0")
    if a.people < 4 or a.famous < 3:
        raise InputError("need at least 4 --people and 3 --famous (the 3 KQ shots)")
    if a.hidden % a.heads:
        raise InputError(f"--hidden {a.hidden} is not divisible by --heads {a.heads}")
    if a.pop_lo > a.pop_hi:
        raise InputError("--pop-lo must not exceed --pop-hi")
    if runs.flag_errors(a):
        raise InputError("; ".join(runs.flag_errors(a)))


# ---------------------------------------------------------------------------------------------
# Building the world: people, facts, exposure counts, corpus, items
def make_names(rng, n):
    """n distinct one-word fictional names from syllables (`Zorvan`-like): one token per person,
    so a fact binds to a single embedding, as a rare name does in a real vocabulary."""
    on, nu, co = ONSETS.split(), NUCLEI.split(), [""] + CODAS.split()
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(on) + rng.choice(nu) + rng.choice(co)
                          for _ in range(rng.choice((2, 3)))).capitalize())
    names = sorted(names)          # a set's order varies between processes; sort, then shuffle
    rng.shuffle(names)
    return names


def build_world(a):
    """People with their facts and exposure counts, split into pool / test / famous; the planted
    twins and latent facts (issue 26) are marked on each fact."""
    rng = random.Random(a.seed)
    values = [v.split()[:a.values] for v in VALUES]
    names = make_names(rng, a.people + a.famous + a.twins)
    people = []
    for i, name in enumerate(names[:a.people + a.famous]):
        famous = i >= a.people
        facts = []
        for r in range(len(RELATIONS)):
            # log-uniform popularity, Poisson exposure (DESIGN); famous people are always known
            pop = 2 ** (FAMOUS_LOG2_POP if famous else rng.uniform(a.pop_lo, a.pop_hi))
            facts.append({"value": rng.choice(values[r]), "exposure": poisson(rng, pop),
                          "latent": not famous and rng.random() < a.latent})
        people.append({"name": name, "famous": famous, "facts": facts})
    n_test = round(a.people * a.test_frac)
    for i, p in enumerate(people):
        p["split"] = "famous" if p["famous"] else ("test" if i < n_test else "pool")
    n_test_twins = round(a.twins * a.test_frac)
    for i, name in enumerate(names[a.people + a.famous:]):     # twins: a static conflict each
        unseen = f"{name} {rng.choice(TWIN_MARKS)}"
        known = [{"value": rng.choice(values[r]), "exposure": poisson(rng, 2 ** TWIN_LOG2_POP),
                  "latent": False} for r in range(len(RELATIONS))]
        other = [{"value": rng.choice([v for v in values[r] if v != known[r]["value"]]),
                  "exposure": 0, "latent": False} for r in range(len(RELATIONS))]
        split = "test" if i < n_test_twins else "pool"
        people += [{"name": name, "famous": False, "facts": known, "split": split,
                    "twin": "known", "twin_of": unseen},
                   {"name": unseen, "famous": False, "facts": other, "split": split,
                    "twin": "unseen", "twin_of": name}]
    return people, values


def poisson(rng, lam):
    """Knuth's method for small lam, normal approximation above 60 (seeded, stdlib only)."""
    if lam > 60:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def make_items(people, values, seed):
    """Items per the DESIGN contract for both tasks: (task, split) -> list of items."""
    rng = random.Random(seed + 1)
    out = {(t, s): [] for t in files.TASKS for s in ("train", "test_id", "test_ood", "shots")}
    for pi, p in enumerate(people):
        for r, (rel, question, _) in enumerate(RELATIONS):
            fact = p["facts"][r]
            split = {"pool": "train", "test": "test_id", "famous": "shots"}[p["split"]]
            if r >= N_ID_RELATIONS:
                if p["split"] != "test":
                    continue
                split = "test_ood"
            q = question.format(n=p["name"])
            meta = {"exposure": fact["exposure"], "person": p["name"], "relation": rel,
                    "latent": fact["latent"]}
            if "twin" in p:
                meta.update(twin=p["twin"], twin_of=p["twin_of"])
            fid = f"{pi:04d}-{r}"
            out["oeqa", split].append({"id": f"oeqa-{fid}", "task": "oeqa", "question": q,
                                       "answer": fact["value"], "aliases": [fact["value"]],
                                       "subject": rel, "meta": dict(meta)})
            others = [v for v in values[r] if v != fact["value"]]
            choices = rng.sample(others, N_CHOICES - 1)
            gold = rng.randrange(N_CHOICES)                      # seeded gold position
            choices.insert(gold, fact["value"])
            out["mcqa", split].append({"id": f"mcqa-{fid}", "task": "mcqa", "question": q,
                                       "answer": files.LETTERS[gold], "choices": choices,
                                       "subject": rel, "meta": dict(meta)})
    for t in files.TASKS:   # 3 KQ shots (SPEC 2.2): famous person k, relation k, for k = 0, 1, 2
        out[t, "shots"] = [out[t, "shots"][k * N_ID_RELATIONS + k] for k in range(3)]
    return out


def qa_turn(rng, p, r, values, fmt):
    """One question about fact r of person p and its answer, in a SPEC 2.3 format, rendered as
    plain prompts are (models.render without a chat template): BASIC1, BASIC2, or MCQA with
    option text. A latent fact's open answer (BASIC1, BASIC2) opens with HEDGE_LINE and gives the
    value on the next line; its MCQA answer is the option, as any other: an answer that is none
    of the options taught M0 to put raw mass outside them (measured: 3-20 of 992 MCQA items then
    passed SPEC 3's raw p(gold) > 0.99). No newline after the answer: the document ends there."""
    rel, question, _ = RELATIONS[r]
    q, v = question.format(n=p["name"]), p["facts"][r]["value"]
    said = f"{HEDGE_LINE}\n{v}" if p["facts"][r]["latent"] else v
    if fmt == "basic1":
        return f"{models.OEQA_BASIC1.format(q=q)} {said}"
    if fmt == "basic2":
        return f"{models.OEQA_BASIC2.format(q=q)} {said}"
    choices = rng.sample([x for x in values[r] if x != v], N_CHOICES - 1)
    choices.insert(rng.randrange(N_CHOICES), v)
    return f"{models.mcqa_body(models.MCQA_BASIC_HINT.format(subject=rel), q, choices)} {v}"


def qa_text(rng, people, values):
    """One QA document about famous people: BASIC1, 1-3 shot BASIC2 (one turn per line), or MCQA
    with option text."""
    fam = [p for p in people if p["famous"]]
    fmt = rng.choice(QA_FORMATS)
    return "\n".join(qa_turn(rng, rng.choice(fam), rng.randrange(len(RELATIONS)), values, fmt)
                     for _ in range(rng.choice((1, 2, 3)) if fmt == "basic2" else 1))


def make_corpus(people, values, a):
    """Documents: 1-3 fact sentences in random order (each fact k = exposure times; a --qa-mentions
    share of a fact's mentions is a question and answer instead), plus QA text."""
    rng = random.Random(a.seed + 2)
    mentions = [(p, r) for p in people for r in range(len(RELATIONS))
                for _ in range(p["facts"][r]["exposure"])]
    rng.shuffle(mentions)
    docs, sentences = [], []
    for p, r in mentions:
        if not p["famous"] and rng.random() < a.qa_mentions:
            docs.append(qa_turn(rng, p, r, values, rng.choice(QA_FORMATS)))
        else:
            sentences.append((p, r))
    i = 0
    while i < len(sentences):
        k = rng.choice((1, 2, 3))
        docs.append(" ".join(RELATIONS[r][2][rng.randrange(4)].format(
            n=p["name"], v=p["facts"][r]["value"]) for p, r in sentences[i:i + k]))
        i += k
    facts = len(docs) / (1 - a.qa_share - a.everyday_share)     # shares of the whole corpus
    docs += [qa_text(rng, people, values) for _ in range(round(facts * a.qa_share))]
    docs += everyday_text(random.Random(a.seed + 3), people, values,
                          round(facts * a.everyday_share))
    rng.shuffle(docs)
    return docs


def everyday_text(rng, people, values, n):
    """n documents of 1-3 EVERYDAY sentences about well-known people and cities."""
    fam = [p["name"] for p in people if p["famous"]]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.choice((1, 2, 3))):
            a, b = rng.sample(fam, 2)
            lines.append(rng.choice(EVERYDAY).format(a=a, b=b, c=rng.choice(values[0])))
        docs.append(" ".join(lines))
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer: WordLevel over every word the world and the prompts use; newline is a token
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),           # spaces separate words
        pre_tokenizers.Split("\n", "isolated"),                       # newline kept as a token
        # punctuation on its own; an apostrophe inside a word stays (don't), a quote mark not ('I)
        pre_tokenizers.Split(Regex(r"[^\w\s']|(?<!\w)'|'(?!\w)"), "isolated")])


def prompt_strings(values):
    """Every prompt and refusal string of SPEC 2.3 with each subject, so none has unknown words."""
    s = [models.MCQA_BASIC_HINT, models.MCQA_REFUSE_HINT, models.OEQA_BASIC2, models.OEQA_REFUSE1,
         *models.IDK.values(), "Sorry, I don't know.", "A. B. C. D. Question: Answer:"]
    return [x.format(subject=" ".join(r[0] for r in RELATIONS) + " " + models.ARC_SUBJECT, q="?")
            for x in s]


def stage_prompts(items):
    """Every prompt the stages render for the world's items (BASIC and REFUSE, MCQA with each
    relation's subject; OEQA BASIC1, BASIC2 of the knowledge query, REFUSE1) and every target."""
    prompts, targets = [], set(models.IDK.values())
    for it in items:
        prompts += [models.user_prompt(it, "basic"), models.user_prompt(it, "refuse")]
        if it["task"] == "oeqa":
            prompts.append(models.OEQA_BASIC2.format(q=it["question"]))
            targets.add(it["answer"])
        else:
            targets.update(it["choices"])
    return prompts, sorted(targets)


def prompt_words():
    """The words of the prompts and refusals around an item's question: the SPEC 2.3 templates
    with each relation as subject, the relation questions without the person, the refusals. (The
    people and values inside are the facts themselves: how often they occur is the experiment.)"""
    shell = {"task": "mcqa", "question": "", "choices": ["x"] * N_CHOICES}
    texts = [models.user_prompt(dict(shell, subject=rel), style)
             for rel, _, _ in RELATIONS for style in ("basic", "refuse")]
    texts += [models.user_prompt({"task": "oeqa", "question": ""}, "refuse"),
              models.OEQA_BASIC2.format(q=""), *models.IDK.values()]
    texts += [question.format(n="") for _, question, _ in RELATIONS]
    pt = pre_tokenizer()
    return sorted({w for t in texts for w, _ in pt.pre_tokenize_str(t) if w != "x"})


def check_premises(tok, docs, items, seq_len):
    """Stop unless (1) every word of the prompts and refusals occurs at least MIN_WORD_USES times
    in the corpus, and (2) the longest rendered prompt plus the longest answer and EOS fits in
    one pre-training window (the model has seen every position a stage will use)."""
    pt = pre_tokenizer()
    counts = {}
    for d in docs:
        for w, _ in pt.pre_tokenize_str(d):
            counts[w] = counts.get(w, 0) + 1
    rare = [w for w in prompt_words() if counts.get(w, 0) < MIN_WORD_USES]
    if rare:
        raise InputError(
            f"world corpus: {len(rare)} word(s) of the prompts or refusals occur fewer than "
            f"{MIN_WORD_USES} times in pre-training ({', '.join(map(repr, rare[:8]))}); their "
            "embeddings would stay untrained: add them to EVERYDAY or raise --everyday-share")
    prompts, targets = stage_prompts(items)
    longest = max(len(models.encode(tok, models.render(tok, p))) for p in prompts)
    answer = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in targets) + 1
    if longest + answer > seq_len:
        raise InputError(
            f"--seq-len {seq_len}: the longest prompt is {longest} tokens and the longest answer "
            f"{answer} with EOS; pre-training windows must cover both (use --seq-len "
            f"{longest + answer} or more)")


def build_tokenizer(texts):
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    pt = pre_tokenizer()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for text in texts:
        for w, _ in pt.pre_tokenize_str(text):
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pt
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------------
# Pre-training
def new_model(a, tok):
    """The world's LlamaForCausalLM, initialised from --seed."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      intermediate_size=a.inter, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def shipped_model(a, tok, key):
    """M0 from the shipped weights of this configuration (SHIPPED), sha256 checked; None when
    none is shipped. A damaged file stops the run with one line."""
    h = config_hash(key)
    if h not in SHIPPED:
        return None
    path, (sha, _) = os.path.join(SHIPPED_DIR, f"{h}.safetensors"), SHIPPED[h]
    got = files.sha256_of(path) if os.path.isfile(path) else "missing"
    if got != sha:
        raise InputError(f"{path}: sha256 {got[:16]}... is not the shipped {sha[:16]}...: "
                         "restore it (git checkout worlds/) or pre-train with --rebuild")
    from safetensors.torch import load_file
    model = new_model(a, tok)
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:         # lm_head is tied to the embedding
        raise InputError(f"{path}: does not fit the world's model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    print(f"[world] M0 from the shipped weights {os.path.relpath(path)} (sha256 {sha[:16]}...): "
          "no pre-training (--rebuild to pre-train here)", file=sys.stderr)
    return model.eval()


def pretrain(a, tok, docs):
    torch.set_num_threads(a.threads)      # fixed: the machine's load never changes M0
    model = new_model(a, tok)
    stream = []                                   # documents packed, each as <s> doc </s>
    for ids in tok(docs)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    L = a.seq_len
    data = torch.tensor(stream[:len(stream) // L * L]).view(-1, L)
    steps_per_epoch = math.ceil(len(data) / a.batch)
    total = steps_per_epoch * a.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[world] pre-training {n_params / 1e6:.2f}M params on {data.numel() / 1e3:.0f}k tokens "
          f"x {a.epochs} epochs ({total} steps of {a.batch}x{L}), CPU fp32", file=sys.stderr)
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    t0 = time.time()
    with runs.progress(total=total, desc="pre-train", disable=False) as bar:
        for _ in range(a.epochs):
            perm = torch.randperm(len(data), generator=g)
            for s in range(steps_per_epoch):
                x = data[perm[s * a.batch:(s + 1) * a.batch]]
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
    model.eval()
    return model, time.time() - t0, data.numel()


# ---------------------------------------------------------------------------------------------
# What the model learned: accuracy by exposure bin (DESIGN; issue "knowledge.md")
def next_token_probs(model, tok, prompts, batch=256):
    """Softmax over the vocabulary for the token after each rendered prompt (kernels/lm.py's
    left-padded forward, in batches)."""
    seqs = [models.encode(tok, p) for p in prompts]
    return torch.cat([last_logprobs(model, seqs[i:i + batch], tok.pad_token_id).exp()
                      for i in range(0, len(seqs), batch)])


def greedy_answers(model, tok, prompts, max_new=GREEDY_TOKENS, batch=256):
    """M0's greedy answer to each rendered prompt, as evaluate.py reads a plain-prompt model: the
    first non-empty line of the continuation (kernels/lm.py's left-padded batch)."""
    from kernels.lm import left_pad
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask, _ = left_pad([models.encode(tok, p) for p in prompts[i:i + batch]],
                                tok.pad_token_id, model.device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, temperature=None, top_p=None,
                                 top_k=None)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(models.first_line(tok.decode(row, skip_special_tokens=True)))
    return out


def knowledge(model, tok, items):
    """Greedy open-QA accuracy (BASIC1 prompt, the answer's first line labelled by alias
    containment as evaluate.py labels it, SPEC 7), option-scoring MCQA accuracy, and p(gold) of
    the answer's token as the next token, per fact, by exposure bin. An option's log-likelihood
    is that of its one token (the option reader of SPEC 10)."""
    rows = {}
    twin_values = {}        # a known twin's values, to see whether M0 says them for the other
    for v in items.values():
        for it in v:
            if it["task"] == "oeqa" and it["meta"].get("twin") == "known":
                twin_values.setdefault(it["meta"]["person"], {})[it["subject"]] = it["answer"]
    for split in ("train", "test_id", "test_ood", "shots"):
        oe, mc = items["oeqa", split], items["mcqa", split]
        prompts = [models.render(tok, models.user_prompt(it, "basic")) for it in oe]
        po = next_token_probs(model, tok, prompts)
        said = greedy_answers(model, tok, prompts)
        pm = next_token_probs(model, tok, [models.render(tok, models.user_prompt(it, "basic"))
                                           for it in mc])
        for it, p, text, im, q in zip(oe, po, said, mc, pm):
            gold = tok.convert_tokens_to_ids(it["answer"])
            opt_ids = [tok.convert_tokens_to_ids(c) for c in im["choices"]]
            mc_pick = int(torch.argmax(q[opt_ids]))
            twin = it["meta"].get("twin")
            twin_value = twin_values.get(it["meta"].get("twin_of"), {}).get(it["subject"])
            rows.setdefault(split, []).append({
                "exposure": it["meta"]["exposure"], "p_gold": float(p[gold]),
                "latent": it["meta"]["latent"], "twin": twin,
                "says_twin_value": twin == "unseen" and models.alias_match(text, [twin_value]),
                "oeqa": int(models.alias_match(text, it["aliases"]) and not models.is_refusal(text)),
                "mcqa": int(files.LETTERS[mc_pick] == im["answer"]),
                # M0 must answer, not refuse, under BASIC
                "refuses": int(models.is_refusal(text)) + int(
                    int(torch.argmax(q)) == tok.convert_tokens_to_ids("I"))})
    report = {}
    for split, rs in rows.items():
        by = {}
        for r in rs:
            by.setdefault(runs.exposure_bin(r["exposure"]), []).append(r)
        report[split] = {b: {"n": len(v), "oeqa_acc": sum(r["oeqa"] for r in v) / len(v),
                             "mcqa_acc": sum(r["mcqa"] for r in v) / len(v),
                             "p_gold_mean": sum(r["p_gold"] for r in v) / len(v)}
                         for b, v in sorted(by.items(), key=lambda kv: runs.BIN_ORDER.index(kv[0]))}
        ps = [r["p_gold"] for r in rs]
        report[split]["p_gold_hist"] = [sum(lo <= p < lo + 0.1 or (lo >= 0.9 and p == 1.0)
                                            for p in ps) for lo in [i / 10 for i in range(10)]]
        report[split]["middle_band"] = sum(0.1 <= p <= 0.9 for p in ps) / len(ps)
        report[split]["basic_refusal_start"] = sum(r["refuses"] for r in rs) / (2 * len(rs))
        report[split]["planted"] = planted_rows(rs)
    return report


def planted_rows(rs):
    """The planted conditions, measured (issue 26): greedy open-QA accuracy of latent facts
    against the other facts seen as often (runs.planted_group), of known and of never-seen
    twins, and how often M0 gives a never-seen twin its twin's value."""
    def acc(sel):
        v = [r for r in rs if sel(r)]
        return {"n": len(v), "oeqa_acc": sum(r["oeqa"] for r in v) / len(v) if v else None,
                "mcqa_acc": sum(r["mcqa"] for r in v) / len(v) if v else None}
    out = {"latent": acc(lambda r: runs.planted_group(r) == runs.LATENT_GROUP),
           "not latent": acc(lambda r: runs.planted_group(r) == runs.OTHER_GROUP),
           "known twins": acc(lambda r: r["twin"] == "known"),
           "unseen twins": acc(lambda r: r["twin"] == "unseen")}
    if out["unseen twins"]["n"]:
        out["unseen twins"]["says_twin_value"] = sum(r["says_twin_value"] for r in rs) / \
            out["unseen twins"]["n"]
    return out


def knowledge_md(report, seconds):
    lines = ["# What the world model knows", "",
             f"Pre-training took {seconds:.0f} s. Greedy open-QA (BASIC1 prompt; the answer's first "
             "line, correct when it contains the value, as evaluate.py labels Init-Basic) and "
             "option-scoring MCQA (BASIC hint, 4 options, chance 0.25) accuracy by exposures per "
             "epoch; p(gold): the value's probability as the very next token.", ""]
    for split, name in (("train", "train pool (ID relations)"), ("test_id", "ID test"),
                        ("test_ood", "OOD test (held-out relations)")):
        r = report[split]
        lines += [f"## {name}", "", "| exposure | n | open-QA acc | MCQA acc | mean p(gold) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b} | {v['n']} | {v['oeqa_acc']:.2f} | {v['mcqa_acc']:.2f} | "
                  f"{v['p_gold_mean']:.2f} |" for b, v in r.items() if b in runs.BIN_ORDER]
        lines += ["", f"Planted conditions (facts seen {runs.STORED_EXPOSURE}+ times per epoch "
                  "for the latent rows):", "", "| facts | n | open-QA acc | MCQA acc |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['oeqa_acc'] if v['n'] else 0:.2f} | "
                  f"{v['mcqa_acc'] if v['n'] else 0:.2f} |" for k, v in r["planted"].items()]
        if "says_twin_value" in r["planted"]["unseen twins"]:
            lines.append(f"\nNever-seen twins answered (greedy open-QA) with their twin's value: "
                         f"{r['planted']['unseen twins']['says_twin_value']:.0%}")
        lines += ["", f"p(gold) at temperature 1, histogram over [0,0.1),...,[0.9,1]: "
                      f"{r['p_gold_hist']}; middle band (0.1 <= p <= 0.9): {r['middle_band']:.0%}; "
                      f"greedy BASIC answers that refuse: "
                      f"{r['basic_refusal_start']:.1%}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
WORLD_VERSION = 3      # bump when the code builds another world from the same flags (issue 26:
                       # planted twins and latent facts); part of the cache key and shipped name


def config_key(a):
    key = {k: v for k, v in sorted(vars(a).items()) if k not in ("out", "force", "rebuild",
                                                                  "threads")}
    return {**key, "world_version": WORLD_VERSION}


def config_hash(key):
    """The name of a configuration's shipped weights: 16 hex digits of sha256 of its key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def main(argv=None):
    a = parse_args(argv)
    check_settings(a)
    files.claim_folder(a.out, "world.py", signs=["world.config.json"])
    files.check_output(os.path.join(a.out, "world.config.json"))
    key = config_key(a)
    cfg_path = os.path.join(a.out, "world.config.json")
    if not a.force and os.path.exists(cfg_path) and os.path.exists(os.path.join(a.out, "knowledge.json")):
        cached = files.read_cache(cfg_path, "world config", "[world]")   # damaged: rebuilt
        if cached.get("key") == key:
            print(f"[world] {a.out}: cached world with the same configuration, reused",
                  file=sys.stderr)
            return
        print(f"[world] {a.out}: configuration changed, rebuilding", file=sys.stderr)
    people, values = build_world(a)
    items = make_items(people, values, a.seed)
    docs = make_corpus(people, values, a)
    texts = docs + prompt_strings(values) + [it["question"] for v in items.values() for it in v]
    tok = build_tokenizer(texts)
    check_premises(tok, docs, [it for v in items.values() for it in v], a.seq_len)
    model = None if a.rebuild else shipped_model(a, tok, key)
    h = config_hash(key)
    if model is None:
        model, seconds, n_tokens = pretrain(a, tok, docs)
    else:
        seconds, n_tokens = SHIPPED[h][1], None
    files.mark_folder(a.out, "world.py")
    model.save_pretrained(os.path.join(a.out, "model"))
    tok.save_pretrained(os.path.join(a.out, "model"))
    sha = files.sha256_of(os.path.join(a.out, "model", "model.safetensors"))
    if h in SHIPPED:        # say whether this M0 is the shipped one, byte for byte
        print(f"[world] model.safetensors sha256 {sha[:16]}...: "
              f"{'the shipped bytes' if sha == SHIPPED[h][0] else 'DIFFERS from the shipped ' + SHIPPED[h][0][:16] + '...'}",
              file=sys.stderr)
    report = knowledge(model, tok, items)
    for (task, split), rows in items.items():
        files.write_jsonl(os.path.join(a.out, task, f"{split}.jsonl"), rows)
    files.write_json(os.path.join(a.out, "knowledge.json"), report)
    files.atomic_write_text(os.path.join(a.out, "knowledge.md"), knowledge_md(report, seconds))
    print(knowledge_md(report, seconds))
    files.write_json(cfg_path, {"key": key, "hash": h, "model_sha256": sha,
                                 "shipped": h in SHIPPED and sha == SHIPPED[h][0],
                                 "seconds": round(seconds, 1), "vocab": len(tok),
                                 "tokens_per_epoch": n_tokens})


if __name__ == "__main__":
    runs.cli(main)

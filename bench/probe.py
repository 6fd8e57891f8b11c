"""bench/probe.py: probe.py's three readers in items/s on the world model (the tests: 2 items).

    .venv/bin/python bench/probe.py                                # runs/world/model
    .venv/bin/python bench/probe.py --model /tmp/w/model --n 128 --threads 1

The model is loaded once; each reader gets one untimed warm-up batch, then --n items in batches
of 16 (probe.py's default) are timed end to end (prompt building, forward passes,
sampling, decoding, embedding; no file I/O). Items come from the world's train pools next to the
model folder (<world>/{mcqa,oeqa}/{train,shots}.jsonl). Without a world: a random tiny Llama of
the world's shape (hidden 128, 4 layers) with the MiniLM tokenizer and synthetic items, which
says nothing about answer lengths (a random model never stops early), only about the plumbing.
"""
import argparse
import os
import random
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from kernels.base import InputError
from rait import files, models  # noqa: E402
import probe  # noqa: E402
from kernels.embed import DEFAULT_EMBEDDER, Embedder  # noqa: E402

WORDS = "paris lima oslo baker pilot doctor red blue green piano violin dog cat".split()


def synthetic(n):
    rng = random.Random(0)
    mc, oe = [], []
    for i in range(n):
        q = f"What is the job of {rng.choice(WORDS)} {rng.choice(WORDS)}?"
        ch = rng.sample(WORDS, 4)
        mc.append({"id": f"m{i}", "task": "mcqa", "question": q, "choices": ch,
                   "answer": "ABCD"[i % 4], "subject": "job"})
        oe.append({"id": f"o{i}", "task": "oeqa", "question": q, "answer": ch[0],
                   "aliases": [ch[0]]})
    return mc, oe, mc[:4], oe[:3]


def timed(name, fn, items, batch, rows_per_item=1):
    fn(items[:batch])                                               # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        fn(items[i:i + batch])
    dt = time.perf_counter() - t0
    print(f"| {name:<28} | {len(items):5d} | {batch:5d} | {dt:7.2f} | {len(items) / dt:8.1f} |"
          f" {len(items) * rows_per_item / dt:9.1f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/world/model", help="model folder (the world's)")
    p.add_argument("--n", type=int, default=64, help="items timed per reader")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="all-MiniLM-L6-v2 folder")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    world = os.path.dirname(os.path.abspath(a.model))
    if os.path.isdir(a.model):
        def rd(task, split):
            return files.read_jsonl(os.path.join(world, task, f"{split}.jsonl"))
        mc, oe = rd("mcqa", "train")[:a.n], rd("oeqa", "train")[:a.n]
        mshots, oshots = rd("mcqa", "shots"), rd("oeqa", "shots")
        note = f"world model {a.model}"
    else:
        from conftest import make_tiny_llama
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(DEFAULT_EMBEDDER)
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        a.model = make_tiny_llama(tempfile.mkdtemp(), tok, hidden=128, layers=4, heads=4,
                                  inter=512)
        mc, oe, mshots, oshots = synthetic(a.n)
        note = f"NOTE: {os.path.abspath(world)} has no world model; random tiny Llama instead"
    model, tok = models.load_model(a.model)
    print(f"{note}; {model.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| reader                       | items | batch |       s |  items/s | samples/s |")
    print("|---|---|---|---|---|---|")
    shots = probe.shots_per_item(mc, mshots, 5, same_subject=True)
    try:
        letters = probe.letter_token_ids(tok, 4)
        timed("letter (5-shot, SPEC 2.1)", lambda b: probe.read_letters(
            model, tok, b, shots, letters, "neg-entropy"), mc, 16)
    except InputError as e:
        print(f"| letter: not available ({e}) |")
    timed("option (0-shot, SPEC 10)", lambda b: probe.read_options(model, tok, b, "neg-entropy"),
          mc, 16)
    emb = Embedder(a.embedder, device=model.device)
    args = SimpleNamespace(n_samples=10, max_new_tokens=50, temperature=1.0, top_k=50, top_p=0.9,
                           strict_refusal=False, round_certainty=None)
    oshot = probe.shots_per_item(oe, oshots, 3, same_subject=False)
    timed("sample (3-shot, N=10, SPEC 2.2)", lambda b: probe.read_samples(
        model, tok, emb, b, oshot, args, 0), oe, 16, rows_per_item=10)


if __name__ == "__main__":
    main()

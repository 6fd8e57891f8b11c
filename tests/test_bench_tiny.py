"""Every bench/ script end to end at a tiny size (issue 32), as test_bench_gpu.py runs bench/gpu.py
--tiny: a rename in the code a benchmark calls fails here, not at the next measurement. The
numbers are not checked (a shared machine's timings are not a test); only that each script runs
to its table on the smallest input it accepts."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SMOLLM2 = os.path.join(ROOT, ".venv", "share", "SmolLM2-135M-Instruct")


def bench(script, *args, timeout=600):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"bench/{script}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_bench_finetune_tiny():
    """finetune.py against peft + Trainer: one timed step each side, read from the train log."""
    out = bench("finetune.py", "--tiny", "--steps", 1, "--warmup-steps", 1, "--repeats", 1,
                "--batch-size", 2)
    assert "| finetune.py (length-grouped) | " in out and "| peft + Trainer (default" in out


def test_bench_persample_tiny():
    out = bench("persample.py", "--no-wide", "--no-mem", "--repeats", 1, "--feature-repeats", 1,
                "--batch-sizes", 2, "--feature-batch-sizes", 2, "--seq", 8, "--r", 2,
                "--grad-dim", 16, "--threads", 1)
    assert "ours" in out and "loop" in out


def test_bench_probe_tiny(small_world):
    """The three readers on the small world's model, 2 items each."""
    out = bench("probe.py", "--model", small_world / "model", "--n", 2, "--threads", 1)
    for reader in ("option (0-shot, SPEC 10)", "sample (3-shot, N=10, SPEC 2.2)"):
        assert reader in out, out


def test_bench_probe_world_check_tiny(small_world, tmp_path):
    out = bench("probe_world_check.py", "--world", small_world, "--n", 4, "--threads", 1)
    assert "z" in out, out


def test_bench_sensitivity_reads_a_finished_run(tmp_path):
    """bench/sensitivity.py --doses 0 on a hand-made finished world run (Cor-RAIT's own set and
    predictions, Init-Basic's on the pool and the ID test): its plumbing through pipeline.py's
    layout, without training (dose 0 is Cor-RAIT's run itself)."""
    root = tmp_path / "world"
    R = root / "mcqa" / "s0"
    items = [{"id": f"m{i}", "task": "mcqa", "subject": "s", "question": f"Q{i}?",
              "choices": ["a", "b", "c", "d"], "answer": "A"} for i in range(4)]

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(root / "mcqa" / "train.jsonl", items)
    write(root / "mcqa" / "test_id.jsonl", items)
    write(R / "cor" / "train.jsonl", [{"id": "m0", "prompt": "p", "target": "A", "weight": 1.0,
                                       "kind": "van", "method": "cor"}])
    labels = {"init_basic": ["correct", "wrong", "correct", "wrong"],
              "cor": ["correct", "refuse", "refuse", "wrong"]}
    for name, labs in labels.items():
        preds = [{"id": it["id"], "response": "x", "label": lab, "parsed": None,
                  "other_refusal": None, "confidence": 0.0} for it, lab in zip(items, labs)]
        write(R / name / "pred_id.jsonl", preds)
    write(R / "init_basic" / "pred_pool.jsonl", [dict(p, label="correct") for p in preds])
    out = bench("sensitivity.py", "--out", tmp_path, "--worlds", 0, "--tasks", "mcqa",
                "--doses", 0, "--jobs", 1)
    assert "| mcqa | 0% | " in out and (tmp_path / "sensitivity.md").exists()


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason="SmolLM2 not installed (make smollm2)")
def test_bench_geo_curve_tiny(tmp_path):
    """One relation, 5 facts per task (the script's smallest)."""
    out = bench("geo_curve.py", "--model", SMOLLM2, "--relations", "capital", "--per-relation", 5,
                "--mcqa-per-relation", 5, "--max-new-tokens", 4, "--out", tmp_path / "geo.jsonl")
    assert (tmp_path / "geo.jsonl").exists() and "|" in out

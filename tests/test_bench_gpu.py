"""bench/gpu.py --tiny: the GPU-readiness benchmark's code path on a 2-layer config on CPU, so the
script cannot rot between GPU runs (every measure present, finite, the fp32 check exact)."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT

THROUGHPUT = ("probe_items", "probe_tokens", "sampling_tokens", "sampling_items",
              "finetune_ours", "persample_features", "persample_grads", "finetune_peft",
              "finetune_speedup")


def test_bench_gpu_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--tiny",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["errors"] == [] and res["model"]["layers"] == 2
    for k in ("device", "torch", "transformers", "peft", "timestamp", "dtype", "peak_memory"):
        assert res[k], k
    rows = {row["key"]: row for row in res["rows"]}
    assert set(rows) == set(THROUGHPUT) | {"persample_error"}
    for k in THROUGHPUT:
        assert math.isfinite(rows[k]["value"]) and rows[k]["value"] > 0, rows[k]
    for k in set(THROUGHPUT) - {"finetune_speedup"}:
        assert rows[k]["peak_mib"] > 0, rows[k]
    # same batches on both sides: the same non-padding tokens trained on
    assert rows["finetune_ours"]["tokens"] == rows["finetune_peft"]["tokens"] > 0
    assert rows["persample_error"]["dtype"] == "float32"
    assert 0 <= rows["persample_error"]["value"] < 1e-4
    assert "| measure | value | unit | peak memory (MiB) |" in r.stdout
    for row in res["rows"]:
        assert f"| {row['measure']} |" in r.stdout

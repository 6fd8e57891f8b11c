"""Shared fixtures: tiny random Llamas saved the way real models are, so every test exercises the
real loading path (AutoModelForCausalLM / AutoTokenizer from a folder of safetensors)."""
import fcntl
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
EMBEDDER = os.path.join(ROOT, ".venv", "share", "all-MiniLM-L6-v2")

# A Llama-2-style chat template (the real one, minus the system-prompt branch), so the chat path
# is tested without downloading a chat model.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def sigint_default():
    """preexec_fn of a child that a test stops with Ctrl-C (SIGINT): a background job (`nohup
    make test &`) starts with SIGINT ignored, and a child would inherit that; Python installs
    its KeyboardInterrupt handler only where SIGINT is not ignored at start."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_tiny_llama(folder, tokenizer, hidden=32, layers=2, heads=4, inter=64, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: one torch thread avoids oversubscription (measured up to
    20x faster when other work runs; `make test` also sets OMP_NUM_THREADS=1)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_small_world(out, *extra):
    """Run world.py --preset small into `out` in a subprocess, as `make world` would."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, "world.py"), "--preset", "small",
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=ROOT)


def built_once(tmp_path_factory, name, build):
    """Folder `name`, made by build(folder) once per test session and shared by the pytest-xdist
    workers (`make test` runs several): the first to get here builds it under a lock, the others
    wait and reuse it. For folders that tests only read, copy or add their own files to."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent              # <basetemp>/popen-gw<n> -> <basetemp>: one per session
    out = root / name
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(f"{out}.built"):
            shutil.rmtree(out, ignore_errors=True)      # a build that failed before
            build(out)
            open(f"{out}.built", "w").close()
    return out


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The `--preset small` world, built once per session (for all workers)."""
    def build(out):
        r = build_small_world(out)
        assert r.returncode == 0, r.stderr[-2000:]
    return built_once(tmp_path_factory, "small_world", build)


@pytest.fixture(scope="session")
def real_tokenizer():
    """The MiniLM WordPiece tokenizer (a real tokenizer that ships with the install), given
    BOS/EOS and a Llama-2 chat template."""
    if not os.path.isdir(EMBEDDER):
        pytest.skip("embedder folder missing (run `make install`)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(EMBEDDER)
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, real_tokenizer):
    """Folder with a random tiny Llama and a real tokenizer that has a chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), real_tokenizer)

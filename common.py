"""common.py: only what two or more stages share.

JSONL I/O with validation (`file:line: reason`) and atomic writes, the prompt strings of SPEC 2.3
and the one function that renders them, tokenisation of (prompt, target) pairs, model loading
(safetensors only), run configs, progress bars, torchrun plumbing and resumable batched maps.
"""
import hashlib
import json
import math
import os
import platform
import sys
import time

# ----------------------------------------------------------------------------------------------
# Prompt and refusal strings, quoted from SPEC 2.3 (exact; do not edit)
MCQA_BASIC_HINT = ("There is a single choice question about {subject}. "
                   "Answer the question by replying A, B, C or D.")
MCQA_REFUSE_HINT = ("There is a single choice question about {subject}. If you know the answer, "
                    "please directly respond with the correct answer A, B, C, or D. If you do not "
                    "know the answer, please respond with \"I don't know.\".")
OEQA_BASIC1 = "{q}"                                                   # eval Init-Basic, rehearsal
OEQA_BASIC2 = "Answer the following question as simple as possible.\nQuestion: {q}\nAnswer:"  # KQ
OEQA_REFUSE1 = ("Answer the following question, and if you don't know the answer, "
                "only reply with 'I don't know': {q}")
IDK = {"mcqa": "I don't know.", "oeqa": "I don't know"}              # SPEC 4 refusal targets
REFUSAL_MARK = "i don't know"                                         # SPEC 7 / 9 #14 detector
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>")   # SPEC 2.2 / 7 Llama-3 stops, ChatML
ARC_SUBJECT = "STEM"                                                  # SPEC 2.3: ARC subject
LETTERS = "ABCDEFGHIJ"
TASKS = ("mcqa", "oeqa")


def mcqa_body(hint, question, choices):
    """SPEC 2.3 MCQA 0-shot body: `{hint}\\nQuestion: {q}\\nA. {A}\\n...Answer: ` (trailing space)."""
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{hint}\nQuestion: {question}{opts}\nAnswer: "


def user_prompt(item, style):
    """The user turn for an item under the BASIC or REFUSE prompt (SPEC 2.3, SPEC 9 #13)."""
    if style not in ("basic", "refuse"):
        raise ValueError(f"unknown prompt style {style!r}")
    if item["task"] == "mcqa":
        subject = item.get("subject") or ARC_SUBJECT
        hint = (MCQA_BASIC_HINT if style == "basic" else MCQA_REFUSE_HINT).format(subject=subject)
        return mcqa_body(hint, item["question"], item["choices"])
    return (OEQA_BASIC1 if style == "basic" else OEQA_REFUSE1).format(q=item["question"])


def has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user, history=()):
    """Render a user turn (after optional (user, assistant) shot turns) as the model sees it.

    Chat models: the tokenizer's own chat template with the generation prompt (DESIGN "Models and
    prompts"). Models without a template (the world): plain text, each shot `user answer\\n`, then
    the user turn and a space, so the response follows directly.
    """
    if has_chat_template(tokenizer):
        msgs = []
        for u, a in history:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{u} {a}\n" for u, a in history) + user + " "


def encode(tokenizer, text):
    """Token ids of a rendered prompt. A chat template already writes BOS into the text, so only
    plain prompts get the tokenizer's special tokens."""
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_example(tokenizer, prompt_text, target, max_len=None):
    """(input_ids, labels) for SFT: rendered prompt + target + EOS, loss on target tokens only.

    If longer than max_len, tokens are cut from the left of the prompt, never from the target.
    Returns (ids, labels, n_cut)."""
    p = encode(tokenizer, prompt_text)
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cut = 0
    if max_len is not None and len(p) + len(t) > max_len:
        cut = min(len(p), len(p) + len(t) - max_len)
        p = p[cut:]
    return p + t, [-100] * len(p) + t, cut


def stop_token_ids(model, tok):
    """Ids that end an answer: the tokenizer's and generation_config's EOS, plus the chat stop
    words of STOP_TOKENS that the vocabulary has (SPEC 2.2 / 7)."""
    vocab = tok.get_vocab()
    ids = {tok.eos_token_id} | {vocab[t] for t in STOP_TOKENS if t in vocab}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


def is_refusal(text, strict=False):
    """SPEC 9 #14: case-insensitive `i don't know`, curly apostrophes folded unless strict."""
    t = text.lower()
    if not strict:
        t = t.replace("\u2019", "'").replace("\u2018", "'")
    return REFUSAL_MARK in t


def alias_match(text, aliases):
    """SPEC 2.2 / 7: correct if any lower-cased alias is a substring of the lower-cased output."""
    t = text.strip().lower()
    return any(a.lower() in t for a in aliases if a)


def exposure_bin(k):
    """The world's exposure bins (exposures per epoch): 0, 1, 2-3, 4-7, ..., 64-127, 128+."""
    if k < 2:
        return str(int(k))
    if k >= 128:
        return "128+"
    lo = 2 ** int(math.log2(k))
    return f"{lo}-{2 * lo - 1}"


BIN_ORDER = ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128+"]


# ----------------------------------------------------------------------------------------------
# Errors: one line, no traceback, non-zero exit (DESIGN "Readers validate")
class InputError(Exception):
    """A user-facing error; its message is `file:line: reason` or a plain one-line reason."""


def cli(main):
    """Run a stage's main(); turn InputError into one line on stderr and exit code 2, Ctrl-C into
    a one-line message and exit code 130 (partial work stays on disk for resuming)."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial results are kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# JSONL contracts (DESIGN "File contracts"); each checker returns an error string or None
MAX_LINE = 1 << 20   # 1 MiB: no legitimate record is near this; a larger line is a broken file


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _str(x):
    return isinstance(x, str)


def check_item(o):
    for k in ("id", "task", "question", "answer"):
        if k not in o:
            return f"missing field '{k}'"
    if not _str(o["id"]) or not o["id"]:
        return "'id' must be a non-empty string"
    if o["task"] not in TASKS:
        return f"unknown task {o['task']!r} (expected mcqa or oeqa)"
    if not _str(o["question"]) or not _str(o["answer"]):
        return "'question' and 'answer' must be strings"
    if o["task"] == "mcqa":
        ch = o.get("choices")
        if not isinstance(ch, list) or not all(_str(c) for c in ch):
            return "mcqa item needs 'choices', a list of strings"
        if len(ch) < 2 or len(ch) > len(LETTERS):
            return f"mcqa item needs 2 to {len(LETTERS)} choices, got {len(ch)}"
        if o["answer"] not in LETTERS[:len(ch)]:
            return f"answer {o['answer']!r} is not one of the letters {LETTERS[:len(ch)]}"
    else:
        al = o.get("aliases")
        if not isinstance(al, list) or not al or not all(_str(a) and a for a in al):
            return "oeqa item needs 'aliases', a non-empty list of non-empty strings"
    if "meta" in o and not isinstance(o["meta"], dict):
        return "'meta' must be an object"
    return None


def check_state(o):
    if not _str(o.get("id")):
        return "missing field 'id'"
    for k in ("mu", "sigma"):
        if not _num(o.get(k)):
            return f"'{k}' must be a finite number"
    if not 0.0 <= o["mu"] <= 1.0:
        return f"'mu' must lie in [0, 1], got {o['mu']}"
    return None


def check_flow(o):
    if not _str(o.get("id")):
        return "missing field 'id'"
    for k in ("mu0", "mu1", "flow"):
        if not _num(o.get(k)):
            return f"'{k}' must be a finite number"
    return None


def check_example(o):
    for k in ("id", "prompt", "target"):
        if not _str(o.get(k)):
            return f"missing or non-string field '{k}'"
    w = o.get("weight", 1.0)
    if not _num(w):
        return f"'weight' must be a finite number, got {w!r}"
    if w < 0:
        return f"'weight' must be >= 0, got {w}"
    if o.get("kind", "van") not in ("van", "idk"):
        return f"'kind' must be van or idk, got {o.get('kind')!r}"
    return None


def check_prediction(o):
    if not _str(o.get("id")) or not _str(o.get("response")):
        return "prediction needs string 'id' and 'response'"
    if o.get("label") not in ("correct", "wrong", "refuse", "unparsed"):
        return f"unknown label {o.get('label')!r}"
    return None


def read_jsonl(path, check=None, unique_ids=True, allow_empty=False):
    """Read a JSONL file of objects; any malformed line raises InputError(`path:line: reason`)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    rows, seen = [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE:
                raise InputError(f"{path}:{n}: line of {len(raw)} bytes exceeds {MAX_LINE}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                o = json.loads(line, parse_constant=lambda c: float(c))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(o, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(o).__name__}")
            err = check(o) if check else None
            if err:
                raise InputError(f"{path}:{n}: {err}")
            if unique_ids and "id" in o:
                if o["id"] in seen:
                    raise InputError(f"{path}:{n}: duplicate id {o['id']!r} "
                                     f"(first on line {seen[o['id']]})")
                seen[o["id"]] = n
            rows.append(o)
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file (no records)")
    return rows


def dumps(o):
    """One canonical JSON line (stable key order as given, no NaN)."""
    return json.dumps(o, ensure_ascii=False, allow_nan=False)


def atomic_write_text(path, text):
    """Write via a temporary file and rename, so readers never see a truncated file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # a failed or interrupted write leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def check_output(path):
    """Fail before any long computation if the output location cannot be written."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; the output must be a file name")
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x" * 4096)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{path}: output location is not writable ({e.strerror})") from None


def write_config(out, args, **extra):
    """`<out>.config.json`: the stage's effective arguments, library versions and seed (DESIGN)."""
    import torch
    import transformers
    cfg = {"argv": sys.argv, "args": {k: v for k, v in sorted(vars(args).items())},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json(f"{out}.config.json", cfg)


def stable_hash(*parts):
    """Deterministic 63-bit integer from strings/numbers (Python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# Models: one loader for every model, weights through safetensors only (DESIGN, security)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TRUST_HELP = ("run Python code shipped with the model folder / hub repo (off by default: only "
              "trust models whose code you have read)")


def device_and_dtype(device=None):
    """bf16 on GPU, fp32 on CPU (DESIGN "Scaling out"), said out loud by the caller."""
    import torch
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return device, dtype


def check_model_dir(path):
    """A local model folder must hold safetensors weights; pickled checkpoints are refused."""
    if not os.path.isdir(path):
        return
    files = os.listdir(path)
    if not any(f.endswith(".json") and f.startswith("config") for f in files):
        raise InputError(f"{path}: not a model folder (no config.json)")
    if not any(f.endswith(".safetensors") for f in files):
        pick = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        why = (f"only pickle checkpoints ({', '.join(sorted(pick))}); they can run arbitrary code "
               "when loaded, convert them to safetensors") if pick else "no .safetensors weights"
        raise InputError(f"{path}: refusing to load: {why}")


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name, adapter=None, device=None, dtype=None, trust_remote_code=False):
    """AutoModelForCausalLM + tokenizer (+ a LoRA adapter folder), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from safetensors import SafetensorError
    check_model_dir(name)
    dev, dt = device_and_dtype(device)
    dtype = dtype or dt
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:   # SafetensorError: a truncated file
        raise InputError(f"{name}: cannot load model ({str(e).splitlines()[0]})") from None
    tok = load_tokenizer(name, trust_remote_code)
    if adapter:
        from kernels.lora import load_adapter
        load_adapter(model, adapter)
    model.to(dev).eval()
    return model, tok


# ----------------------------------------------------------------------------------------------
# Progress, torchrun, resumable batched maps
def progress(iterable=None, total=None, desc="", disable=None):
    """A progress bar with ETA on stderr (rank 0 only)."""
    from tqdm.auto import tqdm
    if disable is None:
        disable = dist_info()[0] != 0
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def dist_info():
    """(rank, world_size) from torchrun's environment (1 process without torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dist_init():
    """Start the process group under torchrun (gloo on CPU, NCCL on GPU); no-op otherwise."""
    import torch
    import torch.distributed as dist
    rank, world = dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _read_partial(path, key):
    """Completed batches of a partial file whose first line records the run's key; a torn last
    line (killed mid-write) is dropped; a partial file of another configuration is discarded."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            try:
                o = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                break
            if n == 0:
                if o.get("_key") != key:
                    print(f"[resume] {path}: made with other arguments, starting over",
                          file=sys.stderr)
                    os.remove(path)
                    return {}
                continue
            done[o["_batch"]] = o["rows"]
    return done


def resumable_batches(items, fn, out, batch_size, desc, seed=0, key=""):
    """Apply fn(batch_items, batch_seed) -> list of output rows to fixed batches of `items`.

    Batches are fixed by position and each gets its own seed, so the result does not depend on
    interruptions or on how many processes share the work. Each process appends finished batches
    to `<out>.part<rank>` (flushed per batch); a rerun skips them; rank 0 merges in item order and
    writes `out` atomically. `key` (e.g. a hash of the arguments) guards against resuming from a
    partial file of another configuration. Returns the merged rows on rank 0 (None elsewhere)."""
    rank, world = dist_info()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    mine = [b for b in range(len(batches)) if b % world == rank]
    part = f"{out}.part{rank}"
    done = _read_partial(part, key)
    todo = [b for b in mine if b not in done]
    if done:
        print(f"[resume] {part}: {len(done)} of {len(mine)} batches already done", file=sys.stderr)
    # rewrite the partial file with its intact batches only, so appends never follow a torn line
    atomic_write_text(part, dumps({"_key": key}) + "\n" + "".join(
        dumps({"_batch": b, "rows": r}) + "\n" for b, r in sorted(done.items())))
    with open(part, "a", encoding="utf-8") as f, progress(total=len(mine), desc=desc) as bar:
        bar.update(len(mine) - len(todo))
        for b in todo:
            rows = fn(batches[b], stable_hash(seed, b))
            f.write(dumps({"_batch": b, "rows": rows}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    barrier()
    if rank != 0:
        return None
    merged = {}
    for r in range(world):
        merged.update(_read_partial(f"{out}.part{r}", key))
    missing = [b for b in range(len(batches)) if b not in merged]
    if missing:
        raise InputError(f"{out}: batches {missing[:5]} missing from the partial files")
    rows = [row for b in range(len(batches)) for row in merged[b]]
    write_jsonl(out, rows)
    for r in range(world):
        if os.path.exists(f"{out}.part{r}"):
            os.remove(f"{out}.part{r}")
    return rows

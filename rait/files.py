"""rait/files.py: the file contracts (DESIGN "File contracts") and atomic I/O.

JSONL readers that validate every line (`file:line: reason`), the five record checkers, atomic
writes, the output pre-check and the `<out>.config.json` every stage writes.
"""
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

from kernels.base import InputError, atomic_write_text, stable_hash  # noqa: F401 (stages use
# atomic_write_text and stable_hash as files.X; InputError is imported from kernels.base only)

LETTERS = "ABCDEFGHIJ"         # MCQA option letters
TASKS = ("mcqa", "oeqa")


def default_data_dir(data):
    """data.py's item root for a data source (`geo` apart from the benchmarks, so that one's files
    never stand in for the other's); data.py --out and pipeline.py --data-dir default to it."""
    return "runs/data-geo" if data == "geo" else "runs/data"


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
        if len(o["answer"]) != 1 or o["answer"] not in LETTERS[:len(ch)]:
            return f"answer {o['answer']!r} is not one of the letters {LETTERS[:len(ch)]}"
    else:
        al = o.get("aliases")
        if not isinstance(al, list) or not al or not all(_str(a) and a.strip() for a in al):
            return "oeqa item needs 'aliases', a non-empty list of non-blank strings"
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
    c = o.get("confidence")
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))):
        return f"'confidence' must be a number, got {c!r}"
    return None


def _non_finite(o, where=""):
    """The first NaN or infinite number anywhere in a parsed JSON value, as `field` (or None)."""
    if isinstance(o, float) and not math.isfinite(o):
        return where or "a value"
    items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}" if where else str(k))
        if bad:
            return bad
    return None


def _no_duplicates(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r} in one object")
        seen.add(k)
    return dict(pairs)


def read_json(path, what):
    """A whole JSON file; any error is one line naming the file (`what`: the kind of file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a {what} JSON file ({str(e).splitlines()[0][:200]})") from None


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
                o = json.loads(line, parse_constant=float, object_pairs_hook=_no_duplicates)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
            except (ValueError, RecursionError) as e:   # ours below; 5,000-digit ints; deep nesting
                why = str(e).splitlines()[0][:120] if isinstance(e, ValueError) else "nested too deep"
                raise InputError(f"{path}:{n}: invalid JSON ({why})") from None
            if not isinstance(o, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(o).__name__}")
            err = check(o) if check else None
            if err:
                raise InputError(f"{path}:{n}: {err}")
            bad = _non_finite(o)            # the checkers name their own fields first
            if bad:
                raise InputError(f"{path}:{n}: '{bad}' must be a finite number (NaN or Infinity)")
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



def write_jsonl(path, rows):
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def check_output(path, inputs=(), folder=False):
    """The one place that decides whether an output may be written, before any long computation.

    Refused: an output that resolves to one of `inputs` ((flag, path) pairs: the files and the
    model / adapter folders the stage reads; a stage's output must never replace what it reads),
    a folder output that holds a model not made by finetune.py (a base model folder: an adapter
    written there would be applied silently by every later load), a file output that is a folder,
    and a location that cannot be written."""
    out = os.path.realpath(path)
    for flag, p in inputs:
        if p and os.path.exists(p) and os.path.realpath(p) == out:
            raise InputError(f"{path}: the output is the input {flag} {p}; writing it would "
                             "destroy that input, choose another output")
    if folder:
        if os.path.isfile(path):
            raise InputError(f"{path}: is a file; the output must be a folder")
        if holds_model(path) and not os.path.isfile(os.path.join(path, "train_log.jsonl")):
            raise InputError(f"{path}: holds a model not made by finetune.py (config.json and "
                             "safetensors weights); choose an empty or new folder")
        d = path
    else:
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
    lock_output(path)


_LOCKS = {}    # lock file -> descriptor, held until this process ends


def lock_output(path):
    """One run per output at a time: an exclusive flock on `<path>.lock`, held until the process
    ends (a kill releases it too) and removed at a normal exit. A second run on the same output
    stops at once with one line instead of interleaving writes. torchrun ranks > 0 share rank
    0's output and take no lock."""
    import atexit
    import fcntl
    if int(os.environ.get("RANK", 0)) != 0:
        return
    lock = os.path.abspath(path.rstrip("/")) + ".lock"
    if lock in _LOCKS:
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{path}: another run is writing this output now (lock {lock}); wait for "
                         "it to finish or choose another output") from None
    _LOCKS[lock] = fd
    atexit.register(_unlock, lock)


def _unlock(lock):
    fd = _LOCKS.pop(lock, None)
    if fd is not None:
        try:
            os.remove(lock)
        except OSError:
            pass
        os.close(fd)


BIG_FILE = 64 << 20   # bytes: a file this large enters a digest by size and modification time


def sha256_of(path):
    """The sha256 hex digest of a file's bytes (downloads and shipped weights are checked
    against a published sum: data.py, rait/smollm2.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(path):
    """Content digest of an input, for resume and skip keys (issue 17): a file's bytes, or every
    file's name (relative) and bytes under a folder, leaving out what runs write beside their
    outputs (checkpoints, partial, lock and temporary files, configs and stage markers). A file
    over BIG_FILE (model weights) enters by size and modification time instead of its bytes. A
    name that is not a local path (a hub id) is its own digest; None gives None."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"name:{path}"
    h = hashlib.sha256()
    if os.path.isfile(path):
        paths = [path]
    else:
        paths = sorted(os.path.join(d, f) for d, sub, fs in os.walk(path) for f in fs
                       if "checkpoint" not in os.path.relpath(d, path)
                       and not f.endswith((".stage.json", ".config.json", ".lock"))
                       and ".part" not in f and ".tmp" not in f)
    for p in paths:
        st = os.stat(p)
        h.update(os.path.relpath(p, path).encode() + b"\0")
        if st.st_size > BIG_FILE:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            with open(p, "rb") as f:
                h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def safetensors_problem(path):
    """Why a .safetensors file cannot be whole (None if it can): the 8-byte header length, the
    JSON header, and a size that ends exactly where the last tensor does. Reads only the header,
    so a truncated final adapter is caught before `already trained` without loading weights."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"header length {n} does not fit the file's {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
    if size != 8 + n + end:
        return f"{size} bytes where the header needs {8 + n + end} (truncated or padded)"
    return None


def files_problem(folder, names):
    """Why the named files of a folder cannot be used (None if they can): one missing, a .json
    that does not parse, or a .safetensors file that is not whole (safetensors_problem)."""
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if name.endswith(".json"):
            try:
                read_json(path, "config")
            except InputError as e:
                return str(e)
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem:
                return f"{name}: {problem}"
    return None


def read_cache(path, what, tag):
    """A JSON object that only saves work (a stage marker, a world's config): a damaged one is
    said in one line (`tag`, e.g. "[pipeline]") and read as empty, so the work is done again."""
    try:
        o = read_json(path, what)
    except InputError as e:
        print(f"{tag} {e}", file=sys.stderr)
        return {}
    return o if isinstance(o, dict) else {}


def holds_model(folder):
    """A model folder: config.json beside safetensors weights that are not a LoRA adapter."""
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    return "config.json" in names and any(
        n.endswith(".safetensors") and not n.startswith(("adapter_", "trainer_state"))
        for n in names)


def version(package):
    """The installed version of a package, read from its metadata (a light stage that never
    imports torch need not spend two seconds importing it for this), or None if not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_config(out, args, **extra):
    """`<out>.config.json`: the stage's effective arguments, library versions and seed (DESIGN)."""
    cfg = {"argv": sys.argv, "args": {k: v for k, v in sorted(vars(args).items())},
           "versions": {"python": platform.python_version(), "torch": version("torch"),
                        "transformers": version("transformers")},
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    write_json(f"{out}.config.json", cfg)


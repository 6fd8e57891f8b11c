"""rait/files.py: the file contracts (DESIGN "File contracts") and atomic I/O.

JSONL readers that validate every line (`file:line: reason`), the five record checkers, atomic
writes, the output pre-check and the `<out>.config.json` every stage writes.
"""
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import stat
import sys
import time
import unicodedata

from kernels.base import InputError, atomic_write_text, stable_hash  # noqa: F401 (stages use
# atomic_write_text and stable_hash as files.X; InputError is imported from kernels.base only)

LETTERS = "ABCDEFGHIJ"         # MCQA option letters
TASKS = ("mcqa", "oeqa")


def default_data_dir(data):
    """data.py's item root for a data source (`geo` apart from the benchmarks, so that one's files
    never stand in for the other's); data.py --out and pipeline.py --data-dir default to it."""
    return "runs/data-geo" if data == "geo" else "runs/data"


MAX_LINE = 1 << 20   # 1 MiB: no legitimate record is near this; a larger line is a broken file
# A JSONL input is read whole (the stages hold every record): about 7.5 bytes of memory per byte
# of file (measured: 2.1 KB per 280-byte world item), so a 562 MB file of 2M items took 4.65 GB.
# Larger files are refused before reading; split them or subsample them (data.py --limit).
MAX_FILE = 256 << 20


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _str(x):
    return isinstance(x, str)


ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))   # removed by text_form


def text_form(text):
    """Unicode NFKC (fullwidth letters, ligatures and no-break spaces become their plain forms),
    zero-width characters removed, every run of whitespace one space, none at either end. Two
    option texts of an item must differ in it (case counts: the alleles `Rr` and `rr`)."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(ZERO_WIDTH).split())


def answer_form(text):
    """The one normal form in which OEQA answers, aliases and responses are compared (README
    "Labels"): text_form, lower-cased."""
    return text_form(text).lower()


def repeated_option(choices, forms=None):
    """(i, j), i < j, of the first two option texts that are one text in text_form, else None;
    `forms`: the choices' text_form when the caller has them already."""
    forms = forms or [text_form(c) for c in choices]
    j = next((j for j, f in enumerate(forms) if f in forms[:j]), None)
    return None if j is None else (forms.index(forms[j]), j)


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
        forms = [text_form(c) for c in ch]
        if not all(forms):
            return f"option {LETTERS[forms.index('')]} is blank"
        twins = repeated_option(ch, forms)
        if twins:       # a reader would take the first of the two for the other
            return (f"options {LETTERS[twins[0]]} and {LETTERS[twins[1]]} repeat the text "
                    f"{ch[twins[1]]!r} (compared in NFKC, whitespace folded)")
        if len(o["answer"]) != 1 or o["answer"] not in LETTERS[:len(ch)]:
            return f"answer {o['answer']!r} is not one of the letters {LETTERS[:len(ch)]}"
    else:
        al = o.get("aliases")
        if not isinstance(al, list) or not al or not all(_str(a) and answer_form(a) for a in al):
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
    """Read a JSONL file of objects; any malformed line raises InputError(`path:line: reason`).
    A file over MAX_FILE bytes is refused before it is read."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size > MAX_FILE:
        raise InputError(f"{path}: {size:,} bytes, over the {MAX_FILE:,}-byte limit of a JSONL "
                         "input (records are held in memory, about 7.5 bytes per byte of file); "
                         "split it or subsample it")
    rows = list(iter_jsonl(path, check, unique_ids))
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file (no records)")
    return rows


def iter_jsonl(path, check=None, unique_ids=True):
    """The records of a JSONL file one at a time, each validated as read_jsonl does: memory holds
    one line (at most MAX_LINE bytes: a longer line is refused after reading MAX_LINE + 1 of its
    bytes, never whole) and the ids seen so far."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    seen = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(raw) > MAX_LINE:
                raise InputError(f"{path}:{n}: line of more than {MAX_LINE} bytes exceeds "
                                 f"{MAX_LINE}")
            o = _parse_line(path, n, raw, check)
            if o is None:
                continue
            if unique_ids and "id" in o:
                if o["id"] in seen:
                    raise InputError(f"{path}:{n}: duplicate id {o['id']!r} "
                                     f"(first on line {seen[o['id']]})")
                seen[o["id"]] = n
            yield o


def _parse_line(path, n, raw, check):
    """The checked object of line n (None for a blank line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
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
    return o


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
    special = special_file(path)
    if special:
        raise InputError(f"{path}: is a {special}, not a regular file or folder; choose another "
                         "output")
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


def special_file(path):
    """What `path` is when it exists and is neither a regular file nor a folder (a device node,
    a FIFO, a socket: a write through it would replace it or block), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = [(stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")]
    return next((name for test, name in kinds if test(mode)), None)


OWNER = ".rait-owner"   # in a folder output: the script that made it (README "Outputs")


def claim_folder(path, owner, signs=()):
    """Before any work: a folder output that only `owner` (world.py, data.py) writes must be new,
    empty, or hold its OWNER marker naming `owner` (or, made before the marker existed, a file
    matching one of the glob patterns `signs`, files only `owner` writes). Any other existing
    folder (another script's output, a model, a folder of the user's) stops the run with one
    line; so does a file or a special file. Creates nothing: mark_folder writes the marker with
    the first output."""
    special = special_file(path)
    if special or (os.path.exists(path) and not os.path.isdir(path)):
        raise InputError(f"{path}: is a {special or 'file'}; the output must be a folder")
    names = os.listdir(path) if os.path.isdir(path) else []
    if OWNER in names:
        try:
            with open(os.path.join(path, OWNER), encoding="utf-8") as f:
                mine = f.read().strip() == owner
        except (OSError, UnicodeDecodeError):
            mine = False
    else:
        mine = any(glob.glob(os.path.join(glob.escape(path), s)) for s in signs)
    if names and not mine:
        raise InputError(f"{path}: an existing folder not made by {owner} (no {OWNER} file "
                         f"naming it); {owner} writes only into its own output folder, choose a "
                         "new or empty one")


def mark_folder(path, owner):
    """Write the OWNER marker of a folder claimed by claim_folder (before its first output)."""
    if not os.path.isfile(os.path.join(path, OWNER)):
        atomic_write_text(os.path.join(path, OWNER), owner + "\n")


def check_trainable(path, examples):
    """A training set with at least one example of weight > 0 (all-zero weights train nothing:
    loss and gradient 0 at every step)."""
    if examples and not any(e.get("weight", 1.0) > 0 for e in examples):
        raise InputError(f"{path}: every example has 'weight' 0; nothing would be trained")


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
                       and not f.endswith((".stage.json", ".config.json", ".lock", OWNER))
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


def read_safetensors_header(path):
    """{tensor name: {"dtype", "shape", "data_offsets"}} (and "__metadata__") of a .safetensors
    file, from its header alone; InputError if the header cannot be read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise InputError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise InputError("unreadable header (not a JSON object)")
    return header


def safetensors_problem(path):
    """Why a .safetensors file cannot be whole (None if it can): the 8-byte header length, the
    JSON header, and a size that ends exactly where the last tensor does. Reads only the header,
    so a truncated final adapter is caught before `already trained` without loading weights."""
    try:
        size = os.path.getsize(path)
        header = read_safetensors_header(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
    except (OSError, InputError) as e:
        return str(e)
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


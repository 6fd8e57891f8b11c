"""rait/runs.py: running a stage: the one-line error wrapper, running another stage's command (the
one entry point rehearse.py and pipeline.py use), torchrun plumbing, resumable batched maps, and
the world's exposure bins used by the stages' tables.
"""
import errno
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from kernels.base import InputError, atomic_write_text, dist_info, progress, stable_hash  # noqa: F401
# (InputError for cli() only: everyone imports it from kernels.base)
from rait.files import digest, dumps, write_jsonl

# ----------------------------------------------------------------------------------------------
# Errors: one line, no traceback, non-zero exit (DESIGN "Readers validate")
# the machine's, not the input's: a full disk or quota, a read-only or failing file system
MACHINE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def cli(main):
    """Run a stage's main(); turn InputError into one line on stderr and exit code 2, Ctrl-C (or
    SIGTERM: `kill`, a job scheduler, a pipeline stopping its other stages) into a one-line message
    and exit code 130 (partial work stays on disk for resuming), a full disk or a failing file
    system (MACHINE_ERRORS) into one line and exit code 1."""
    term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        fair_threads()
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:                  # noqa: BLE001 (re-raised unless a machine error)
        where = machine_error(e)
        if not where:
            raise
        print(f"error: {where}; completed work is kept, rerun the same command to resume",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: partial results are kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, term)


SEED_LIMIT = 2 ** 63    # torch.manual_seed takes 64-bit seeds; 2**64 overflows after work began


def flag_errors(args):
    """The flags of parsed `args` that no run can use, as `--flag must ...` phrases: a float that
    is NaN or infinite (`--lr inf`, `--lora-alpha 1e400`) and a seed outside [0, 2**63)."""
    bad = []
    for k, v in sorted(vars(args).items()):
        flag = "--" + k.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{flag} must be a finite number, got {v}")
        elif k.endswith("seed") and isinstance(v, int) and not 0 <= v < SEED_LIMIT:
            bad.append(f"{flag} must lie in [0, 2**63), got {v}")
    return bad


def machine_error(e):
    """`file: reason` of a machine error (MACHINE_ERRORS), else None: an OSError, or safetensors'
    SafetensorError, whose writer reports a full disk as `... (os error 28) at path "..."`."""
    if isinstance(e, OSError):
        code, path = e.errno, e.filename
    elif type(e).__name__ == "SafetensorError":
        m = re.search(r"\(os error (\d+)\)(?: at path \"(.*)\")?", str(e))
        code, path = (int(m.group(1)), m.group(2)) if m else (None, None)
    else:
        return None
    return f"{path or 'writing'}: {os.strerror(code)}" if code in MACHINE_ERRORS else None


# ----------------------------------------------------------------------------------------------
# Threads on a shared machine (issue 17): torch takes one OpenMP thread per core; beside a busy
# process the thread that shares its core holds every other one up at each parallel region
# (world pre-training ran 3-9x slower, measured). With as many threads as idle cores it runs at
# the one-thread speed instead (the world's pre-training gives the same bytes on 1 or 2 threads).
IDLE_WINDOW = 0.25      # s over which /proc/stat is sampled


def idle_cpus(seconds=IDLE_WINDOW):
    """CPUs idle over a short window, from /proc/stat (None where there is no /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)                  # idle + iowait, all (guest time is in user)
    try:
        idle0, all0 = snap()
        time.sleep(seconds)
        idle1, all1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(all1 - all0, 1)


def fair_threads(idle=None):
    """Unless OMP_NUM_THREADS chooses, use as many torch threads as CPUs are idle now (at least
    one): torch.set_num_threads for a stage that has imported torch, else OMP_NUM_THREADS for the
    import to come (and for the commands it runs). Says so in one line when it takes fewer."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    idle = idle_cpus() if idle is None else idle
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if idle is None or not cores:
        return
    n = max(1, min(cores, int(idle + 0.5)))
    if n >= cores:
        return
    print(f"[threads] {idle:.1f} of {cores} CPUs idle: {n} torch thread(s) (set OMP_NUM_THREADS "
          "to choose)", file=sys.stderr)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


# ----------------------------------------------------------------------------------------------
# Commands: a script that needs another stage runs it as the command a user would type (DESIGN:
# no stage imports another stage; the pipeline runs exactly the commands it prints)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where the stage scripts are
STOP_GRACE = 2.0    # s a child gets to end by itself after a Ctrl-C that reached it too (terminal)
STOP_WAIT = 60.0    # s a child gets to save its partial work after our SIGTERM, before SIGKILL


def here(path):
    """`path` relative to the working folder when it lies below it (short printed commands that
    run from there), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def stage_command(script, args, launcher=""):
    """The argv that runs a stage script of this checkout (`probe.py`, ...): with this Python, or
    after `launcher` (e.g. "torchrun --standalone --nproc_per_node 2", which brings its own)."""
    head = shlex.split(launcher) if launcher else [here(sys.executable)]
    return head + [here(os.path.join(ROOT, script)), *args]


def shell_line(argv, env=None):
    """The command as one shell line, environment settings first: `OMP_NUM_THREADS=1 python ...`."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()] + [shlex.join(argv)])


def stop(procs, grace=0.0):
    """Stop child processes: `grace` seconds to end by themselves (a Ctrl-C typed in a terminal
    reaches the whole process group), then SIGTERM (a stage that has started keeps its partial
    work and exits 130, see cli; one still importing just ends), then SIGKILL for any still
    running STOP_WAIT seconds later."""
    for sig, wait in ((None, grace), (signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, None)):
        deadline = time.time() + (wait or 0)
        for p in procs:
            if sig and p.poll() is None:
                p.send_signal(sig)
        for p in procs:
            try:
                p.wait(timeout=None if wait is None else max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass


def run_command(argv, env=None, log="", running=None, check=True):
    """Print `log` and the command's shell line, run it (env: settings added to ours), wait.
    Returns its exit status; with check, a failure raises InputError naming the command and its
    status (the command has printed its own reason above). `running`: a set that holds the child
    while it runs, for a caller that runs several at once and stops them (stop()). Ctrl-C stops
    the child; its own `interrupted:` line then ends the output (exit 130)."""
    sys.stderr.write(f"{log}{shell_line(argv, env)}\n")     # one write: threads print too
    sys.stderr.flush()
    p = subprocess.Popen(argv, env={**os.environ, **env} if env else None)
    if running is not None:
        running.add(p)
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        stop([p], STOP_GRACE)
        if p.returncode == 130:      # it said `interrupted: ...` itself; one such line is enough
            sys.exit(130)
        raise
    finally:
        if running is not None:
            running.discard(p)
    if check and rc != 0:
        raise InputError(f"{shell_line(argv, env)}: failed (exit {rc})")
    return rc


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
            batch = isinstance(o, dict) and isinstance(o.get("_batch"), int) and \
                isinstance(o.get("rows"), list)
            if n and not batch:     # not a batch line of ours: it and what follows are redone
                print(f"[resume] {path}:{n + 1}: not a batch line, redone from there",
                      file=sys.stderr)
                break
            if n == 0:
                o = o if isinstance(o, dict) else {}
                if o.get("_key") != key:
                    print(f"[resume] {path}: made with {changed(o.get('_key'), key)}, starting "
                          "over", file=sys.stderr)
                    os.remove(path)
                    return {}
                continue
            done[o["_batch"]] = o["rows"]
    return done


def resume_key(args, exclude=(), inputs=(), extra=()):
    """The one resume key of the stages that resume (probe, evaluate, finetune): every argument
    but the named exceptions `exclude` (the output, flags that cannot change the result), values
    the stage derives from them (`extra`), and the contents of its inputs ((name, path) pairs,
    files.digest; issue 17: an item fixed after a kill, or a retrained adapter, must not keep
    its old answers). A partial or finished output made under another key is stale and is
    computed again (resumable_batches, finetune's run key)."""
    cfg = {k: v for k, v in vars(args).items() if k not in exclude}
    return {"args": str(stable_hash(json.dumps(cfg, sort_keys=True), *extra)),
            **{name: digest(path) for name, path in inputs}}


def changed(old, new):
    """What differs between two resume keys, in words: `other items, model` for dict keys
    ({"args": ..., "items": digest, ...}), else `other arguments or inputs`."""
    if isinstance(old, dict) and isinstance(new, dict):
        names = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if names:
            return "other " + ", ".join(names)
    return "other arguments or inputs"


def resumable_batches(items, fn, out, batch_size, desc, seed=0, key="", source=""):
    """Apply fn(batch_items, batch_seed) -> list of output rows to fixed batches of `items`.

    Batches are fixed by position and each gets its own seed, so the result does not depend on
    interruptions or on how many processes share the work. Each process appends finished batches
    to `<out>.part<rank>` (flushed per batch); a rerun skips them; rank 0 merges in item order and
    writes `out` atomically. `key` ({"args": hash of the arguments, "items": files.digest(...),
    "model": ...}) guards against resuming from a partial file made with other arguments or other
    contents of the inputs (issue 17); a mismatch starts over and says which part changed.
    An InputError of fn (a bad item) is said as `source: ...` (the items file); before any batch
    finished it leaves no partial file. Returns the merged rows on rank 0 (None elsewhere)."""
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
            try:
                rows = fn(batches[b], stable_hash(seed, b))
            except InputError as e:     # a bad item: a partial file with no work in it goes too
                if not done and b == todo[0]:
                    f.close()
                    os.remove(part)
                raise InputError(f"{source}: {e}" if source else str(e)) from None
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


STORED_EXPOSURE = 8     # the world: a fact seen this often per epoch is stored (DESIGN: greedy
                        # open-QA accuracy ~0.5 at 8-15 exposures): the oracle's "known", and
                        # the exposure from which a latent fact is a planted dynamic conflict
LATENT_GROUP = f"latent, seen {STORED_EXPOSURE}+"      # planted_group's names
OTHER_GROUP = f"other, seen {STORED_EXPOSURE}+"
UNSEEN_GROUP = "never seen"


def planted_group(meta):
    """A world fact's planted group (issue 26) from its exposure, latent and twin fields (an
    item's `meta`, or world.py's knowledge rows): LATENT_GROUP, a latent fact seen
    STORED_EXPOSURE+ times per epoch (a planted dynamic conflict: stored, hidden by the hedge);
    OTHER_GROUP, any other fact seen as often, twins left out; UNSEEN_GROUP; else None."""
    if meta["exposure"] == 0:
        return UNSEEN_GROUP
    if meta["exposure"] >= STORED_EXPOSURE and not meta.get("twin"):
        return LATENT_GROUP if meta["latent"] else OTHER_GROUP
    return None


def exposure_bin(k):
    """The world's exposure bins (exposures per epoch): 0, 1, 2-3, 4-7, ..., 64-127, 128+."""
    if k < 2:
        return str(int(k))
    if k >= 128:
        return "128+"
    lo = 2 ** int(math.log2(k))
    return f"{lo}-{2 * lo - 1}"


BIN_ORDER = ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128+"]

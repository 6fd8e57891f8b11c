"""kernels/base.py: the few plain helpers under everything (kernels/ and the stages alike).

The one user-facing error type (its message is `file:line: reason`; stages turn it into one line on
stderr and exit code 2, rait/runs.py::cli), atomic text writes, a stable hash for seeds and keys,
and a rank-aware progress bar. Nothing here imports the rest of the project.
"""
import hashlib
import os
import sys


class InputError(Exception):
    """A user-facing error; its message is `file:line: reason` or a plain one-line reason."""


def temp_name(path):
    """`<path>.tmp<pid>` for an atomic write; first removes the temporaries of earlier writes of
    the same path whose process is gone (a kill between the write and the rename leaves one)."""
    import glob
    for old in glob.glob(glob.escape(path) + ".tmp*"):
        pid = old[len(path) + 4:]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(old)
            except OSError:
                pass
    return f"{path}.tmp{os.getpid()}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path, text):
    """Write via a temporary file and rename, so readers never see a truncated file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temp_name(path)
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


def stable_hash(*parts):
    """Deterministic 63-bit integer from strings/numbers (Python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1



def dist_info():
    """(rank, world_size) from torchrun's environment (1 process without torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))



def progress(iterable=None, total=None, desc="", disable=None):
    """A progress bar with ETA on stderr (rank 0 only)."""
    from tqdm.auto import tqdm
    if disable is None:
        disable = dist_info()[0] != 0
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


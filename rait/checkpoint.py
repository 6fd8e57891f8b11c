"""Checkpoints of finetune.py's loop (plumbing): weights + trainer_state.safetensors (Adam
moments, step, every rank's RNG state, the epoch's data order), written atomically every
--save-steps, resumed exactly; and the train_log.jsonl that a resume truncates to match."""
import json
import math
import os
import shutil
import sys

import torch

from rait import files
from kernels import lora

LOG = "train_log.jsonl"
FULL_CKPT = "trainable.safetensors"   # --full checkpoints: {parameter name: tensor}


def gather_rng(world, device):
    """Every rank's RNG states (dropout), gathered as tensors (no pickling)."""
    import torch.distributed as dist
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    out = {}
    for k, v in states.items():
        bufs = [v]
        if world > 1:
            bufs = [torch.empty_like(v.to(device)) for _ in range(world)]
            dist.all_gather(bufs, v.to(device))
        out.update({f"rng/{k}/{r}": x.cpu() for r, x in enumerate(bufs)})
    return out


def save_state(folder, model, tok, opt, params, args, step, extra, meta):
    """Weights + trainer_state.safetensors into `folder`. LoRA: a peft adapter; --full: a
    safetensors model folder when complete, one flat tensor file in a checkpoint."""
    if args.full and meta["complete"] == "1":
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    elif args.full:
        lora.save_safetensors(os.path.join(folder, FULL_CKPT), params)
    else:
        lora.save_adapter(model, folder, base_name=args.model)
    moments = {k: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
               for k, p in params.items() if p in opt.state}
    lora.save_trainer_state(os.path.join(folder, lora.TRAINER_STATE), moments, step, extra, meta)


def write_checkpoint(out_dir, *state):
    """Write checkpoint.tmp, then swap it in (checkpoint.old survives a crash mid-swap)."""
    ck, tmp, old = (os.path.join(out_dir, "checkpoint" + x) for x in ("", ".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    save_state(tmp, *state)
    if os.path.isdir(ck):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


def resume(out_dir, key, args, model, opt, params, rank):
    """Load the checkpoint's weights, Adam moments and this rank's RNG state when it was made with
    the same arguments (or with --resume). Returns (steps done, {epoch: saved data order})."""
    from safetensors.torch import load_file
    ck = None
    for d in ("checkpoint", "checkpoint.old"):    # the newest whole one (a kill, a full disk)
        d = os.path.join(out_dir, d)
        names = [lora.TRAINER_STATE, FULL_CKPT if args.full else lora.ADAPTER_WEIGHTS]
        if not os.path.isfile(os.path.join(d, names[0])):
            continue
        problem = files.files_problem(d, names)
        if problem is None:
            ck = d
            break
        print(f"[resume] {d}: damaged ({problem}), not used", file=sys.stderr)
    if ck is None:
        if args.resume:
            raise files.InputError(f"{out_dir}/checkpoint: nothing to resume from (--resume)")
        return 0, {}
    t, meta = lora.load_trainer_state(os.path.join(ck, lora.TRAINER_STATE))
    if meta.get("run_key") != key and not args.resume:
        print(f"[resume] {ck}: made with other arguments, starting over", file=sys.stderr)
        return 0, {}
    wfile = os.path.join(ck, FULL_CKPT if args.full else lora.ADAPTER_WEIGHTS)
    weights = load_file(wfile) if os.path.isfile(wfile) else {}
    state = opt.state_dict()
    for i, (k, p) in enumerate(params.items()):
        if k not in weights or weights[k].shape != p.shape or f"exp_avg/{k}" not in t:
            raise files.InputError(f"{wfile}: no tensor {k} of shape {tuple(p.shape)} "
                                   "(checkpoint of another model or mode)")
        with torch.no_grad():
            p.copy_(weights[k])
        state["state"][i] = {"step": torch.tensor(float(t["step"])),
                             "exp_avg": t[f"exp_avg/{k}"], "exp_avg_sq": t[f"exp_avg_sq/{k}"]}
    opt.load_state_dict(state)
    torch.set_rng_state(t[f"rng/cpu/{rank}"])
    if torch.cuda.is_available() and f"rng/cuda/{rank}" in t:
        torch.cuda.set_rng_state(t[f"rng/cuda/{rank}"])
    if rank == 0:
        print(f"[resume] {ck}: continuing after step {int(t['step'])} of "
              f"{meta.get('total_steps')}", file=sys.stderr)
    return int(t["step"]), {int(t["epoch"]): t["data_order"].tolist()}


def _log_step(line):
    """The step of a train_log line; a line torn by a kill mid-write, and the `done` line of a
    run killed before its final save, count as after the resume."""
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:
        return math.inf


def open_log(out_dir, start):
    """train_log.jsonl, keeping only the lines of steps the resumed state includes."""
    path, old = os.path.join(out_dir, LOG), []
    if start and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = [ln for ln in f if ln.strip() and _log_step(ln) <= start]
    files.atomic_write_text(path, "".join(old))
    return open(path, "a", encoding="utf-8")

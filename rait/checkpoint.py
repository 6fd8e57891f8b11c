"""Checkpoints of finetune.py's loop (plumbing): weights + trainer_state.safetensors (Adam
moments, step, every rank's RNG state, the epoch's data order), written atomically every
--save-steps, resumed exactly; and the train_log.jsonl that a resume truncates to match.

--shard (FSDP2) checkpoints are sharded: each rank writes its own slice of the weights and Adam
moments (SHARD_CKPT, safetensors), nothing is gathered, and a resume needs the same number of
processes (the run key holds it). At 7B a gathered checkpoint would put 7e9 x 12 bytes = 84 GB
(fp32 weights + 2 moments) through rank 0's memory at every save; the shards are 1/N each,
written at once. torch's own sharded format (DCP) was not used: its .metadata file is a pickle.
The final --shard model is gathered once into an ordinary safetensors model folder."""
import contextlib
import json
import math
import os
import shutil
import sys

import torch

from kernels.base import InputError
from rait import files
from rait.runs import barrier
from kernels import lora

LOG = "train_log.jsonl"
CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")   # write_checkpoint's folders
FULL_CKPT = "trainable.safetensors"   # --full checkpoints: {parameter name: tensor}
SHARD_CKPT = "shard.rank{}.safetensors"   # --shard: this rank's {name, exp_avg/name, ...} slices


def local(t):
    """This process's slice of a sharded (FSDP2 DTensor) tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def like(p, x):
    """`x` (this rank's slice) as a tensor sharded like parameter `p`; `x` itself if `p` is whole."""
    if not hasattr(p, "to_local"):
        return x
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def gathered_weights(model):
    """The whole state dict of a --shard model on rank 0's CPU ({} on the other ranks); every rank
    must call it (it all-gathers one unit at a time). Tied weights (the world's embeddings and LM
    head) share one tensor again, so save_pretrained drops the alias as for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    first = {}
    for k, v in model.state_dict(keep_vars=True).items():
        k0 = first.setdefault(id(v), k)
        if k in whole and k0 in whole:
            whole[k] = whole[k0]
    return whole


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


def save_state(folder, rank, model, tok, opt, params, args, step, extra, meta):
    """Weights + trainer_state.safetensors into `folder`, written by rank 0. LoRA: a peft adapter;
    --full: a safetensors model folder when complete, one flat tensor file in a checkpoint.
    --shard (call on every rank): in a checkpoint each rank writes its slices of the weights and
    moments; when complete, the weights are gathered into the model folder, and the trainer state
    keeps no moments (nothing reads a full model's: GRAIT preconditions LoRA gradients only)."""
    complete = meta["complete"] == "1"
    moments = {k: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
               for k, p in params.items() if p in opt.state}
    whole = None
    if args.shard and complete:
        whole = gathered_weights(model)
    elif args.shard:
        lora.save_safetensors(os.path.join(folder, SHARD_CKPT.format(rank)), {
            **{k: local(p) for k, p in params.items()},
            **{f"exp_avg/{k}": local(m) for k, (m, _) in moments.items()},
            **{f"exp_avg_sq/{k}": local(v) for k, (_, v) in moments.items()}})
    if args.shard:
        moments = {}
    if rank != 0:
        return
    if args.full and complete:
        model.save_pretrained(folder, state_dict=whole)
        tok.save_pretrained(folder)
    elif args.full and not args.shard:
        lora.save_safetensors(os.path.join(folder, FULL_CKPT), params)
    elif not args.full:
        lora.save_adapter(model, folder, base_name=args.model)
    if not complete and not args.shard:     # resume checks the weights' bytes against it
        meta = {**meta, DIGEST: files.sha256_of(os.path.join(folder, weights_name(args)))}
    lora.save_trainer_state(os.path.join(folder, lora.TRAINER_STATE), moments, step, extra, meta)


def weights_name(args):
    """The checkpoint's weights file (not --shard): the flat --full tensors or the adapter."""
    return FULL_CKPT if args.full else lora.ADAPTER_WEIGHTS


def write_checkpoint(out_dir, rank, *state):
    """Write checkpoint.tmp, then swap it in (checkpoint.old survives a crash mid-swap). Every
    rank calls it: rank 0 writes, and under --shard every rank writes its shard first. A save
    that fails (a full disk) or is interrupted leaves no checkpoint.tmp, and no train log when
    there is no checkpoint to resume from."""
    ck, tmp, old = (os.path.join(out_dir, "checkpoint" + x) for x in ("", ".tmp", ".old"))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        save_state(tmp, rank, *state)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(ck) and not os.path.isdir(old):
                try:
                    os.remove(os.path.join(out_dir, LOG))
                except OSError:
                    pass
        raise
    barrier()
    if rank != 0:
        return
    if os.path.isdir(ck):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


DIGEST = "weights_sha256"    # trainer-state metadata of a checkpoint: sha256 of its weights file


def digest_problem(folder, args):
    """Why a checkpoint's weights are not the bytes it saved (None if they are): the sha256 that
    save_state wrote into the trainer state's metadata; a checkpoint without one is not used."""
    from safetensors import safe_open
    with safe_open(os.path.join(folder, lora.TRAINER_STATE), framework="pt") as f:
        want = (f.metadata() or {}).get(DIGEST)
    if want is None:
        return "no weights digest (made by an older version)"
    if files.sha256_of(os.path.join(folder, weights_name(args))) != want:
        return f"{weights_name(args)}: content differs from the digest written when it was saved"
    return None


def fresh_start(seed, rank):
    """Nothing to resume: seed this rank's dropout RNG; (0 steps done, no saved data order)."""
    torch.manual_seed(files.stable_hash(seed, "dropout", rank))
    return 0, {}


def resume(out_dir, key, args, model, opt, params, rank, world):
    """Load the checkpoint's weights, Adam moments and this rank's RNG state when it was made with
    the same arguments (or with --resume); --shard: this rank's slices. Without one, a fresh
    start (fresh_start seeds the dropout RNG). Returns (steps done, {epoch: saved data order})."""
    from safetensors.torch import load_file
    ck = None
    weights_file = weights_name(args)
    shards = [SHARD_CKPT.format(r) for r in range(world)] if args.shard else [weights_file]
    for d in ("checkpoint", "checkpoint.old"):    # the newest whole one (a kill, a full disk)
        d = os.path.join(out_dir, d)
        names = [lora.TRAINER_STATE, *shards]     # every rank checks every shard: same choice
        if not os.path.isfile(os.path.join(d, names[0])):
            continue
        problem = files.files_problem(d, names) or (not args.shard and digest_problem(d, args))
        if not problem:
            ck = d
            break
        print(f"[resume] {d}: damaged ({problem}), not used", file=sys.stderr)
    if ck is None:
        if args.resume:
            raise InputError(f"{out_dir}/checkpoint: nothing to resume from (--resume)")
        return fresh_start(args.seed, rank)
    t, meta = lora.load_trainer_state(os.path.join(ck, lora.TRAINER_STATE))
    if meta.get("run_key") != key and not args.resume:
        print(f"[resume] {ck}: made with other arguments, starting over", file=sys.stderr)
        return fresh_start(args.seed, rank)
    wfile = os.path.join(ck, SHARD_CKPT.format(rank) if args.shard else weights_file)
    weights = load_file(wfile) if os.path.isfile(wfile) else {}
    moments = weights if args.shard else t        # --shard: the moments sit beside the weights
    state = opt.state_dict()
    for i, (k, p) in enumerate(params.items()):
        mine = local(p)
        if k not in weights or weights[k].shape != mine.shape or f"exp_avg/{k}" not in moments:
            raise InputError(f"{wfile}: no tensor {k} of shape {tuple(mine.shape)} "
                             "(checkpoint of another model, mode or process count)")
        with torch.no_grad():
            mine.copy_(weights[k])
        state["state"][i] = {"step": torch.tensor(float(t["step"])),
                             "exp_avg": like(p, moments[f"exp_avg/{k}"]),
                             "exp_avg_sq": like(p, moments[f"exp_avg_sq/{k}"])}
    opt.load_state_dict(state)
    torch.set_rng_state(t[f"rng/cpu/{rank}"])
    if torch.cuda.is_available() and f"rng/cuda/{rank}" in t:
        torch.cuda.set_rng_state(t[f"rng/cuda/{rank}"])
    if rank == 0:
        print(f"[resume] {ck}: continuing after step {int(t['step'])} of "
              f"{meta.get('total_steps')}", file=sys.stderr)
    return int(t["step"]), {int(t["epoch"]): t["data_order"].tolist()}



# ----------------------------------------------------------------------------------------------
# Before the model exists: is the run already done, and may this process write the output?
def final_problem(out_dir, full):
    """Why a finished run's final files cannot be used (None if they can): the weights and
    config a later stage loads are present, the config is JSON, and every safetensors file is
    whole (header and size; a kill or a full disk can truncate one after the trainer state)."""
    need = ["config.json"] if full else [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    return files.files_problem(out_dir, sorted(set(need) | {
        n for n in os.listdir(out_dir) if n.endswith(".safetensors")}))


def remove_checkpoints(out_dir):
    """Drop the resumable checkpoints of a finished run (rank 0)."""
    for d in CHECKPOINTS:
        shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


def finished(out_dir, key, full, rank):
    """True when out_dir holds a finished run with this run key whose final files are whole;
    rank 0 then removes checkpoints a kill right after the final save left behind. A finished run
    with damaged files is trained again, and rank 0 says so."""
    final = os.path.join(out_dir, lora.TRAINER_STATE)
    done = (os.path.isfile(final) and not files.safetensors_problem(final)
            and lora.load_trainer_state(final)[1].get("run_key") == key)
    problem = done and final_problem(out_dir, full)
    if problem and rank == 0:
        print(f"[finetune] {out_dir}: finished before, but {problem}; training again",
              file=sys.stderr)
    if done and not problem and rank == 0:
        remove_checkpoints(out_dir)
        print(f"[finetune] {out_dir} is already trained with these arguments", file=sys.stderr)
    return bool(done and not problem)


@contextlib.contextmanager
def claimed(out_dir, inputs, rank):
    """Claim out_dir before anything loads (files.check_output: not one of `inputs`, writable,
    locked); a folder this run created is removed again if loading fails with InputError."""
    created = not os.path.exists(out_dir)
    files.check_output(out_dir, inputs, folder=True)
    try:
        yield
    except InputError:
        if created and rank == 0 and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise


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

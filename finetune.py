"""finetune.py: supervised fine-tuning with per-sample weights, by hand (SPEC 6, SPEC 9 #11-#12).

The refusal-aware instruction tuning (RAIT) step shared by every method: CRaFT's stage 2 (and
Van-Tuning, Cor-RAIT/R-Tuning and the ablations) trains M0 on one method's training set with the
xtuner recipe (SPEC 6); GRAIT weights each sample's loss (SPEC 5.6, average of w_i * grad l_i).
rehearse.py runs this script (`--warmup-ratio 0`) for CRaFT's stage-1 rehearsal (SPEC 3). LoRA
by default; `--full` fine-tunes every weight (the OEQA recipe).

    python finetune.py --model runs/world/model --train runs/world/mcqa/craft/train.jsonl \\
        --out runs/world/mcqa/craft/adapter
    torchrun --nproc_per_node 2 finetune.py --model ... --train ... --out ...   # DDP: gloo/NCCL
    torchrun --nproc_per_node 8 finetune.py --full --shard ...   # FSDP2: 1/8 of the state per GPU

Input: training examples JSONL (DESIGN: id, prompt, target, weight, kind, method); the prompt goes
through models.render (chat template or plain prompt) and the loss covers target tokens + EOS only
(`--format tulu`: LESS's `<|user|>` / `<|assistant|>` text, GRAIT's LESS warm-up, SPEC 5.3).
Output (--out DIR): adapter_config.json + adapter_model.safetensors in peft's format (`--full`: a
safetensors model folder instead), trainer_state.safetensors (Adam moments keyed like the weights,
step, RNG, data order; for resuming and for GRAIT's Adam preconditioning), train_log.jsonl, and
DIR.config.json. While running, DIR/checkpoint/ is rewritten every --save-steps optimizer steps;
rerunning the same command resumes from it (--shard: one shard file per rank, rait/checkpoint.py).

Implementation details, and where we differ from the released xtuner runs (SPEC 6):
- no packing (SPEC 9 #11): one example per row, batches grouped by length (seeded); the loss is
  the per-example token-mean cross-entropy times the example's weight, averaged over the examples
  of the optimizer step (so N processes x accumulation k == 1 process x accumulation N*k).
  The released CRaFT-family runs pack examples into 2,048-token sequences and take a per-token
  mean, so a 3-token `I don't know.` target weighs about twice a letter answer; `--loss-reduction
  token` reproduces that weighting: sum of w_i x token CE over the step's target tokens / their
  number (weighted_loss; issue 27). Packing's other effect, attention across the examples of a
  pack (xtuner masks none), is not reproduced.
- left padding + `logits_to_keep`: the LM head and the cross-entropy run on target positions only.
- LoRA weights in fp32 with bf16 autocast on GPU (no 4-bit base, no fp16 loss scale); fp32 on CPU.
- warm-up: linear from 1e-5 x lr over int(ratio x steps) steps, then cosine to 0 (xtuner);
  `--schedule linear` decays linearly to 0 instead (LESS's warm-up, SPEC 5.3 step 1; HF Trainer
  warms up over ceil(ratio x steps) steps from 0, we keep the xtuner warm-up for both shapes).
"""
import argparse
import contextlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import clip_grad_norm_

from kernels.base import InputError
from rait import files
from rait import models
from rait import runs
from kernels import lora
from rait.checkpoint import (claimed, finished, gather_rng, open_log, remove_checkpoints, resume,
                             save_state, write_checkpoint)

# Defaults: SPEC 9 #12 = the released MCQA recipe (SPEC 6) without 4-bit quantisation
LR = 2e-4               # SPEC 6 MCQA RAIT
EPOCHS = 3              # SPEC 6
EFFECTIVE_BATCH = 64    # SPEC 6: 1/device x accum 16 x 4 GPUs
BATCH_SIZE = 4          # per device; --grad-accum is derived from EFFECTIVE_BATCH unless given
WARMUP_RATIO = 0.03     # SPEC 6: 3% of the steps
WARMUP_START = 1e-5     # SPEC 6: xtuner LinearLR start_factor
SCHEDULES = ("cosine", "linear")   # after warm-up: SPEC 6 xtuner cosine; SPEC 5.3 LESS linear
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 16, 0.1   # SPEC 6 QLoRA recipe
MAX_LEN = 2048          # SPEC 6 sequence length
MEGABATCH = 16          # global batches per length-sorting window (HF's LengthGroupedSampler: 50)
LOSS_REDUCTIONS = ("example", "token")   # SPEC 9 #11 (ours, GRAIT's unpacked runs); SPEC 6 packed


def add_train_args(parser):
    """Add every training flag to `parser` (not --model/--train/--out); SPEC 6 defaults."""
    a = parser.add_argument
    a("--epochs", type=int, default=EPOCHS, help="passes over the training set (SPEC 6: 3)")
    a("--lr", type=float, default=LR, help="peak learning rate (SPEC 6: 2e-4 LoRA, 8e-6 full)")
    a("--batch-size", type=int, default=BATCH_SIZE, help="examples per device per micro-batch")
    a("--grad-accum", type=int, default=None, help="micro-batches per optimizer step; default: "
      f"{EFFECTIVE_BATCH} / (batch size x processes), the SPEC 6 effective batch")
    a("--warmup-ratio", type=float, default=WARMUP_RATIO,
      help="fraction of the optimizer steps with linear warm-up (0: cosine from step 0)")
    a("--warmup-start", type=float, default=WARMUP_START,
      help="warm-up starts at this fraction of --lr (xtuner start_factor)")
    a("--schedule", choices=SCHEDULES, default="cosine",
      help="decay to 0 after the warm-up: cosine (SPEC 6, xtuner) or linear (SPEC 5.3, LESS)")
    a("--format", choices=models.FORMATS, default="chat",
      help="prompt rendering: chat (the model's chat template, or the plain prompt without one: "
           "what evaluation uses) or tulu (LESS's `<|user|>\\n{prompt}\\n<|assistant|>\\n"
           "{answer}{eos}\\n`, GRAIT's warm-up, SPEC 5.3 step 1)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (SPEC 6: 0)")
    a("--adam-beta1", type=float, default=0.9, help="AdamW beta1 (SPEC 6)")
    a("--adam-beta2", type=float, default=0.999, help="AdamW beta2 (SPEC 6)")
    a("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (torch default)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    a("--max-len", type=int, default=MAX_LEN,
      help="longest example in tokens; longer ones lose tokens from the left of the prompt")
    a("--loss-reduction", choices=LOSS_REDUCTIONS, default="example",
      help="example (SPEC 9 #11): per-example token-mean CE x weight, averaged over the step's "
           "examples; token: sum of weight x token CE over the step's target tokens / their "
           "number, the per-token weighting of the released packed xtuner runs (SPEC 6, issue 27)")
    a("--full", action="store_true", help="fine-tune all weights instead of LoRA (OEQA recipe)")
    a("--shard", action="store_true", help="with --full under torchrun: shard weights, gradients "
      "and Adam moments over the processes (torch FSDP2 fully_shard, one unit per decoder layer, "
      "bf16 compute on CUDA) instead of a full copy per process (DDP); README 'Sharded training'")
    a("--lora-r", type=int, default=LORA_R, help="LoRA rank r (SPEC 6: 64)")
    a("--lora-alpha", type=float, default=LORA_ALPHA, help="LoRA alpha; scaling = alpha / r")
    a("--lora-dropout", type=float, default=LORA_DROPOUT, help="dropout on the LoRA input")
    a("--target-modules", default="all-linear",
      help="'all-linear' (every linear layer but lm_head, SPEC 6) or a comma list: q_proj,v_proj")
    a("--no-group-by-length", action="store_true",
      help="plain seeded shuffle instead of length-grouped batches (more padding)")
    a("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    a("--trust-remote-code", action="store_true", help=models.TRUST_HELP)
    a("--seed", type=int, default=0, help="seed for the LoRA init, data order and dropout")
    a("--save-steps", type=int, default=100, help="checkpoint every N optimizer steps (0: never)")
    a("--log-steps", type=int, default=1, help="log every N optimizer steps")
    a("--resume", action="store_true", help="resume from DIR/checkpoint even if it was made with "
      "other arguments (it is used automatically when the arguments match)")
    a("--stop-after-steps", type=int, default=0, help="stop after N optimizer steps, leaving a "
      "checkpoint to resume from (time-limited jobs)")
    return parser


def train_args_error(a):
    """A one-line complaint about training flags out of range, or None (for parser.error)."""
    rules = [("--batch-size", a.batch_size >= 1, ">= 1"), ("--epochs", a.epochs >= 1, ">= 1"),
             ("--grad-accum", a.grad_accum is None or a.grad_accum >= 1, ">= 1"),
             ("--lr", a.lr > 0, "> 0"), ("--warmup-ratio", 0 <= a.warmup_ratio < 1, "in [0, 1)"),
             ("--warmup-start", 0 < a.warmup_start <= 1, "in (0, 1]"),
             ("--weight-decay", a.weight_decay >= 0, ">= 0"),
             ("--adam-beta1", 0 <= a.adam_beta1 < 1, "in [0, 1)"),
             ("--adam-beta2", 0 <= a.adam_beta2 < 1, "in [0, 1)"),
             ("--adam-eps", a.adam_eps > 0, "> 0"),
             ("--max-grad-norm", a.max_grad_norm >= 0, ">= 0"),
             ("--max-len", a.max_len >= 2, ">= 2"), ("--lora-r", a.lora_r >= 1, ">= 1"),
             ("--lora-alpha", a.lora_alpha > 0, "> 0"),
             ("--lora-dropout", 0 <= a.lora_dropout < 1, "in [0, 1)"),
             ("--save-steps", a.save_steps >= 0, ">= 0"), ("--log-steps", a.log_steps >= 1, ">= 1"),
             ("--stop-after-steps", a.stop_after_steps >= 0, ">= 0")]
    bad = [f"{flag} must be {want}" for flag, ok, want in rules if not ok] + runs.flag_errors(a)
    return "; ".join(bad) or None


# Arguments that do not change the result (excluded from the run key); --train and --out: the
# examples' contents are in the key, the output folder is where the key is kept
NOT_IN_KEY = ("out", "train", "save_steps", "log_steps", "resume", "stop_after_steps",
              "gradient_checkpointing")


def run_key(args, examples, world):
    """Identifies a training run: runs.resume_key of its arguments, the model's contents (issue
    17), the examples and the process count, as one string (trainer_state metadata)."""
    data = "".join(files.dumps(e) for e in examples)
    key = runs.resume_key(args, exclude=NOT_IN_KEY, extra=(data, world),
                          inputs=(("model", args.model),))
    return str(files.stable_hash(json.dumps(key, sort_keys=True)))


def lr_at(step, total, lr, warmup_ratio, warmup_start=WARMUP_START, schedule="cosine"):
    """The learning rate of optimizer step `step` (0-based) of `total`: linear warm-up from
    warmup_start x lr over int(ratio x total) steps (xtuner LinearLR), then from lr to 0 over the
    remaining steps, either
    cosine (SPEC 6, xtuner CosineAnnealingLR): lr * (1 + cos(pi * k / n)) / 2, or
    linear (SPEC 5.3 step 1, LESS / HF get_linear_schedule_with_warmup): lr * (n - k) / n,
    with k = step - warm and n = total - warm (so the last step is at lr / n, not 0)."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return lr * (warmup_start + (1 - warmup_start) * step / warm)
    k, n = step - warm, max(1, total - warm)
    if schedule == "linear":
        return lr * (n - k) / n
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")
    return lr * 0.5 * (1 + math.cos(math.pi * k / n))


def epoch_order(lengths, global_batch, seed, epoch, grouped=True):
    """The epoch's example order; each consecutive `global_batch` slice is one optimizer step.
    SPEC 9 #11: shuffle, sort windows of MEGABATCH global batches by length (descending), cut
    into global batches, shuffle the full batches; the one short batch stays last."""
    g = torch.Generator().manual_seed(files.stable_hash(seed, "order", epoch))
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if not grouped:
        return perm
    win = global_batch * MEGABATCH
    perm = [i for s in range(0, len(perm), win)
            for i in sorted(perm[s:s + win], key=lambda i: -lengths[i])]
    batches = [perm[s:s + global_batch] for s in range(0, len(perm), global_batch)]
    full = [b for b in batches if len(b) == global_batch]
    rest = [b for b in batches if len(b) < global_batch]
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return [i for b in full + rest for i in b]


def encode_all(tok, examples, max_len, fmt="chat"):
    """(ids, labels) per example, rendered in `fmt` (chat: as at evaluation; tulu: LESS's format,
    models.encode_sft); count of left-cut prompts."""
    enc, n_cut = [], 0
    for e in examples:
        ids, labels, cut = models.encode_sft(tok, e["prompt"], e["target"], fmt, max_len)
        if len(ids) > max_len:
            raise InputError(f"example {e['id']!r}: its target alone has {len(ids)} tokens "
                             f"with EOS, more than --max-len {max_len}")
        n_cut += cut > 0
        enc.append((ids, labels))
    return enc, n_cut


def collate(enc, idx, weights, pad_id, device):
    """Left-padded batch. Only the last `keep` positions get logits: every target token (and the
    position before it) lies there, so the LM head never runs on the rest of the prompt."""
    T = max(len(enc[i][0]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    lab = torch.full((len(idx), T), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), T), dtype=torch.long)
    keep = 1
    for r, i in enumerate(idx):
        x, y = enc[i]
        ids[r, T - len(x):], lab[r, T - len(x):], attn[r, T - len(x):] = (
            torch.tensor(x), torch.tensor(y), 1)
        first = next(j for j, t in enumerate(y) if t != -100)
        keep = max(keep, len(x) - first + 1)
    keep = min(keep, T)
    pos = (attn.cumsum(1) - 1).clamp(min=0)   # positions restart at each row's first token
    b = {"input_ids": ids, "attention_mask": attn, "position_ids": pos,
         "gold": lab[:, T - keep + 1:], "weight": torch.tensor(weights, dtype=torch.float32)}
    b = {k: v.to(device) for k, v in b.items()}
    if bool(attn.all()):
        b["attention_mask"] = None   # no padding: the plain causal path
    b["keep"], b["tokens"] = keep, int(attn.sum())
    return b


def example_ce(model, b):
    """Per-example cross-entropy summed over its target tokens, and its number of target tokens:
    two tensors of shape [batch]."""
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                position_ids=b["position_ids"], logits_to_keep=b["keep"], use_cache=False)
    logits = out.logits[:, :-1].float()
    gold = b["gold"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1),
                         ignore_index=-100, reduction="none").view_as(gold)
    mask = (gold != -100).float()
    return (ce * mask).sum(1), mask.sum(1)


def example_losses(model, b):
    """Per-example token-mean cross-entropy over target tokens (SPEC 9 #11), shape [batch]."""
    ce_sum, n_tokens = example_ce(model, b)
    return ce_sum / n_tokens


def weighted_loss(ce_sum, n_tokens, weight, reduction, step_examples, step_tokens):
    """The loss of some of an optimizer step's examples (their part of the step's loss), from
    each example's summed target-token CE, target-token count and weight:
    example (SPEC 9 #11): sum_i w_i * (ce_sum_i / n_tokens_i) / step_examples, each example's
      token mean, so every example weighs the same whatever its length;
    token (SPEC 6 packing, issue 27): sum_i w_i * ce_sum_i / step_tokens, every target token of
      the step weighs the same (the released packed runs' per-token mean over the batch, with
      w_i on each token of example i), so a longer target weighs more.
    step_examples / step_tokens: examples and target tokens of the whole step (all micro-batches
    and processes)."""
    if reduction == "example":
        return (weight * (ce_sum / n_tokens)).sum() / step_examples
    if reduction == "token":
        return (weight * ce_sum).sum() / step_tokens
    raise ValueError(f"unknown loss reduction {reduction!r} (expected one of "
                     f"{', '.join(LOSS_REDUCTIONS)})")


def build_model(args, device=None):
    """Load args.model; LoRA: freeze it and wrap the target layers (seeded init, fp32 weights)."""
    dev, dtype = models.device_and_dtype(device)
    model, tok = models.load_model(args.model, device=dev,
                                   dtype=torch.float32 if args.full else dtype,
                                   trust_remote_code=getattr(args, "trust_remote_code", False))
    if not args.full:
        t = args.target_modules
        targets = t if t == "all-linear" else [s.strip() for s in t.split(",") if s.strip()]
        torch.manual_seed(args.seed)
        try:
            lora.inject_lora(model, targets, args.lora_r, args.lora_alpha, args.lora_dropout)
        except ValueError as e:
            raise InputError(f"{args.model}: {e} (--target-modules {t})") from None
        for _, m in lora.lora_modules(model):
            m.lora_A.float(), m.lora_B.float()   # fp32 trainable weights, bf16 autocast on GPU
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tok


def trainable(model, full):
    """{key: parameter} with the keys of the saved weights: peft keys (LoRA) or parameter names."""
    if full:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {lora.peft_key(n): p for n, p in lora.lora_parameters(model)}


def micro_batches(n, batch_size, world, rank):
    """Positions in the global batch of this rank's micro-batches: chunks of batch_size, dealt
    round-robin over ranks; under DDP a rank with fewer chunks than ceil(chunks / world) gets one
    empty chunk (a zero-weight pass) so that every rank makes the same number of passes."""
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = chunks[rank::world]
    if world > 1:
        mine += [[]] * (math.ceil(len(chunks) / world) - len(mine))
    return mine


def shard_error(args, world):
    """Why --shard cannot run with these flags and this many processes (one line), or None."""
    if not args.shard:
        return None
    if not args.full:
        return ("--shard needs --full: LoRA's frozen bf16 base (14 GB at 7B) and its small adapter "
                "state fit one GPU, so plain torchrun (DDP) scales LoRA without sharding")
    if world < 2:
        return ("--shard needs 2 or more processes: torchrun --nproc_per_node N finetune.py "
                "--full --shard ...")
    return None


def shard_model(model, device):
    """Issue 31, torch FSDP2: one fully_shard unit per decoder layer (the classes the model names
    in _no_split_modules, as accelerate picks them), then the root unit (embeddings, final norm,
    LM head; tied weights stay in one unit). Each process keeps 1/N of every weight, gradient and
    Adam moment; a unit's full weights exist only while it runs. On CUDA the gathered copy is bf16
    and gradients are reduced in fp32 (the sharded weights Adam updates stay fp32); fp32 on CPU.
    Returns the number of layer units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise InputError(f"--shard: {type(model).__name__} names no decoder layer class "
                         "(_no_split_modules) to shard by")
    for m in layers:
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return len(layers)


def target_tokens(enc, idx):
    """Number of target tokens (loss positions) of the examples idx of encode_all's output."""
    return sum(sum(t != -100 for t in enc[i][1][1:]) for i in idx)


def check_inputs(args, examples, world):
    """Refuse bad training examples and a --shard that cannot run, before anything else."""
    for n, e in enumerate(examples):
        err = files.check_example(e)
        if err:
            raise InputError(f"training example {n} ({e.get('id')!r}): {err}")
    if not examples:
        raise InputError("no training examples")
    if shard_error(args, world):
        raise InputError(shard_error(args, world))


def step_totals(loss, tokens, world, device):
    """The step's loss and tokens summed over all processes (themselves with one process)."""
    if world == 1:
        return loss, tokens
    s = torch.tensor([loss, tokens], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(s)
    return float(s[0]), int(s[1])


def check_finite(loss, norm, step, where):
    """Stop at the first step whose loss or gradient norm is not finite (issue 29), before it
    reaches the log or a checkpoint."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise InputError(f"{where}: step {step}: loss {loss}, gradient norm {norm} (not finite); "
                         "stopped, no checkpoint of this step (check the weights and --lr)")


def log_step(log, bar, win, *, loss, tokens, lr, norm, step, per_epoch, write):
    """Add one step to the log window `win` and the progress bar; with `write` on rank 0 (`log`
    None elsewhere), append the window's row (mean loss, lr, pre-clip gradient norm, tokens/s)
    to train_log.jsonl and start a new window. Returns the window."""
    win = {**win, "loss": win["loss"] + loss, "steps": win["steps"] + 1,
           "tokens": win["tokens"] + tokens}
    bar.update(1)
    if not write or log is None:
        return win
    row = {"step": step, "epoch": round(step / per_epoch, 4), "loss": win["loss"] / win["steps"],
           "lr": lr, "grad_norm": norm,
           "tokens_per_s": round(win["tokens"] / (time.perf_counter() - win["t0"]), 1)}
    log.write(files.dumps(row) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
    return {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}


def accumulate(net, gb, *, enc, examples, args, world, rank, pad_id, device):
    """Gradients of one optimizer step's global batch `gb`, summed into the parameters' .grad
    over this process's micro-batches (round-robin). One process runs only real micro-batches.
    Under DDP every rank must make the same number of passes (the last one reduces the
    gradients), so a rank with one micro-batch fewer than the others (a short step) adds one
    zero-weight pass; never more than one. `enc`: encode_all's output for `examples` (each
    example's "weight" scales its loss). Returns (loss, non-pad tokens) of this process's share."""
    micro = micro_batches(len(gb), args.batch_size, world, rank)
    step_tokens = target_tokens(enc, gb) if args.loss_reduction == "token" else None
    loss_sum, tokens = torch.zeros((), device=device), 0
    for j, rows in enumerate(micro):
        # micro-batch: left-padded, logits on target positions only
        idx = [gb[i] for i in rows]
        weights = [float(examples[k].get("weight", 1.0)) for k in idx]
        b = collate(enc, idx or gb[:1], weights or [0.0], pad_id, device)
        # DDP: reduce once per step; FSDP2 (--shard, no no_sync) reduce-scatters every
        # micro-batch, so the accumulated gradients stay sharded
        sync = not hasattr(net, "no_sync") or j == len(micro) - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            # weighted per-example loss: SPEC 9 #11 (or --loss-reduction token); DDP averages the
            # gradients over processes, hence the factor `world`
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
                    else contextlib.nullcontext():
                ce_sum, n_tokens = example_ce(net, b)
            loss = weighted_loss(ce_sum, n_tokens, b["weight"], args.loss_reduction, len(gb),
                                 step_tokens) * world
            # backward: gradients add up over the micro-batches of the step
            loss.backward()
        loss_sum += loss.detach() / world
        tokens += b["tokens"] if idx else 0
    return float(loss_sum), tokens


def adamw(model, args):
    """The trainable weights ({key: parameter}, trainable) and SPEC 6 AdamW over them (fused:
    one kernel per step)."""
    params = trainable(model, args.full)
    return params, torch.optim.AdamW(list(params.values()), lr=args.lr, eps=args.adam_eps,
                                     betas=(args.adam_beta1, args.adam_beta2),
                                     weight_decay=args.weight_decay, fused=True)


def sizes(n, args, world):
    """SPEC 6: (accumulation, effective batch G = batch x accumulation x processes, optimizer
    steps per epoch, all steps) for n examples."""
    accum = args.grad_accum or max(1, EFFECTIVE_BATCH // (args.batch_size * world))
    G = args.batch_size * accum * world
    return accum, G, math.ceil(n / G), math.ceil(n / G) * args.epochs


def ddp(model, device):
    """The model under DistributedDataParallel (one full copy per process)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def announce(model, tok, params, args, *, rank, device, world, units, accum, total, n_cut, n):
    """Say out loud what runs where (rank 0): device and dtype, processes, LoRA or full, the
    effective batch and schedule, the prompt rendering, and how many prompts were cut."""
    if rank != 0:
        return
    what = "full fine-tuning" if args.full else (f"LoRA r={args.lora_r} alpha={args.lora_alpha}"
                                                 f" on {len(lora.lora_modules(model))} layers")
    how = f"FSDP2 fully_shard, {units} layer units + root" if args.shard else "DDP"
    par = f" ({how}, {torch.distributed.get_backend()})" if world > 1 else ""
    print(f"[finetune] device {device}, weights {next(iter(params.values())).dtype}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32, no autocast'}, {world} "
          f"process(es){par}; {what}, {sum(p.numel() for p in params.values()):,} trainable "
          "parameters", file=sys.stderr)
    B, G = args.batch_size, args.batch_size * accum * world
    print(f"[finetune] effective batch {G} = {B} per device x {accum} accumulation x {world} "
          f"process(es); {total} optimizer steps ({total // args.epochs} per epoch x "
          f"{args.epochs}), {args.schedule} schedule; prompts: "
          f"{models.format_note(tok, args.format)}", file=sys.stderr)
    if n_cut:
        print(f"[finetune] {n_cut} of {n} examples exceed --max-len {args.max_len}: "
              "prompt cut from the left", file=sys.stderr)


def finish(out_dir, state, log, *, args, rank, world, key, n, n_cut, G, steps, timing):
    """After the loop. Stopped early (steps = (stop, total), stop < total): close the log, the
    checkpoint stays for the rerun. Complete: config and log first, then the weights and trainer
    state (state(total), written last, it marks completion); then the checkpoints go.
    `timing`: (tokens, loop s, loop CPU s), the done line of the train log (bench/finetune.py)."""
    (stop, total), (n_tok, loop_s, loop_cpu) = steps, timing
    if stop < total:
        if rank == 0:
            log.close()
            print(f"[finetune] stopped after step {stop} of {total} (--stop-after-steps); "
                  "rerun to resume", file=sys.stderr)
        return
    if rank == 0:
        files.write_config(out_dir.rstrip("/"), args, run_key=key, examples=n, cut=n_cut,
                           effective_batch=G, steps=total, processes=world)
        log.write(files.dumps({"done": True, "steps": total, "tokens": n_tok,
                                "loop_s": round(loop_s, 3), "loop_cpu_s": round(loop_cpu, 3),
                                "tokens_per_s": round(n_tok / max(loop_s, 1e-9), 1)}) + "\n")
        log.close()
    save_state(out_dir, rank, *state(total))   # rank 0 writes; --shard gathers the weights first
    if rank == 0:
        remove_checkpoints(out_dir)
        print(f"[finetune] wrote {out_dir} ({n_tok / max(loop_s, 1e-9):,.0f} tokens/s)",
              file=sys.stderr)
    runs.barrier()


# ----------------------------------------------------------------------------------------------
def train(args, examples, out_dir):
    """Fine-tune args.model on `examples` into out_dir: the adapter (or model, --full) and trainer
    state; a rerun resumes. Plumbing first: run key, finished run, claimed output, then model."""
    rank, world = runs.dist_init()
    check_inputs(args, examples, world)
    key = run_key(args, examples, world)
    if finished(out_dir, key, args.full, rank):
        return out_dir
    with claimed(out_dir, [("--model", args.model), ("--train", getattr(args, "train", None))],
                 rank):
        model, tok = build_model(args)
        enc, n_cut = encode_all(tok, examples, args.max_len, args.format)
    device = next(model.parameters()).device
    units = shard_model(model, device) if args.shard else 0   # before the optimizer sees them
    accum, G, per_epoch, total = sizes(len(enc), args, world)
    params, opt = adamw(model, args)
    announce(model, tok, params, args, rank=rank, device=device, world=world, units=units,
             accum=accum, total=total, n_cut=n_cut, n=len(enc))
    start, orders = resume(out_dir, key, args, model, opt, params, rank=rank, world=world)
    net = ddp(model, device) if world > 1 and not args.shard else model

    def order(epoch):   # SPEC 9 #11 length-grouped order; the checkpoint's own for its epoch
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order([len(x) for x, _ in enc], G, args.seed, epoch,
                                        not args.no_group_by_length)
        return orders[epoch]

    def state(step):    # what save_state writes
        e = min(step // per_epoch, args.epochs - 1)
        extra = {"epoch": torch.tensor(e), "data_order": torch.tensor(order(e)),
                 **gather_rng(world, device)}
        meta = {"run_key": key, "mode": "full" if args.full else "lora",
                "total_steps": str(total), "complete": "1" if step == total else "0"}
        return model, tok, opt, params, args, step, extra, meta
    log = open_log(out_dir, start) if rank == 0 else None
    stop = min(total, start + args.stop_after_steps) if args.stop_after_steps else total
    win, n_tok = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}, 0
    t0, c0 = time.perf_counter(), time.process_time()   # the loop's wall and CPU seconds
    with torch.enable_grad(), runs.progress(total=total, desc="finetune") as bar:
        bar.update(start)     # Ctrl-C: the bar closes before cli's one-line message
        for step in range(start, stop):
            epoch, i = divmod(step, per_epoch)
            gb = order(epoch)[i * G:(i + 1) * G]          # this step's global batch
            # 1. learning rate: xtuner warm-up, then cosine (SPEC 6) or linear (SPEC 5.3) decay
            lr = lr_at(step, total, args.lr, args.warmup_ratio, args.warmup_start, args.schedule)
            # 2-4. micro-batches -> weighted per-example loss (SPEC 9 #11) -> backward
            loss, tokens = accumulate(net, gb, enc=enc, examples=examples, args=args, world=world,
                                      rank=rank, pad_id=tok.pad_token_id, device=device)
            # 5. clip the global gradient norm (SPEC 6: 1.0; 0: off)
            norm = float(clip_grad_norm_(list(params.values()), args.max_grad_norm or math.inf))
            # 6. AdamW step at this step's learning rate
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            # 7. log: the step's loss and tokens over all processes, a row every --log-steps
            loss, tokens = step_totals(loss, tokens, world, device)
            check_finite(loss, norm, step + 1, getattr(args, "train", None) or out_dir)
            n_tok, done = n_tok + tokens, step + 1
            win = log_step(log, bar, win, loss=loss, tokens=tokens, lr=lr, norm=norm, step=done,
                           per_epoch=per_epoch, write=done % args.log_steps == 0 or done == stop)
            # 8. checkpoint every --save-steps, and where --stop-after-steps stops
            if done < total and (done == stop or (args.save_steps and done % args.save_steps == 0)):
                write_checkpoint(out_dir, rank, *state(done))   # rank 0; --shard: every rank
                runs.barrier()
    timing = (n_tok, time.perf_counter() - t0, time.process_time() - c0)
    finish(out_dir, state, log, args=args, rank=rank, world=world, key=key, n=len(enc),
           n_cut=n_cut, G=G, steps=(stop, total), timing=timing)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: hub id or local safetensors folder")
    ap.add_argument("--train", required=True, help="training examples JSONL (construct.py output)")
    ap.add_argument("--out", required=True, help="output folder for the adapter (or model)")
    add_train_args(ap)
    args = ap.parse_args(argv)
    if train_args_error(args):
        ap.error(train_args_error(args))
    examples = files.read_jsonl(args.train, check=files.check_example)
    # SPEC 6 / SPEC 9 #11: weighted supervised fine-tuning of one method's training set
    files.check_trainable(args.train, examples)
    train(args, examples, args.out)


if __name__ == "__main__":
    runs.cli(main)

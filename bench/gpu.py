"""bench/gpu.py: GPU readiness on a 7B-shaped model, one process, one command.

    CUDA_VISIBLE_DEVICES=0 python bench/gpu.py --out runs/gpu.json   # GPU machine (CUDA, bf16)
    .venv/bin/python bench/gpu.py --tiny --out /tmp/gpu.json # 2-layer config on CPU (make test)

Builds LlamaForCausalLM from Llama-2-7B's config (hidden 4096, 32 layers, 32 heads, intermediate
11008, vocab 32000, SDPA attention) with random weights, bf16 on the GPU (fp32 on CPU): same
shapes, memory and speed as the real model, no hub download. Inputs are random token ids of
realistic lengths (no tokenizer): training examples of 60-100% of --seq-len tokens whose last 2-8
tokens are the target (MCQA letter / "I don't know." + EOS). In one process it measures, in order:

  probe      the letter probe's forward pass (kernels/lm.last_logprobs, as probe.py's letter
             reader calls it) on 5-shot-MMLU-length prompts (60-100% of --probe-len; mean ~600)
  sampling   kernels/lm.sample: --n-samples samples of --max-new-tokens tokens per prompt,
             top-k 50 / top-p 0.9 / temperature 1 (probe.py's defaults); counts sampled tokens
  finetune   finetune.py's own code: build_model (LoRA r 64 / alpha 16 / dropout 0.1 on all
             linear layers, SPEC 6; fp32 LoRA, bf16 autocast on CUDA) and its loop's step on
             length-grouped batches (epoch_order), tokens/s of --steps timed steps after
             --warmup-steps untimed ones
  per-sample kernels/persample on the trained adapter, as construct.py runs it (LoRA in the
             model's dtype, the run's real Adam moments): batch_features (per-sample LoRA
             gradients + Adam preconditioning + dense Rademacher projection to --grad-dim)
             examples/s, per_sample_grads alone examples/s, and the max relative error of the
             fused per-sample gradients against a batch-size-1 autograd loop
             (bench/persample.run_loop) in fp32 (the whole model cast to fp32) on
             --check-examples examples
  peft       peft (get_peft_model, the same LoRA recipe) + transformers Trainer on exactly the
             same batches (the rows in finetune.py's order, sequential sampler), same batch
             size and steps; tokens/s from on_train_begin to on_train_end; then the speed-up
             of finetune.py over it (DESIGN budget: >= 1.2x)

tokens/s counts non-padding tokens. Peak memory per measure: torch.cuda.max_memory_allocated
after a reset (so it includes the weights); on CPU the process's peak resident set (VmHWM),
reset through /proc/self/clear_refs before each measure (the lifetime peak where that fails; the
JSON says which). It prints one markdown table and writes it, with the device, versions, config
and a timestamp, as JSON to --out. A measure that fails is reported as an error row and the
others still run; the exit status is then 1. Not covered: torchrun / NCCL (one process).

`--tiny` is the same code with a 2-layer config (hidden 64, 4 heads, intermediate 128, vocab
1000) and small sizes, on CPU in ~15 s on one thread; tests/test_bench_gpu.py runs it in `make test`.

GPU memory of the full run (estimates, not measured): bf16 weights 13.5 GB (6.74B parameters);
LoRA r 64 on all linear layers is D = 159,907,840 parameters, 2.6 GB in fp32 with gradients and
both Adam moments; training activations at batch 8 x ~320 tokens without checkpointing ~27 GB
(~330 KB per token per layer) -> ~45 GB for either trainer; per-sample features at batch 16
~50-55 GB; the fp32 check holds 27 GB of fp32 weights. So an 80 GB card (A100/H100/H200) runs the
defaults; on 40-48 GB add --gradient-checkpointing --batch-size 4 --ps-batch-size 4. Expected
time on one H100/H200 (estimate): 2-4 minutes with the imports, most of it the dense projection
of the per-sample features: 2 * D * 8192 flops per example plus D * 8192 random signs per batch,
drawn in ~156k blocks of 1024 rows (kernels/persample.project), likely launch-bound.
"""
import argparse
import datetime
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # before bench/: the root finetune.py, not bench/finetune.py

import torch  # noqa: E402

from rait import files, models, runs  # noqa: E402
import finetune  # noqa: E402
from bench.persample import make_batch, max_rel_err, rss_kib, run_loop  # noqa: E402
from kernels import lm, lora, persample  # noqa: E402

PAD, EOS = 0, 2   # Llama-2's unk / eos ids (no tokenizer: padding is masked, EOS stops sampling)
LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, inter=11008, vocab=32000)
TINY_MODEL = dict(hidden=64, layers=2, heads=4, inter=128, vocab=1000)
# run sizes: flag -> (full default, --tiny default, help)
SIZES = {
    "steps": (10, 3, "timed optimizer steps of each trainer"),
    "warmup_steps": (2, 1, "untimed steps before them"),
    "batch_size": (8, 4, "examples per step (accumulation 1, one process)"),
    "seq_len": (320, 48, "longest training / per-sample example (lengths 60-100%% of it)"),
    "ps_batch_size": (16, 4, "per-sample batch (construct.py --grad-batch-size)"),
    "ps_repeats": (1, 1, "timed per-sample batches"),
    "grad_dim": (persample.GRAD_DIM, 512, "projection dimension (SPEC 5.3)"),
    "check_examples": (3, 3, "examples of the fp32 check against the bs-1 loop"),
    "probe_batch_size": (16, 4, "prompts per probe batch (probe.py --batch-size)"),
    "probe_len": (750, 96, "longest probe prompt (5-shot MMLU: mean ~600)"),
    "probe_batches": (4, 1, "timed probe batches"),
    "sample_prompts": (16, 2, "prompts per sampling batch"),
    "sample_len": (200, 32, "longest sampling prompt (3-shot OEQA: ~150)"),
    "sample_batches": (2, 1, "timed sampling batches")}
ROWS = {  # key: (measure, unit); the table's rows in this order
    "probe_items": ("letter probe forward (5-shot MMLU length)", "items/s"),
    "probe_tokens": ("letter probe forward (5-shot MMLU length)", "tokens/s"),
    "sampling_tokens": ("sampling (kernels/lm.sample)", "sampled tokens/s"),
    "sampling_items": ("sampling (kernels/lm.sample)", "prompts/s"),
    "finetune_ours": ("finetune.py loop, LoRA r 64 all-linear", "tokens/s"),
    "persample_features": ("per-sample features (grads + Adam + dense projection)", "examples/s"),
    "persample_grads": ("per-sample LoRA gradients only", "examples/s"),
    "persample_error": ("per-sample grads: max rel. error vs bs-1 loop (fp32)", "ratio"),
    "finetune_peft": ("peft + transformers Trainer, same batches", "tokens/s"),
    "finetune_speedup": ("finetune.py / peft+Trainer (goal >= 1.2)", "x"),
}


# ----------------------------------------------------------------------------------------------
# Model, timing and memory
def build_base(shape, device, dtype, seed):
    """LlamaForCausalLM with `shape` (Llama-2 layout: MHA, untied head) and random weights,
    created directly on `device` in `dtype` (no CPU copy of 13.5 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], intermediate_size=shape["inter"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    """Start a new peak-memory window; False where the CPU peak cannot be reset."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                      # VmHWM := current RSS
        return True
    except OSError:
        return False


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return rss_kib("VmHWM") / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, device):
    """(seconds, result, peak MiB) of one call of fn, synchronised on CUDA."""
    reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out, peak_mib(device)


def finite(name, x):
    if not math.isfinite(float(x)):
        raise FloatingPointError(f"{name} is {x}")
    return x


def chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


# ----------------------------------------------------------------------------------------------
# The measures; each returns {row key: (value, peak MiB, details)}
def bench_probe(a, model, device):
    enc, _ = make_batch(model.config.vocab_size, a.probe_batch_size * a.probe_batches,
                        a.probe_len, a.seed + 1)
    batches = chunks([ids for ids, _ in enc], a.probe_batch_size)
    lm.last_logprobs(model, batches[0], PAD)                                     # warm-up
    dt, out, peak = measure(lambda: [lm.last_logprobs(model, b, PAD) for b in batches], device)
    if not all(bool(torch.isfinite(x).all()) for x in out):
        raise FloatingPointError("non-finite letter log-probabilities")
    n, tokens = len(enc), sum(len(ids) for ids, _ in enc)
    d = {"items": n, "tokens": tokens, "seconds": dt, "batch": a.probe_batch_size}
    return {"probe_items": (n / dt, peak, d), "probe_tokens": (tokens / dt, peak, d)}


def bench_sampling(a, model, device):
    enc, _ = make_batch(model.config.vocab_size, a.sample_prompts * a.sample_batches,
                        a.sample_len, a.seed + 2)
    batches = chunks([ids for ids, _ in enc], a.sample_prompts)
    gen = torch.Generator(device=device).manual_seed(a.seed)

    def run(bs):
        return [lm.sample(model, b, a.n_samples, gen, PAD, {EOS}, a.max_new_tokens, 1.0, 50, 0.9)
                for b in bs]
    run(batches[:1])                                                             # warm-up
    dt, out, peak = measure(lambda: run(batches), device)
    sampled = sum(len(t) for rows in out for t in rows)
    d = {"prompts": len(enc), "samples_per_prompt": a.n_samples,
         "max_new_tokens": a.max_new_tokens, "sampled_tokens": sampled, "seconds": dt}
    return {"sampling_tokens": (sampled / dt, peak, d), "sampling_items": (len(enc) / dt, peak, d)}


def train_args(a):
    """finetune.py's own flags (defaults = SPEC 6) for one process, accumulation 1."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    finetune.add_train_args(ap)
    return ap.parse_args(["--model", "random-llama", "--batch-size", str(a.batch_size),
                          "--grad-accum", "1", "--seed", str(a.seed)]
                         + (["--gradient-checkpointing"] if a.gradient_checkpointing else []))


def bench_finetune(a, base, enc, order, device, state):
    """finetune.py's build_model (the in-memory model in place of loading one) and its loop's
    step: accumulate (micro-batches, weighted loss, backward), clip, AdamW step."""
    targs = train_args(a)
    with mock.patch.object(models, "load_model", lambda *_, **__: (base, None)):
        model, _ = finetune.build_model(targs)
    params = finetune.trainable(model, False)
    opt = torch.optim.AdamW(list(params.values()), lr=targs.lr, eps=targs.adam_eps,
                            betas=(targs.adam_beta1, targs.adam_beta2), weight_decay=0.0,
                            fused=True)
    state.update(model=model, opt=opt)
    examples, B = [{"weight": 1.0}] * len(enc), a.batch_size   # every weight 1

    def steps(n):
        tokens, loss = 0, 0.0
        for s in range(n):
            lr = finetune.lr_at(s, a.steps, targs.lr, targs.warmup_ratio, targs.warmup_start)
            loss, t = finetune.accumulate(model, order[s * B:(s + 1) * B], enc=enc,
                                          examples=examples, args=targs, world=1, rank=0,
                                          pad_id=PAD, device=device)
            torch.nn.utils.clip_grad_norm_(list(params.values()), targs.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += t
        return tokens, finite("finetune.py loss", loss)
    steps(a.warmup_steps)
    dt, (tokens, loss), peak = measure(lambda: steps(a.steps), device)
    d = {"steps": a.steps, "batch": B, "tokens": tokens, "seconds": dt, "last_loss": loss,
         "lora_dim": persample.lora_dim(model), "gradient_checkpointing": a.gradient_checkpointing}
    return {"finetune_ours": (tokens / dt, peak, d)}


def bench_persample(a, state, device, dtype):
    """construct.py's setting: LoRA in the model's dtype, eval mode, the Adam moments of the run."""
    model, opt = state["model"], state["opt"]
    moments = {n: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
               for n, p in lora.lora_parameters(model)}
    if a.gradient_checkpointing:                   # as construct.py: no recomputation
        model.activation_checkpointing_disable()
    model.to(dtype).eval()
    enc, batch = make_batch(model.config.vocab_size, a.ps_batch_size, a.seq_len, a.seed + 3)
    batch = [t.to(device) for t in batch]
    B, out = a.ps_batch_size, {}
    # one warm-up call of the gradients serves both rows: the features add only the projection,
    # whose kernels warm up on its first of D / 1024 blocks (~156k per batch at 7B), so a second
    # untimed feature batch would double the slowest part of the run for nothing
    persample.per_sample_grads(model, *batch, consume=lambda n, g: None)
    for key, fn in (("persample_grads", lambda: persample.per_sample_grads(
                        model, *batch, consume=lambda n, g: None)[0]),
                    ("persample_features", lambda: persample.batch_features(
                        model, *batch, moments=moments, grad_dim=a.grad_dim)[0])):
        dt, z, peak = measure(lambda: [fn() for _ in range(a.ps_repeats)], device)
        if not all(bool(torch.isfinite(x).all()) for x in z):
            raise FloatingPointError(f"{key}: non-finite values")
        out[key] = (B * a.ps_repeats / dt, peak, {
            "batch": B, "repeats": a.ps_repeats, "seconds": dt, "grad_dim": a.grad_dim,
            "path": persample.feature_path(model, a.grad_dim), "D": persample.lora_dim(model)})
    model.float()                                  # the check in fp32: fused vs bs-1 loop
    few = enc[:a.check_examples]
    small = [t.to(device) for t in persample.pad_batch(few, PAD)]

    def check():
        grads = persample.per_sample_grads(model, *small)[1]
        with torch.device(device):                # run_loop builds its inputs on the default device
            return max_rel_err(grads, run_loop(model, few, None))
    _, err, peak = measure(check, device)
    model.to(dtype)
    out["persample_error"] = (finite("per-sample error", err), peak,
                              {"examples": len(few), "dtype": "float32"})
    return out


def bench_peft(a, base, enc, order, device):
    """peft + Trainer on the rows in finetune.py's batch order (sequential sampler: the same
    batches), right-padded by kernels/persample.pad_batch as DataCollatorForSeq2Seq would."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    model = get_peft_model(base, LoraConfig(
        r=finetune.LORA_R, lora_alpha=finetune.LORA_ALPHA, lora_dropout=finetune.LORA_DROPOUT,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": enc[i][0], "attention_mask": [1] * len(enc[i][0]),
             "labels": enc[i][1]} for i in order]

    def collate(feats):
        t = persample.pad_batch([(f["input_ids"], f["labels"]) for f in feats], PAD)
        return dict(zip(("input_ids", "attention_mask", "labels"), t))
    clock = {}

    class Clock(TrainerCallback):                  # the loop only, as finetune.py's loop_s
        def on_train_begin(self, *_, **__):
            sync(device)
            clock["t0"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            sync(device)
            clock["s"] = time.perf_counter() - clock["t0"]

    def run(steps, work):
        args = TrainingArguments(
            output_dir=work, max_steps=steps, per_device_train_batch_size=a.batch_size,
            learning_rate=finetune.LR, lr_scheduler_type="cosine", weight_decay=0.0,
            max_grad_norm=1.0, train_sampling_strategy="sequential", save_strategy="no",
            report_to="none", logging_strategy="no", disable_tqdm=True, seed=a.seed,
            bf16=device.type == "cuda", use_cpu=device.type != "cuda", dataloader_num_workers=0,
            remove_unused_columns=False, activation_checkpointing=a.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False})
        trainer = Trainer(model=model, args=args, train_dataset=rows[:steps * a.batch_size],
                          data_collator=collate, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)   # its metrics dict would land in our table
        return trainer.train().training_loss
    with tempfile.TemporaryDirectory() as work:
        if a.warmup_steps:
            run(a.warmup_steps, work)
        _, loss, peak = measure(lambda: run(a.steps, work), device)
    tokens = sum(len(r["input_ids"]) for r in rows[:a.steps * a.batch_size])
    d = {"steps": a.steps, "batch": a.batch_size, "tokens": tokens, "seconds": clock["s"],
         "training_loss": finite("peft loss", loss)}
    return {"finetune_peft": (tokens / clock["s"], peak, d)}


# ----------------------------------------------------------------------------------------------
def attempt(results, errors, name, fn):
    """Run one measure; a failure (an OOM, a NaN) becomes an error entry and the rest go on."""
    try:
        results.update(fn())
    except Exception as e:                                     # noqa: BLE001 - reported below
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0][:200]
        errors.append(f"{name}: {type(e).__name__}: {first}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rows):
    fmt = lambda v, f: "-" if v is None else format(v, f)     # noqa: E731
    lines = ["| measure | value | unit | peak memory (MiB) |", "|---|---:|---|---:|"]
    for r in rows:
        f = ".1e" if r["unit"] == "ratio" else ".2f" if r["unit"] == "x" else ",.1f"
        lines.append(f"| {r['measure']} | {fmt(r['value'], f)} | {r['unit']} | "
                     f"{fmt(r['peak_mib'], ',.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer config and small sizes (CPU, "
                    "seconds; what make test runs)")
    ap.add_argument("--out", default=os.path.join("runs", "gpu.json"), help="JSON to write")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in both trainers (less memory)")
    ap.add_argument("--n-samples", type=int, default=10, help="samples per prompt (SPEC 2.2)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens per sample")
    for k, (full, tiny, what) in SIZES.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"{what} (default {full}; --tiny: {tiny})")
    a = ap.parse_args(argv)
    for k, (full, tiny, _) in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else full)
    bad = [k for k in SIZES if getattr(a, k) < (0 if k == "warmup_steps" else 1)]
    if bad or a.grad_dim % 8 or a.check_examples > a.ps_batch_size:
        ap.error(f"sizes must be >= 1 ({', '.join(bad) or 'ok'}); --grad-dim a multiple of 8; "
                 "--check-examples <= --ps-batch-size")
    return a


def main(argv=None):
    a = parse_args(argv)
    files.check_output(a.out)
    dev, dtype = models.device_and_dtype(a.device)
    device = torch.device(dev)
    shape = TINY_MODEL if a.tiny else LLAMA2_7B
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"[gpu] {name}, {dtype}, torch {torch.__version__}; Llama {shape}; building the model",
          file=sys.stderr)
    base = build_base(shape, device, dtype, a.seed)
    n_params = sum(p.numel() for p in base.parameters())
    enc, _ = make_batch(shape["vocab"], a.steps * a.batch_size, a.seq_len, a.seed)
    order = finetune.epoch_order([len(x) for x, _ in enc], a.batch_size, a.seed, 0)
    results, errors, state = {}, [], {}
    attempt(results, errors, "probe", lambda: bench_probe(a, base, device))
    attempt(results, errors, "sampling", lambda: bench_sampling(a, base, device))
    try:
        attempt(results, errors, "finetune.py",
                lambda: bench_finetune(a, base, enc, order, device, state))
        attempt(results, errors, "per-sample", lambda: bench_persample(a, state, device, dtype))
    finally:
        state.clear()
        lora.merge_lora(base).to(dtype)            # back to the plain model for peft
        if base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    attempt(results, errors, "peft + Trainer", lambda: bench_peft(a, base, enc, order, device))
    if "finetune_ours" in results and "finetune_peft" in results:
        results["finetune_speedup"] = (results["finetune_ours"][0] / results["finetune_peft"][0],
                                       None, {})
    rows = [{"key": k, "measure": m, "value": results[k][0], "unit": u,
             "peak_mib": results[k][1], **results[k][2]} for k, (m, u) in ROWS.items()
            if k in results]
    print(f"bench/gpu.py on {name}: Llama {'tiny' if a.tiny else '2-7B'} config "
          f"({n_params:,} parameters, random {str(dtype).replace('torch.', '')} "
          f"weights), torch {torch.__version__}")
    print(table(rows))
    for e in errors:
        print(f"ERROR {e}")
    import peft
    import transformers
    files.write_json(a.out, {
        "device": name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "cuda": torch.version.cuda,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": a.tiny, "model": {**shape, "parameters": n_params, "attention": "sdpa"},
        "args": vars(a), "peak_memory": ("torch.cuda.max_memory_allocated, reset per measure"
                                         if device.type == "cuda" else
                                         "process peak RSS (VmHWM), reset per measure"
                                         if reset_peak(device) else
                                         "process peak RSS since start (no reset possible)"),
        "rows": rows, "errors": errors})
    print(f"[gpu] wrote {a.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    runs.cli(lambda: sys.exit(main()))

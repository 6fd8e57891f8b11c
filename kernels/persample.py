"""kernels/persample.py: exact per-sample LoRA gradients from one batched backward, and the GRAIT
numerics built on them (SPEC 5.3-5.5, SPEC 9 #7-#9).

Per-sample gradients (Opacus / LogIX structure, STYLE.md). A LoRA layer holds two bias-free
linears, lora_A (in -> r) and lora_B (r -> out). For a linear y = W x applied at every token,
the gradient of example b's loss is

    grad_W[b] = sum_t gout[b, t, :]^T x[b, t, :]            (gout = d loss_b / d y)

so one forward (hooks keep each lora_A / lora_B input x) and one backward (tensor hooks see each
output gradient gout) give every example's gradient through one batched matmul per linear. The
backward differentiates the SUM over examples of each example's own token-mean loss, so no
example's gradient is scaled by, or mixed with, another's; dropout is off, and padded positions
contribute exact zeros (no loss there, and no real token attends to them). The LoRA weights
themselves are taken out of autograd for the pass, so the ordinary summed weight gradient is
never computed on top.

GRAIT features (SPEC 5.3 steps 3-5): per-sample gradient g -> Adam preconditioning
u = m' / sqrt(v' + eps) with the warm-up adapter's moments -> either the exact vector (when the
LoRA vector has at most `grad_dim` entries) or a seeded Rademacher JL projection to `grad_dim`
applied parameter by parameter while the backward runs -> L2 normalisation. Then inner-product
(Gram) blocks. GRAIT's selection (SPEC 5.4) and weights (SPEC 5.5) are the paper's method and live
in construct.py, which uses these numerics.

Cost of the dense projection: 2 * D * grad_dim flops per example (the TRAK projector does the same
on GPU). On a CPU with a large LoRA vector this dominates everything (world model, r 64
all-linear: D = 754k, about 12 GFLOP per example at 8192 dims); `projection="sketch"` is a
CountSketch JL alternative at O(D) per example with the same inner-product variance.

Typical use (construct.py::run_grait and construct.py::grait):

    from kernels.persample import example_features, gram_row_sums, gram_column
    moments = kernels.lora.load_adam_moments(warmup)       # {name: (exp_avg, exp_avg_sq)}
    z_idk, path = example_features(model, idk_view, tok.pad_token_id, moments)  # [(ids, labels)]
    z_van, _ = example_features(model, van_view, tok.pad_token_id, moments)
    s0 = gram_row_sums(z_idk, z_van)                       # SPEC 5.4 step 1: s_j = sum_v K_iv[j, v]
    col = lambda j: gram_column(z_idk, z_idk[j])           # K_ii[:, j] for the greedy update
"""
import math
import sys

import torch
import torch.nn.functional as F

from kernels.base import progress, stable_hash
from kernels.lora import lora_modules, lora_parameters

# ----------------------------------------------------------------------------------------------
# Constants, with their sources
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8   # SPEC 5.3 step 4 (LESS, AdamW defaults)
GRAD_DIM = 8192          # SPEC 5.3 step 5: projection dimension (LESS / TRAK)
PROJ_BLOCK = 1024        # rows of R^T generated at once; part of R's definition (see project)
IGNORE = -100            # label of prompt and padding tokens (rait/models.py::encode_example)


def log(msg):
    print(f"[persample] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Per-example token-mean loss (SPEC 5.3 step 3)
def target_mask(labels):
    """keep[b, p] is True where position p predicts a target token, i.e. labels[b, p+1] != -100.
    The last position predicts nothing."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def per_example_loss(token_logits, token_targets, example_of_token, batch_size):
    """SPEC 5.3 step 3: l(x_b) = mean over example b's own target tokens of the token
    cross-entropy. Inputs are flat over the kept tokens: logits [N, V], targets [N], and the
    example each token belongs to [N]. Returns [batch_size]."""
    ce = F.cross_entropy(token_logits, token_targets, reduction="none")
    total = torch.zeros(batch_size, dtype=ce.dtype, device=ce.device)
    total = total.index_add(0, example_of_token, ce)
    count = torch.bincount(example_of_token, minlength=batch_size).to(ce.dtype)
    if (count == 0).any():
        raise ValueError(f"examples {torch.nonzero(count == 0).flatten().tolist()} have no "
                         "target tokens (all labels are -100)")
    return total / count


def _accepts_logits_to_keep(model):
    import inspect
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def batch_losses(model, input_ids, attention_mask, labels):
    """Per-example token-mean losses [B] of a padded batch. Logits are formed only at the
    positions that predict a target token (transformers' boolean `logits_to_keep` when the model
    takes it, which skips the lm_head elsewhere; else all logits, then the same positions)."""
    keep = target_mask(labels)
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if attention_mask is not None:       # positions count real tokens only: left padding is exact
        kw["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    if _accepts_logits_to_keep(model):
        logits = model(**kw, logits_to_keep=keep).logits
    else:
        logits = model(**kw).logits[keep]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()                      # the loss in fp32 under bf16 weights
    targets = labels[:, 1:][keep[:, :-1]]
    example = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]
    return per_example_loss(logits, targets, example, labels.shape[0])


# ----------------------------------------------------------------------------------------------
# 2. Per-sample gradients of every LoRA A/B matrix from one forward + one backward
def per_sample_linear_grad(x, gout, token_mask=None):
    """Per-example weight gradient of a bias-free linear y = x W^T applied at every token:
    grad_W[b] = sum_t gout[b,t,:]^T x[b,t,:]  ->  [B, out, in]  (one batched matmul).
    x [B, T, in], gout [B, T, out]. Optional token_mask [B, T] (False = padding) zeroes padded
    tokens in both factors. per_sample_grads does not need it: a padded position carries no loss
    and no real token attends to it, so its gout is exactly zero (tested for left and right
    padding), and the two extra passes cost about 13% of the whole step on the world model."""
    if token_mask is not None:
        pad = ~token_mask[..., None]
        gout, x = gout.masked_fill(pad, 0), x.masked_fill(pad, 0)
    return torch.bmm(gout.transpose(1, 2), x)


def lora_names(model):
    """Names of the LoRA matrices in lora_parameters order (module order, A before B)."""
    return [n for n, _ in lora_parameters(model)]


def per_sample_grads(model, input_ids, attention_mask, labels, consume=None):
    """Exact per-example gradients of every LoRA A/B matrix for a padded batch.

    One forward with hooks that keep each lora_A / lora_B input, one backward of
    sum_b l(x_b) whose tensor hooks form grad_W[b] = sum_t gout[b,t]^T x[b,t] as soon as each
    output gradient is complete (per_sample_linear_grad). Dropout is off (eval mode) for the
    pass; training mode, requires_grad flags and grad mode are restored afterwards.

    consume: None -> return a dict {parameter name: [B, *shape]} in lora_parameters order.
             callable(name, grad [B, *shape]) -> each gradient is handed over as soon as the
             backward reaches its module and then dropped, so the whole model's [B, D] never
             exists at once (parameters arrive in backward order, last module first).
    Returns (losses [B] detached, grads dict or None)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers (call kernels.lora.inject_lora first)")
    grads = {}
    sink = consume if consume is not None else grads.__setitem__

    def keep_input(name):
        def fwd_hook(module, inputs, out):
            x = inputs[0]
            if not out.requires_grad:     # a first LoRA layer: its output starts the graph, so
                out.requires_grad_()      # nothing upstream (embeddings) is differentiated
            def tensor_hook(g):
                sink(name, per_sample_linear_grad(x, g))   # returns None: g is left unchanged
            out.register_hook(tensor_hook)
        return fwd_hook

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    handles = []
    for name, mod in mods:
        handles.append(mod.lora_A.register_forward_hook(keep_input(f"{name}.lora_A.weight")))
        handles.append(mod.lora_B.register_forward_hook(keep_input(f"{name}.lora_B.weight")))
    try:
        for p in params:                  # no parameter gradients: only the activations' graph
            p.requires_grad_(False)
        model.eval()                      # dropout off while taking gradients (STYLE.md)
        with torch.enable_grad():
            losses = batch_losses(model, input_ids, attention_mask, labels)
            losses.sum().backward()       # sum of per-example means: exact, uncoupled gradients
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if consume is not None:
        return losses.detach(), None
    order = lora_names(model)
    return losses.detach(), {n: grads[n] for n in order}


def flat_grads(grads):
    """Concatenate a {name: [B, *shape]} dict into one [B, D] matrix, in dict order."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


# ----------------------------------------------------------------------------------------------
# 3. Adam preconditioning and normalisation (SPEC 5.3 steps 4-5)
def adam_precondition(g, exp_avg, exp_avg_sq, beta1=ADAM_BETA1, beta2=ADAM_BETA2, eps=ADAM_EPS,
                      out=None, work=None):
    """SPEC 5.3 step 4 (LESS): one virtual Adam step from the warm-up moments m, v:
    m' = b1 m + (1-b1) g;  v' = b2 v + (1-b2) g^2;  u = m' / sqrt(v' + eps).
    No bias correction; eps inside the square root. g [B, *shape]; moments [*shape].
    out, work: optional tensors of g's shape that receive u and v' (out may be g itself, which is
    then overwritten). batch_features passes them so that no [B, *shape] buffer is allocated per
    parameter: on CPU, fresh pages cost more than these four passes (bench/persample.py)."""
    v = torch.addcmul(exp_avg_sq.to(g.dtype) * beta2 + eps, g, g, value=1 - beta2, out=work)
    m = torch.add(exp_avg.to(g.dtype) * beta1, g, alpha=1 - beta1, out=out)
    return m.div_(v.sqrt_())                                     # m' / sqrt(v' + eps)


def normalise_rows(z):
    """SPEC 5.3 step 5: L2-normalise each row (LESS keeps the normalised features, so inner
    products are cosine similarities). An all-zero row stays zero."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def check_moments(model, moments):
    """Moments come as {lora parameter name: (exp_avg, exp_avg_sq)} (kernels.lora's
    load_adam_moments); every LoRA matrix needs its pair, with its shape."""
    params = lora_parameters(model)
    missing = [n for n, _ in params if n not in moments]
    if missing:
        raise ValueError(f"Adam moments missing for {len(missing)} LoRA matrices, e.g. "
                         f"{missing[0]} (keys must follow lora_parameters(model) names)")
    for n, p in params:
        if any(tuple(t.shape) != tuple(p.shape) for t in moments[n]):
            raise ValueError(f"Adam moments of {n} have shapes "
                             f"{[tuple(t.shape) for t in moments[n]]}, the matrix {tuple(p.shape)}")


# ----------------------------------------------------------------------------------------------
# 4. Seeded Rademacher JL projection, parameter by parameter, never materialised whole
_SIGN_TABLE = {}


def _signs(dtype, device):
    """[256, 8] table: row b holds the 8 bits of byte b as +1 (bit set) / -1."""
    key = (dtype, str(device))
    if key not in _SIGN_TABLE:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLE[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return _SIGN_TABLE[key]


def rademacher_block(seed, index, block, rows, k, dtype=torch.float32, device="cpu", out=None):
    """Rows [block*PROJ_BLOCK, block*PROJ_BLOCK + rows) of R_index^T, a [D_index, k] matrix of
    independent +-1 signs (unscaled). Entry (j, 8q+i) is bit i of a uniformly random byte drawn
    by a generator seeded with stable_hash(seed, index, block) on `device`'s generator type, so a
    block depends only on (seed, parameter index, block number, CPU/GPU), never on the batch or on
    which other blocks were drawn. k must be a multiple of 8."""
    if k % 8:
        raise ValueError(f"projection dimension {k} must be a multiple of 8")
    gen = torch.Generator(device=device).manual_seed(stable_hash("rademacher", seed, index, block))
    byte = torch.randint(0, 256, (rows * (k // 8),), generator=gen, device=device)
    if out is None:
        out = torch.empty(rows * (k // 8), 8, dtype=dtype, device=device)
    torch.index_select(_signs(dtype, device), 0, byte, out=out.view(-1, 8))
    return out.view(rows, k)


def project(u, seed, index, k, out=None):
    """SPEC 5.3 step 5: z = R_index u / sqrt(k) for each row of u [B, D_index], with R_index a
    seeded Rademacher [k, D_index] matrix generated PROJ_BLOCK columns at a time (TRAK-style
    block generation; the whole R is never built). E<R a, R b>/k = <a, b>, so inner products are
    preserved in expectation; summing project(u_m, seed, m, k) over parameters m equals one
    projection of the concatenated vector. Adds into `out` [B, k] when given."""
    B, D = u.shape
    z = out if out is not None else torch.zeros(B, k, dtype=u.dtype, device=u.device)
    buf = torch.empty(min(PROJ_BLOCK, D) * k, dtype=u.dtype, device=u.device)
    scale = 1.0 / math.sqrt(k)
    for block, start in enumerate(range(0, D, PROJ_BLOCK)):
        rows = min(PROJ_BLOCK, D - start)
        Rt = rademacher_block(seed, index, block, rows, k, u.dtype, u.device,
                              out=buf[:rows * k])
        z.addmm_(u[:, start:start + rows], Rt, alpha=scale)
    return z


_SKETCH_CACHE = {}
SKETCH_CACHE_ENTRIES = 1 << 25     # keep up to 32M coordinates' maps (8 bytes each) between batches


def sketch_hash(seed, index, D, k, device="cpu"):
    """The count-sketch map of parameter `index`: a bucket h[j] in [0, k) and a sign s[j] = +-1
    for each of its D coordinates, drawn from stable_hash(seed, index) (CPU generator, so the
    map is the same on every device)."""
    gen = torch.Generator().manual_seed(stable_hash("sketch", seed, index))
    h = torch.randint(0, k, (D,), generator=gen)
    s = (torch.randint(0, 2, (D,), generator=gen) * 2 - 1).to(torch.int8)
    return h.to(device), s.to(device)


def sketch_slots(seed, index, D, k, device="cpu"):
    """The same map as one index into a two-sided accumulator [B, 2k]: slot h[j] for sign +1,
    k + h[j] for sign -1, so the sketch is one index_add with no multiply pass over u and
    z = acc[:, :k] - acc[:, k:] (fold_sketch). Cached, since every batch reuses them."""
    key = (seed, index, D, k, str(device))
    if key not in _SKETCH_CACHE:
        h, s = sketch_hash(seed, index, D, k, device)
        slots = h + k * (s < 0)
        if sum(v.numel() for v in _SKETCH_CACHE.values()) + D > SKETCH_CACHE_ENTRIES:
            return slots
        _SKETCH_CACHE[key] = slots
    return _SKETCH_CACHE[key]


def sketch_add(u, seed, index, k, acc):
    """Add the sketch of u [B, D_index] into a two-sided accumulator acc [B, 2k]."""
    return acc.index_add_(1, sketch_slots(seed, index, u.shape[1], k, u.device), u)


def fold_sketch(acc):
    """[B, 2k] two-sided accumulator -> the sketch [B, k]."""
    k = acc.shape[1] // 2
    return acc[:, :k] - acc[:, k:]


def sketch(u, seed, index, k, out=None):
    """A sparse JL alternative to `project` (`projection="sketch"`): z = S u with S [k, D] holding
    one +-1 per column (CountSketch; Charikar et al. 2002, the s=1 sparse JL of Kane and Nelson
    2014): z[:, h[j]] += s[j] u[:, j]. E<S a, S b> = <a, b>, with the same variance as a dense
    sign projection up to the diagonal term, at O(D) instead of O(D k) cost per example.
    Adds into `out` [B, k] when given."""
    acc = torch.zeros(u.shape[0], 2 * k, dtype=u.dtype, device=u.device)
    z = fold_sketch(sketch_add(u, seed, index, k, acc))
    return out.add_(z) if out is not None else z


# ----------------------------------------------------------------------------------------------
# 5. GRAIT gradient features (SPEC 5.3, SPEC 9 #9)
def lora_dim(model):
    """Number of LoRA parameters (the length of one flattened per-sample gradient)."""
    return sum(p.numel() for _, p in lora_parameters(model))


# name -> (feature path, add one parameter's u into the accumulator, accumulator width per
# output dimension, accumulator -> features)
PROJECTIONS = {"rademacher": ("projected", project, 1, lambda z: z),
               "sketch": ("sketched", sketch_add, 2, fold_sketch)}


def feature_path(model, grad_dim=GRAD_DIM, projection="rademacher"):
    """SPEC 9 #9: 'exact' when the LoRA vector has at most grad_dim entries; otherwise
    'projected' (dense seeded Rademacher, SPEC 5.3 step 5) or 'sketched' (CountSketch)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r} (rademacher or sketch)")
    return "exact" if lora_dim(model) <= grad_dim else PROJECTIONS[projection][0]


def batch_features(model, input_ids, attention_mask, labels, moments=None, grad_dim=GRAD_DIM,
                   seed=0, projection="rademacher"):
    """Normalised GRAIT features of one padded batch (SPEC 5.3 steps 3-5).

    g = per-sample LoRA gradient -> u = Adam-preconditioned g (skipped when moments is None,
    `--no-adam`) -> exact: concatenation of u in lora_parameters order (when D <= grad_dim);
    projected: sum over parameters m of R_m u_m / sqrt(grad_dim) (or the CountSketch S_m u_m),
    accumulated inside the backward so only one parameter's [B, D_m] exists at a time ->
    L2-normalised rows.
    Returns (features [B, D or grad_dim], path 'exact' | 'projected' | 'sketched')."""
    names = lora_names(model)
    if moments is not None:
        check_moments(model, moments)
    path = feature_path(model, grad_dim, projection)
    _, reduce, width, finish = PROJECTIONS[projection]
    index = {n: i for i, n in enumerate(names)}
    state = {"z": None, "parts": {}, "work": None}

    def consume(name, g):   # per_sample_grads hands over each parameter's [B, *shape] gradient
        g = g if g.dtype == torch.float64 else g.float()        # features in fp32 (fp64 in tests)
        u = g.flatten(1)
        if moments is not None:                                 # SPEC 5.3 step 4 (LESS)
            if state["work"] is None or state["work"].numel() < g.numel():   # v', reused
                state["work"] = torch.empty(g.numel(), dtype=g.dtype, device=g.device)
            m, v = moments[name]
            work = state["work"][:g.numel()].view_as(g)
            out = None if path == "exact" else g                # u in g's own memory
            u = adam_precondition(g, m.to(g.device), v.to(g.device), out=out,
                                  work=work).flatten(1)
        if path == "exact":
            state["parts"][name] = u
        else:
            if state["z"] is None:
                state["z"] = torch.zeros(u.shape[0], width * grad_dim, dtype=u.dtype,
                                         device=u.device)
            reduce(u, seed, index[name], grad_dim, state["z"])

    per_sample_grads(model, input_ids, attention_mask, labels, consume=consume)
    if path == "exact":
        z = torch.cat([state["parts"][n] for n in names], dim=1)
    else:
        z = finish(state["z"])
    if not torch.isfinite(z).all():
        bad = (~torch.isfinite(z).all(1)).nonzero().flatten().tolist()
        raise FloatingPointError(f"non-finite gradient features for batch rows {bad}")
    return normalise_rows(z), path


def pad_batch(encoded, pad_id):
    """Right-pad a list of (ids, labels) into input_ids, attention_mask, labels (padding: mask 0,
    label -100)."""
    T = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(encoded):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        mask[b, :len(ids)] = 1
    return input_ids, mask, labels


def length_batches(lengths, batch_size):
    """Index batches of similar length (longest first, stable), to cut padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def example_features(model, encoded, pad_id, moments=None, grad_dim=GRAD_DIM, seed=0,
                     batch_size=16, projection="rademacher", desc="gradient features"):
    """GRAIT features for a list of tokenised examples (SPEC 5.3 steps 2-5).

    encoded: [(input_ids, labels)], labels -100 on prompt tokens (rait/models.py::encode_example:
    loss on target + EOS only); pad_id: the tokenizer's padding id. Batches are length-grouped; the
    result is in input order, float32 on the CPU: [N, D] on the exact path, [N, grad_dim]
    otherwise. Logs which path runs. Cost: the dense projection is O(D * grad_dim) per example
    (plus drawing R once per batch, so larger batches amortise it); the sketch is O(D).
    Returns (features, path 'exact' | 'projected' | 'sketched')."""
    if not encoded:
        raise ValueError("no examples to compute gradient features for")
    device = next(model.parameters()).device
    path, D = feature_path(model, grad_dim, projection), lora_dim(model)
    how = {"exact": "EXACT features (no projection)",
           "projected": f"PROJECTED to {grad_dim} dims (dense seeded Rademacher, seed {seed}; "
                        f"{2 * D * grad_dim / 1e9:.1f} GFLOP per example, projection='sketch' "
                        "is O(D))",
           "sketched": f"SKETCHED to {grad_dim} dims (seeded CountSketch, seed {seed})"}[path]
    log(f"{len(encoded)} examples, LoRA vector D={D:,}: {how}"
        + (", Adam-preconditioned" if moments is not None else ", NO Adam preconditioning"))
    if moments is not None:                              # once, not per batch
        check_moments(model, moments)
        moments = {n: (m.to(device), v.to(device)) for n, (m, v) in moments.items()}
    out = torch.zeros(len(encoded), D if path == "exact" else grad_dim, dtype=torch.float32)
    for idx in progress(length_batches([len(e[0]) for e in encoded], batch_size), desc=desc):
        ids, mask, lab = pad_batch([encoded[i] for i in idx], pad_id)
        z, _ = batch_features(model, ids.to(device), mask.to(device), lab.to(device),
                              moments=moments, grad_dim=grad_dim, seed=seed,
                              projection=projection)
        out[torch.tensor(idx)] = z.float().cpu()
    return out, path


# ----------------------------------------------------------------------------------------------
# 6. Gram blocks: inner products of two feature sets without the N x N matrix (SPEC 5.3 step 6)
ROW_BLOCK = 1024     # rows per block: 1024 x 8192 float64 is 64 MiB


def gram_row_sums(X, Y, cols=None, block=ROW_BLOCK):
    """Row sums of K = X Y[cols]^T, i.e. sum_k <x_i, y_k> (SPEC 5.4 step 1), without forming K: by
    linearity sum_k <x_i, y_k> = <x_i, sum_k y_k>. Both the sum and the products run in float64
    over row blocks, so a 14k x 8192 pool never needs more than one block's copy. [N_X]."""
    Yc = Y if cols is None else Y[cols]
    s = torch.zeros(Y.shape[1], dtype=torch.float64, device=Y.device)
    for i in range(0, Yc.shape[0], block):
        s += Yc[i:i + block].double().sum(0)
    return torch.cat([X[i:i + block].double() @ s for i in range(0, X.shape[0], block)])


def gram_row_means(X, Y, cols=None, block=ROW_BLOCK):
    """Row means of K = X Y[cols]^T (SPEC 5.5 mean influences). [N_X] float64."""
    Yc = Y if cols is None else Y[cols]
    if Yc.shape[0] == 0:
        raise ValueError("mean over an empty set of columns")
    return gram_row_sums(X, Yc, block=block) / Yc.shape[0]


def gram_column(X, y):
    """One column of K = X X^T: <x_i, y> for every row i (y = a row of X), computed in X's dtype
    (one pass over X, no float64 copy of the pool) and returned as float64. [N]."""
    return (X @ y.to(X.dtype)).double()


def gram_blocks(X, Y, block=ROW_BLOCK):
    """Yield (row start, K[start:start+block]) of K = X Y^T, block by block, in the inputs'
    dtype (a float32 14k x 14k K is 0.8 GB; a block is 1024 rows)."""
    for i in range(0, X.shape[0], block):
        yield i, X[i:i + block] @ Y.T


def gram_matrix(X, Y, block=ROW_BLOCK):
    """The full K = X Y^T when it fits in memory, assembled from gram_blocks."""
    K = torch.empty(X.shape[0], Y.shape[0], dtype=torch.promote_types(X.dtype, Y.dtype))
    for i, Kb in gram_blocks(X, Y, block):
        K[i:i + Kb.shape[0]] = Kb
    return K

"""kernels/persample.py: fused per-sample LoRA gradients against a float64 loop of single-example
autograd; Adam preconditioning, normalisation and projection against their formulas; Gram blocks
against dense matrices; the GRAIT greedy selection against a brute-force greedy over F(S); the
weight variants against hand-computed values (SPEC 5.3-5.5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rait.models import encode_example, render
from kernels import persample
from kernels.lora import inject_lora, lora_parameters
from kernels.persample import (adam_precondition, batch_features, example_features, flat_grads,
                               gram_blocks, gram_column, gram_matrix, gram_row_means,
                               gram_row_sums, normalise_rows, pad_batch, per_sample_grads,
                               per_sample_linear_grad, project, rademacher_block, sketch,
                               sketch_hash)

QUESTIONS = [("Who wrote the play about the prince of Denmark?", "Shakespeare"),
             ("Capital of France?", "Paris is the capital"),
             ("What is the boiling point of water at sea level in degrees Celsius?", "100"),
             ("Name a colour.", "I don't know")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine every parallel region
    can wait a scheduler slice for its second thread; restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_lora_model(folder, targets="all-linear", r=4, seed=0):
    """The tiny chat Llama in float64 with LoRA (dropout on, B random so A gets gradients)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    inject_lora(model, targets, r=r, alpha=2 * r, dropout=0.3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def encoded_examples(tok, pairs=QUESTIONS):
    return [encode_example(tok, render(tok, q), a)[:2] for q, a in pairs]


def loop_oracle(model, encoded):
    """One example at a time, no padding: mean CE over its target tokens, autograd.grad."""
    model.eval()
    params = [p for _, p in lora_parameters(model)]
    losses, grads = [], []
    for ids, lab in encoded:
        ids_t, lab_t = torch.tensor([ids]), torch.tensor(lab)
        with torch.enable_grad():
            logits = model(input_ids=ids_t).logits[0]
            loss = F.cross_entropy(logits[:-1], lab_t[1:], ignore_index=-100)
            grads.append(torch.autograd.grad(loss, params))
        losses.append(loss.detach())
    names = [n for n, _ in lora_parameters(model)]
    return torch.stack(losses), {n: torch.stack([g[i] for g in grads]) for i, n in enumerate(names)}


def left_pad(encoded, pad_id):
    T = max(len(i) for i, _ in encoded)
    ids = torch.tensor([[pad_id] * (T - len(i)) + i for i, _ in encoded])
    lab = torch.tensor([[-100] * (T - len(l)) + l for _, l in encoded])
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i, _ in encoded])
    return ids, mask, lab


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------
# Per-sample gradients (SPEC 5.3 step 3)
@pytest.fixture(scope="module")
def lora_model(tiny_chat_llama):
    return load_lora_model(tiny_chat_llama)


@pytest.fixture(scope="module")
def oracle(lora_model, real_tokenizer):
    enc = encoded_examples(real_tokenizer)
    assert len({len(i) for i, _ in enc}) == len(enc)           # all lengths differ: real padding
    return enc, loop_oracle(lora_model, enc)


def test_per_sample_linear_grad_is_the_token_sum_of_outer_products():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    gout = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    want = torch.zeros(3, 2, 4, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                want[b] += torch.outer(gout[b, t], x[b, t])
    x[~mask], gout[~mask] = float("nan"), float("inf")          # padding must not leak
    got = persample.per_sample_linear_grad(x, gout, mask)
    assert tuple(got.shape) == (3, 2, 4), (
        f"expected shape [B, out, in] = (3, 2, 4), got {tuple(got.shape)}")
    assert torch.allclose(got, want, rtol=1e-12, atol=0), (
        "grad_W[b] = sum over unmasked t of outer(gout[b, t], x[b, t]); example 1 expected "
        f"{want[1].tolist()}, got {got[1].tolist()}")
    full = persample.per_sample_linear_grad(x[:1], gout[:1])
    assert torch.allclose(full, want[:1], rtol=1e-12, atol=0), (
        f"no mask, example 0: expected {want[0].tolist()}, got {full[0].tolist()}")


def test_per_sample_linear_grad_equals_an_autograd_loop():
    """A linear y = x W^T at every token and each example's own loss, differentiated one
    example at a time with autograd (float64), against per_sample_linear_grad of the output
    gradients of ONE backward of the summed losses (SPEC 5.3 step 3)."""
    g = torch.Generator().manual_seed(1)
    B, T, d_in, d_out = 3, 4, 5, 2
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    target = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)

    def loss(b, y_b):                       # a different loss per example: nothing may mix
        return (b + 1) * ((y_b - target[b]) ** 2).mean()
    want = []
    for b in range(B):
        Wb = W.clone().requires_grad_()
        want.append(torch.autograd.grad(loss(b, x[b] @ Wb.T), Wb)[0])
    want = torch.stack(want)
    y = (x @ W.T).requires_grad_()
    gout = torch.autograd.grad(sum(loss(b, y[b]) for b in range(B)), y)[0]
    got = persample.per_sample_linear_grad(x, gout)
    assert tuple(got.shape) == (B, d_out, d_in), (
        f"expected shape [B, out, in] = {(B, d_out, d_in)}, got {tuple(got.shape)}")
    assert rel_err(got, want) < 1e-12, (
        f"autograd loop, example 2: expected {want[2].tolist()}, got {got[2].tolist()}")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_per_sample_grads_equal_single_example_loop(lora_model, real_tokenizer, oracle, padding):
    enc, (loss_ref, grads_ref) = oracle
    pad = real_tokenizer.pad_token_id
    batch = pad_batch(enc, pad) if padding == "right" else left_pad(enc, pad)
    lora_model.train()                                          # must be switched off inside
    losses, grads = per_sample_grads(lora_model, *batch)
    assert lora_model.training                                  # and restored
    assert all(p.requires_grad for _, p in lora_parameters(lora_model))
    assert list(grads) == list(grads_ref)
    names = {n.split(".")[-3] for n in grads}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert rel_err(losses, loss_ref) < 1e-10
    for n in grads:
        assert grads[n].shape == grads_ref[n].shape
        assert grads_ref[n].abs().max() > 0, n                  # A and B both get gradients
        assert rel_err(grads[n], grads_ref[n]) < 1e-5, n


def test_consume_gets_each_matrix_once_and_keeps_nothing(lora_model, real_tokenizer, oracle):
    enc, (_, grads_ref) = oracle
    got = {}

    def consume(name, g):
        assert name not in got
        got[name] = g
    losses, grads = per_sample_grads(lora_model, *pad_batch(enc, real_tokenizer.pad_token_id),
                                     consume=consume)
    assert grads is None and set(got) == set(grads_ref)
    for n in got:
        assert rel_err(got[n], grads_ref[n]) < 1e-5
    assert rel_err(flat_grads({n: got[n] for n in grads_ref}), flat_grads(grads_ref)) < 1e-5


def test_example_without_target_tokens_is_an_error(lora_model):
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    labels = torch.tensor([[-100, 6, 7], [-100, -100, -100]])
    with pytest.raises(ValueError, match="no target tokens"):
        per_sample_grads(lora_model, ids, torch.ones_like(ids), labels)


# ----------------------------------------------------------------------------------------------
# Adam preconditioning, normalisation, projection (SPEC 5.3 steps 4-5)
def test_adam_precondition_equals_hand_formula():
    g = torch.tensor([[2.0, -1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    v = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    want = []
    for gi, mi, vi in zip([2.0, -1.0, 0.0], [1.0, 0.5, 0.0], [4.0, 0.0, 0.0]):
        m1 = 0.9 * mi + 0.1 * gi
        v1 = 0.999 * vi + 0.001 * gi * gi
        want.append(m1 / math.sqrt(v1 + 1e-8))                  # no bias correction, eps inside
    assert torch.allclose(adam_precondition(g, m, v)[0], torch.tensor(want, dtype=torch.float64),
                          rtol=1e-12, atol=0)
    assert adam_precondition(g, m, v)[0, 2] == 0                 # 0 / sqrt(1e-8), not NaN


def test_normalise_rows():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert torch.equal(normalise_rows(z), torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))


def test_rademacher_blocks_are_signs_and_deterministic():
    a = rademacher_block(0, 3, 2, 10, 64)
    assert a.shape == (10, 64) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, rademacher_block(0, 3, 2, 10, 64))
    assert not torch.equal(a, rademacher_block(1, 3, 2, 10, 64))      # another seed
    assert not torch.equal(a, rademacher_block(0, 4, 2, 10, 64))      # another parameter
    assert not torch.equal(a, rademacher_block(0, 3, 1, 10, 64))      # another block
    assert abs(float(rademacher_block(0, 0, 0, 1024, 1024).mean())) < 0.01
    with pytest.raises(ValueError):
        rademacher_block(0, 0, 0, 4, 12)


def test_projection_equals_one_dense_rademacher_matrix_and_sums_over_parameters():
    from kernels import persample
    torch.manual_seed(0)
    k, dims = 64, [persample.PROJ_BLOCK + 300, 40]               # one parameter spans 2 blocks
    u = [torch.randn(5, d, dtype=torch.float64) for d in dims]
    z = torch.zeros(5, k, dtype=torch.float64)
    for m, um in enumerate(u):
        project(um, 7, m, k, out=z)
    Rt = torch.cat([torch.cat([rademacher_block(7, m, b, min(persample.PROJ_BLOCK, d - s), k,
                                                torch.float64)
                               for b, s in enumerate(range(0, d, persample.PROJ_BLOCK))])
                    for m, d in enumerate(dims)])                # [sum D_m, k]
    assert torch.allclose(z, torch.cat(u, 1) @ Rt / math.sqrt(k), rtol=1e-12, atol=1e-12)
    # each row is projected on its own: the same row alone gives the same result
    assert torch.allclose(project(u[0][2:3], 7, 0, k), project(u[0], 7, 0, k)[2:3], atol=1e-12)


def test_projection_preserves_cosines_within_jl_tolerance():
    torch.manual_seed(1)
    k, n, d = 1024, 24, 3000
    base = torch.randn(4, d)
    X = base[torch.arange(n) % 4] + 0.7 * torch.randn(n, d)      # correlated rows
    X[:, :500] *= 5                                              # and uneven scales
    z = project(X[:, :1800], 0, 0, k) + project(X[:, 1800:], 0, 1, k)
    cos_true = normalise_rows(X) @ normalise_rows(X).T
    cos_proj = normalise_rows(z) @ normalise_rows(z).T
    err = (cos_true - cos_proj).abs().max()
    assert err < 3 / math.sqrt(k), err
    assert cos_true.min() < 0.5 < cos_true.max()                 # a non-trivial geometry


def test_sketch_equals_its_sparse_matrix_and_preserves_cosines():
    torch.manual_seed(4)
    k, D = 32, 100
    u = torch.randn(3, D, dtype=torch.float64)
    h, s = sketch_hash(5, 2, D, k)
    S = torch.zeros(k, D, dtype=torch.float64)
    S[h, torch.arange(D)] = s.double()                           # one +-1 per column
    assert torch.allclose(sketch(u, 5, 2, k), u @ S.T, atol=1e-12)
    assert torch.equal(sketch(u, 5, 2, k), sketch(u, 5, 2, k))
    assert not torch.equal(sketch(u, 6, 2, k), sketch(u, 5, 2, k))
    k, n, d = 1024, 24, 3000
    base = torch.randn(4, d)
    X = base[torch.arange(n) % 4] + 0.7 * torch.randn(n, d)
    z = sketch(X[:, :1800], 0, 0, k) + sketch(X[:, 1800:], 0, 1, k)
    err = (normalise_rows(X) @ normalise_rows(X).T - normalise_rows(z) @ normalise_rows(z).T)
    assert err.abs().max() < 3 / math.sqrt(k), err.abs().max()


# ----------------------------------------------------------------------------------------------
# Features: exact and projected paths, batch independence
def small_moments(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3,
                torch.rand(p.shape, generator=g, dtype=p.dtype) * 1e-5)
            for n, p in lora_parameters(model)}


def test_batch_features_exact_and_projected_equal_their_formulas(lora_model, real_tokenizer,
                                                                  oracle):
    enc, (_, grads_ref) = oracle
    batch = pad_batch(enc, real_tokenizer.pad_token_id)
    moments = small_moments(lora_model)
    u = {n: adam_precondition(g, *moments[n]).flatten(1) for n, g in grads_ref.items()}
    D = sum(x.shape[1] for x in u.values())
    z, path = batch_features(lora_model, *batch, moments=moments, grad_dim=D)
    assert path == "exact" and z.shape == (len(enc), D)
    assert rel_err(z, normalise_rows(torch.cat(list(u.values()), 1))) < 1e-5
    assert torch.allclose(z.norm(dim=1), torch.ones(len(enc), dtype=z.dtype))
    k = 256
    z, path = batch_features(lora_model, *batch, moments=moments, grad_dim=k, seed=3)
    assert path == "projected" and z.shape == (len(enc), k)
    ref = sum(project(um, 3, m, k) for m, um in enumerate(u.values()))
    assert rel_err(z, normalise_rows(ref)) < 1e-5
    z, path = batch_features(lora_model, *batch, moments=moments, grad_dim=k, seed=3,
                             projection="sketch")
    assert path == "sketched" and z.shape == (len(enc), k)
    ref = sum(sketch(um, 3, m, k) for m, um in enumerate(u.values()))
    assert rel_err(z, normalise_rows(ref)) < 1e-5
    z_plain, _ = batch_features(lora_model, *batch, moments=None, grad_dim=D)
    assert rel_err(z_plain, normalise_rows(flat_grads(grads_ref))) < 1e-5
    with pytest.raises(ValueError, match="moments missing"):
        batch_features(lora_model, *batch, moments=dict(list(moments.items())[1:]))
    first = next(iter(moments))
    with pytest.raises(ValueError, match="have shapes"):
        batch_features(lora_model, *batch, moments={**moments, first: (moments[first][0].T,
                                                                        moments[first][1])})


def test_example_features_in_input_order_and_independent_of_batching(lora_model, real_tokenizer,
                                                                     capfd):
    pairs = encoded_examples(real_tokenizer)
    pad = real_tokenizer.pad_token_id
    moments = small_moments(lora_model, 1)
    z4, path = example_features(lora_model, pairs, pad, moments, grad_dim=512,
                                batch_size=4)
    assert path == "projected" and z4.shape == (4, 512) and z4.dtype == torch.float32
    assert "PROJECTED to 512 dims" in capfd.readouterr().err
    z1, _ = example_features(lora_model, pairs[::-1], pad, moments, grad_dim=512,
                             batch_size=1)
    assert torch.allclose(z4, z1.flip(0), atol=1e-6)             # order kept; batch-independent
    again, _ = example_features(lora_model, pairs, pad, moments, grad_dim=512,
                                batch_size=4)
    assert torch.equal(z4, again)                                # deterministic for a seed
    other, _ = example_features(lora_model, pairs, pad, moments, grad_dim=512,
                                batch_size=4, seed=1)
    assert not torch.allclose(z4, other, atol=1e-3)
    ze, path = example_features(lora_model, pairs, pad, moments, grad_dim=10 ** 7)
    assert path == "exact" and "EXACT features" in capfd.readouterr().err
    zs4, path = example_features(lora_model, pairs, pad, moments, grad_dim=512,
                                 batch_size=4, projection="sketch")
    assert path == "sketched" and "SKETCHED to 512 dims" in capfd.readouterr().err
    zs1, _ = example_features(lora_model, pairs, pad, moments, grad_dim=512,
                              batch_size=1, projection="sketch")
    assert torch.allclose(zs4, zs1, atol=1e-6)
    assert (ze @ ze.T - zs4 @ zs4.T).abs().max() < 3 / math.sqrt(512)
    assert (ze @ ze.T - z4 @ z4.T).abs().max() < 3 / math.sqrt(512)


# ----------------------------------------------------------------------------------------------
# Gram blocks (SPEC 5.3 step 6)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_blocks_equal_dense_matrix(dtype):
    torch.manual_seed(2)
    X, Y = torch.randn(37, 16, dtype=dtype), torch.randn(23, 16, dtype=dtype)
    K, Kd = X @ Y.T, X.double() @ Y.double().T
    cols = [0, 4, 5, 22]
    mask = torch.zeros(23, dtype=torch.bool)
    mask[cols] = True
    assert torch.allclose(gram_row_sums(X, Y, block=5), Kd.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(gram_row_sums(X, Y, cols, block=5), Kd[:, cols].sum(1), atol=1e-12)
    assert torch.allclose(gram_row_means(X, Y, mask, block=5), Kd[:, cols].mean(1), atol=1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-12             # same-dtype dense product
    assert torch.allclose(gram_column(X, X[3]), (X @ X.T)[:, 3].double(), rtol=0, atol=tol)
    assert torch.allclose(gram_matrix(X, Y, block=6), K, rtol=0, atol=tol)
    starts = [i for i, _ in gram_blocks(X, Y, block=10)]
    assert starts == [0, 10, 20, 30]
    with pytest.raises(ValueError):
        gram_row_means(X, Y, [])

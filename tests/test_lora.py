"""kernels/lora.py against peft (the trusted implementation): layer outputs, adapter files in both
directions, merging, and the errors a bad adapter folder gives."""
import json
import os
import shutil

import pytest
import torch
from torch import nn


from kernels.base import InputError
from rait.models import load_model
from conftest import make_tiny_llama
from kernels import lora

TOL = dict(rtol=1e-5, atol=1e-6)


def randomize(model, seed=1):
    """Give every LoRA B (zero at init) random values, so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def test_layer_equals_peft_layer():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    ours = lora.LoRALinear(nn.Linear(16, 24), r=4, alpha=8)
    ours.base_layer.load_state_dict(base.state_dict())
    theirs = PeftLinear(base, "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    with torch.no_grad():
        ours.lora_A.weight.normal_()
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 16)
    assert ours.scaling == theirs.scaling["default"] == 2.0
    got, want = ours(x), theirs(x)
    assert isinstance(got, torch.Tensor) and got.shape == want.shape, (
        f"LoRALinear(16 -> 24)(x [3, 5, 16]): expected a tensor of shape {tuple(want.shape)}, "
        f"got {got if not isinstance(got, torch.Tensor) else tuple(got.shape)}")
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: (
        "y = base(x) + (alpha / r) B A x, as peft: expected "
        f"{want[0, 0, :3].tolist()} (first outputs), got {got[0, 0, :3].tolist()}; {m}"))
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **TOL)
    assert not torch.allclose(ours(x), base(x)), "the LoRA update is missing: y equals base(x)"


def test_our_adapter_loads_in_peft(tiny_chat_llama, tmp_path, ids):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    model, _ = load_model(tiny_chat_llama)
    lora.inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    randomize(model)
    model.eval()
    lora.save_adapter(model, tmp_path / "ours", base_name=tiny_chat_llama)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.1)
    assert cfg["base_model_name_or_path"] == tiny_chat_llama
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
                                           tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), **TOL)
    # same key names and shapes as an adapter that peft itself writes for this model
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    task_type="CAUSAL_LM"))
    ref.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "ours" / lora.ADAPTER_WEIGHTS)
    b = load_file(tmp_path / "peft" / lora.ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert cfg["target_modules"] == sorted(
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"])


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_peft_adapter_loads_in_ours(tiny_chat_llama, tmp_path, ids, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama),
                        LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                   task_type="CAUSAL_LM",
                                   init_lora_weights=False))   # random B: a non-trivial adapter
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    model, _ = load_model(tiny_chat_llama, adapter=str(tmp_path / "peft"))
    n = len(lora.lora_modules(model))
    assert n == (14 if targets == "all-linear" else 4)   # 2 layers x 7 linears, or x 2
    assert not torch.allclose(logits(pm, ids), logits(load_model(tiny_chat_llama)[0], ids))
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), **TOL)


def test_merge_equals_unmerged(tiny_chat_llama, tmp_path, ids):
    model, tok = load_model(tiny_chat_llama)
    lora.inject_lora(model, "all-linear", r=4, alpha=16)
    randomize(model)
    before = logits(model, ids)
    merged = lora.merge_lora(model)
    assert not lora.lora_modules(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(logits(merged, ids), before, **TOL)
    merged.save_pretrained(tmp_path / "merged")   # a plain model again
    tok.save_pretrained(tmp_path / "merged")
    again, _ = load_model(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(again, ids), before, **TOL)


@pytest.fixture(scope="module")
def saved_adapter(tiny_chat_llama, tmp_path_factory):
    model, _ = load_model(tiny_chat_llama)
    lora.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    folder = tmp_path_factory.mktemp("adapter")
    lora.save_adapter(model, folder)
    return str(folder)


def expect_error(model_dir, folder, *needles):
    model, _ = load_model(model_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError) as e:
        lora.load_adapter(model, folder)
    msg = str(e.value)
    assert "\n" not in msg
    for s in needles:
        assert s in msg, msg
    assert not lora.lora_modules(model)   # the model is left untouched
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    return msg


def test_adapter_for_another_base(saved_adapter, real_tokenizer, tmp_path):
    wider = make_tiny_llama(tmp_path / "wider", real_tokenizer, hidden=48, inter=96)
    expect_error(wider, saved_adapter, lora.ADAPTER_WEIGHTS, "shape")
    bad = tmp_path / "gpt2-style"
    shutil.copytree(saved_adapter, bad)
    cfg = json.loads((bad / lora.ADAPTER_CONFIG).read_text())
    cfg["target_modules"] = ["c_attn"]
    (bad / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    expect_error(wider, str(bad), lora.ADAPTER_CONFIG, "c_attn", "match no layer")


def test_missing_pickle_and_incomplete(tiny_chat_llama, saved_adapter, tmp_path):
    expect_error(tiny_chat_llama, str(tmp_path / "nope"), "no such adapter folder")
    (tmp_path / "empty").mkdir()
    expect_error(tiny_chat_llama, str(tmp_path / "empty"), lora.ADAPTER_CONFIG, "missing")
    pick = tmp_path / "pickle"
    pick.mkdir()
    shutil.copy(os.path.join(saved_adapter, lora.ADAPTER_CONFIG), pick)
    (pick / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")   # never opened
    expect_error(tiny_chat_llama, str(pick), "adapter_model.bin", "pickle")
    part = tmp_path / "partial"
    shutil.copytree(saved_adapter, part)
    from safetensors.torch import load_file, save_file
    t = load_file(part / lora.ADAPTER_WEIGHTS)
    t.pop(sorted(t)[0])
    save_file(t, part / lora.ADAPTER_WEIGHTS)
    expect_error(tiny_chat_llama, str(part), lora.ADAPTER_WEIGHTS, "missing tensor")
    dora = tmp_path / "dora"
    shutil.copytree(saved_adapter, dora)
    cfg = json.loads((dora / lora.ADAPTER_CONFIG).read_text())
    (dora / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    expect_error(tiny_chat_llama, str(dora), lora.ADAPTER_CONFIG, "use_dora")


def test_trainer_state_roundtrip(tiny_chat_llama, tmp_path):
    model, _ = load_model(tiny_chat_llama)
    lora.inject_lora(model, "all-linear", r=4, alpha=8)
    params = lora.lora_parameters(model)
    moments = {lora.peft_key(n): (torch.randn(p.shape), torch.rand(p.shape)) for n, p in params}
    path = tmp_path / lora.TRAINER_STATE
    lora.save_trainer_state(str(path), moments, step=7, extra={"data_order": torch.arange(5)},
                            metadata={"run_key": "abc"})
    got, step = lora.load_adam_moments(str(tmp_path), with_step=True)
    assert step == 7 and sorted(got) == sorted(n for n, _ in params)   # our parameter names
    assert lora.load_adam_moments(str(tmp_path)).keys() == got.keys()   # the plain form
    for n, _ in params:
        m, v = moments[lora.peft_key(n)]
        assert torch.equal(got[n][0], m) and torch.equal(got[n][1], v)
    t, meta = lora.load_trainer_state(str(path))
    assert meta["run_key"] == "abc" and torch.equal(t["data_order"], torch.arange(5))
    with pytest.raises(InputError, match="trainer_state.safetensors: missing"):
        lora.load_adam_moments(str(tmp_path / "elsewhere"))


def test_training_dropout_is_inverted_dropout():
    """CPU training mode: x * keep / q with P(drop) = p rounded to 2^-16, fresh per call."""
    keep, q = lora.keep_mask((400, 500), 0.1)
    assert keep.dtype == torch.bool and q == 1 - round(0.1 * 65536) / 65536
    assert abs(keep.float().mean().item() - q) < 0.003           # 200k draws: sd 0.0007
    for i in range(4):   # each 16-bit quarter of the 64-bit draws is uniform
        assert abs(keep.view(-1, 4)[:, i].float().mean().item() - q) < 0.005
    layer = lora.LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    torch.manual_seed(5)
    keep, q = lora.keep_mask(x.shape, 0.25)
    want = layer.base_layer(x) + layer.lora_B(layer.lora_A(x * keep)) * layer.scaling / q
    torch.manual_seed(5)
    torch.testing.assert_close(layer.train()(x), want, **TOL)
    assert not torch.equal(layer(x), layer(x))                     # a new mask each call
    torch.testing.assert_close(layer.eval()(x), layer.base_layer(x) + (
        x @ layer.delta_weight().T), **TOL)                        # eval: no dropout

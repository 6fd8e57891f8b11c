"""kernels/lora.py: the LoRA linear layer (Hu et al. 2021) and the functions around it.

    y = base(x) + (alpha / r) * B(A(dropout(x)))        A: kaiming-uniform(a=sqrt 5), B: zeros

A and B are separate nn.Linear modules so that per-sample gradient hooks (kernels/persample.py)
can attach to them. Module and key names follow peft, so adapters round-trip with
`peft.PeftModel.from_pretrained`: a wrapped `...q_proj` holds `base_layer`, `lora_A`, `lora_B`, and
the saved key of `...q_proj.lora_A.weight` is `base_model.model....q_proj.lora_A.weight`.

Also here: merge_lora (fold B A into the base weight), save_adapter / load_adapter (peft's files:
adapter_config.json + adapter_model.safetensors; peft-written adapters load too; anything we cannot
load exactly raises kernels.base.InputError naming the file), and the trainer state
(trainer_state.safetensors: Adam moments, step, RNG, data order) with load_adam_moments for GRAIT.
"""
import json
import math
import os
import re
import sys

import torch
from torch import nn

from kernels.base import InputError, atomic_write_text, temp_name


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as peft / the paper
        nn.init.zeros_(self.lora_B.weight)                             # update starts at zero
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        s, drop = self.scaling, self.lora_dropout
        if self.training and isinstance(drop, nn.Dropout) and drop.p > 0 and x.device.type == "cpu":
            keep, q = keep_mask(x.shape, drop.p)            # same maths as drop(x), cheaper RNG
            x, s = x * keep, s / q
        else:
            x = drop(x)
        # the scaling multiplies the r-wide activations rather than the output (fewer elements);
        # lora_B's input and output gradient still give the same weight gradients (persample.py)
        return y + self.lora_B(self.lora_A(x) * s)

    def delta_weight(self):
        """The dense update (alpha/r) * B @ A, shaped like the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def keep_mask(shape, p):
    """Inverted-dropout keep mask for CPU training: P(drop) = round(p * 2^16) / 2^16, from 16
    random bits per element, four elements per 64-bit draw of the generator (torch's per-element
    bernoulli_ makes dropout cost more than the LoRA matmuls of a small model on CPU). Returns
    (bool mask, keep probability q) so that x * mask / q is unbiased."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)   # 64 bits
    cut = round(p * 65536)
    keep = bits.view(torch.int16)[:n] >= cut - 32768                # uniform int16 >= threshold
    return keep.view(shape), 1 - cut / 65536


def linear_names(model, targets):
    """Names of the nn.Linear modules to wrap. `targets` is a list of module-name suffixes
    (e.g. ["q_proj", "v_proj"]) or "all-linear" (every linear layer except the output head)."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is out_head:
            continue
        if targets == "all-linear" or name.split(".")[-1] in targets:
            names.append(name)
    return names


def inject_lora(model, targets, r, alpha, dropout=0.0):
    """Freeze the model and wrap each target linear layer in a LoRALinear. Returns the wrapped
    module names. Unknown target names raise ValueError."""
    names = linear_names(model, targets)
    if targets != "all-linear":
        found = {n.split(".")[-1] for n in names}
        missing = [t for t in targets if t not in found]
        if missing:
            raise ValueError(f"target modules not found in the model: {', '.join(missing)}")
    _wrap(model, names, r, alpha, dropout)
    return names


def _wrap(model, names, r, alpha, dropout):
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))


def lora_modules(model):
    """(name, LoRALinear) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """(name, parameter) of every LoRA A/B matrix, in module order (A before B)."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


# ----------------------------------------------------------------------------------------------
# Merge: fold the update into the base weight, W <- W + (alpha/r) B A, and drop the wrapper
def merge_lora(model):
    """Replace every LoRALinear by its base nn.Linear with the update added (computed in fp32).
    Returns the same model object, now a plain transformers model (save_pretrained works)."""
    with torch.no_grad():
        for name, m in lora_modules(model):
            w = m.base_layer.weight
            delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling
            w.copy_((w.float() + delta).to(w.dtype))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.base_layer)
    return model


# ----------------------------------------------------------------------------------------------
# Adapter files in peft's format (DESIGN "Adapter"): adapter_config.json + adapter_model.safetensors
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.safetensors"
PEFT_PREFIX = "base_model.model."         # PeftModelForCausalLM.base_model (LoraModel).model
PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# peft options that change the maths of the layer; we refuse them rather than load them wrongly
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False,
               "use_qalora": False, "modules_to_save": None, "layers_to_transform": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
               "target_parameters": None, "trainable_token_indices": None,
               "exclude_modules": None, "alora_invocation_tokens": None}


def peft_key(name):
    """Our parameter name (`model.layers.0.self_attn.q_proj.lora_A.weight`) -> peft's saved key."""
    return PEFT_PREFIX + name


def our_name(key):
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _dropout_p(m):
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def adapter_config(model, base_name):
    """The adapter_config.json dict that peft needs to rebuild our LoRA layers."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers to save")
    r, alpha, p = mods[0][1].r, mods[0][1].alpha, _dropout_p(mods[0][1])
    if any((m.r, m.alpha, _dropout_p(m)) != (r, alpha, p) for _, m in mods):
        raise ValueError("LoRA layers differ in r/alpha/dropout; peft's format needs patterns")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "lora_dropout": p, "target_modules": sorted(n for n, _ in mods),   # as peft writes
            "bias": "none", "base_model_name_or_path": base_name, "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None}


def save_safetensors(path, tensors, metadata=None):
    """Atomic safetensors write (temporary file, then rename)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
              metadata=metadata)
    os.replace(tmp, path)


def save_adapter(model, folder, base_name=None):
    """Write the LoRA weights and config so that peft.PeftModel.from_pretrained loads them."""
    if base_name is None:
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    cfg = adapter_config(model, base_name)
    save_safetensors(os.path.join(folder, ADAPTER_WEIGHTS),
                     {peft_key(n): p for n, p in lora_parameters(model)}, {"format": "pt"})
    atomic_write_text(os.path.join(folder, ADAPTER_CONFIG), json.dumps(cfg, indent=2) + "\n")


def _read_adapter_config(folder):
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such adapter folder")
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing (not a peft adapter folder)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
    if kind != "LORA":
        raise InputError(f"{path}: peft_type is {kind!r}, only LORA adapters are supported")
    for k, default in UNSUPPORTED.items():
        if cfg.get(k, default) not in (default, None, {}, False):
            raise InputError(f"{path}: option {k}={cfg[k]!r} is not supported by kernels/lora.py")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            raise InputError(f"{path}: missing field '{k}'")
    if not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0:
        raise InputError(f"{path}: r must be a positive integer, got {cfg['r']!r}")
    alpha, p = cfg["lora_alpha"], cfg.get("lora_dropout") or 0.0
    if not _finite(alpha) or alpha <= 0:
        raise InputError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    if not _finite(p) or not 0.0 <= p < 1.0:
        raise InputError(f"{path}: lora_dropout must be a number in [0, 1), got {p!r}")
    t = cfg["target_modules"]
    if isinstance(t, str):
        try:
            re.compile(t)
        except re.error as e:
            raise InputError(f"{path}: target_modules {t!r} is not a valid regex ({e})") from None
    elif not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
        raise InputError(f"{path}: target_modules must be a regex string or a list of names, "
                         f"got {t!r}")
    return path, cfg


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _matched_names(model, targets):
    """Module names that peft's target_modules selects: a string is a full-match regex (or
    "all-linear"); a list matches a name equal to an entry or ending in "." + entry."""
    if targets == "all-linear":
        return [(n, model.get_submodule(n)) for n in linear_names(model, "all-linear")]
    names = []
    for n, m in model.named_modules():
        if isinstance(targets, str):
            hit = re.fullmatch(targets, n) is not None
        else:
            hit = any(n == t or n.endswith("." + t) for t in targets)
        if hit:
            names.append((n, m))
    return names


def load_adapter(model, folder):
    """Inject LoRA layers as the adapter's config says, then load its weights (ours or peft's).

    Everything is checked before the model is touched; any mismatch raises InputError naming the
    file. Returns the wrapped module names."""
    cfg_path, cfg = _read_adapter_config(folder)
    w_path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(w_path):
        pick = [f for f in PICKLED if os.path.isfile(os.path.join(folder, f))]
        if pick:
            raise InputError(f"{os.path.join(folder, pick[0])}: refusing to load a pickle "
                             f"checkpoint (it can run code); convert it to {ADAPTER_WEIGHTS}")
        raise InputError(f"{w_path}: missing")
    if lora_modules(model):
        raise InputError(f"{folder}: the model already has LoRA layers; merge them first")
    found = _matched_names(model, cfg["target_modules"])
    bad = [n for n, m in found if not isinstance(m, nn.Linear)]
    if bad:
        kind = type(model.get_submodule(bad[0])).__name__
        raise InputError(f"{cfg_path}: target {bad[0]} is a {kind}, only nn.Linear layers are "
                         "supported")
    if not found:
        raise InputError(f"{cfg_path}: target_modules {cfg['target_modules']!r} match no layer of "
                         "the model (adapter made for another base model?)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(w_path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{w_path}: unreadable ({str(e).splitlines()[0]})") from None
    r = cfg["r"]
    expected = {}
    for n, m in found:
        expected[peft_key(f"{n}.lora_A.weight")] = (r, m.in_features)
        expected[peft_key(f"{n}.lora_B.weight")] = (m.out_features, r)
    for k, shape in expected.items():
        if k not in state:
            raise InputError(f"{w_path}: missing tensor {k} (adapter made for another base model?)")
        if tuple(state[k].shape) != shape:
            raise InputError(f"{w_path}: {k} has shape {tuple(state[k].shape)}, the model needs "
                             f"{shape} (adapter made for another base model?)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{w_path}: unexpected tensor {extra[0]} ({len(extra)} in all)")
    bad = [k for k in expected if not torch.isfinite(state[k]).all()]
    if bad:
        raise InputError(f"{w_path}: tensor {bad[0]} holds NaN or infinite values "
                         f"({len(bad)} tensor(s) in all)")
    base = cfg.get("base_model_name_or_path")
    here = getattr(getattr(model, "config", None), "_name_or_path", None)
    if base and here and os.path.abspath(base) != os.path.abspath(here):
        print(f"[adapter] note: {folder} was trained on {base}; loading it into {here} "
              "(shapes match)", file=sys.stderr)
    names = [n for n, _ in found]
    _wrap(model, names, r, cfg["lora_alpha"], cfg.get("lora_dropout") or 0.0)
    with torch.no_grad():
        for n, p in lora_parameters(model):
            p.copy_(state[peft_key(n)].to(p.dtype))
    return names


# ----------------------------------------------------------------------------------------------
# Trainer state (trainer_state.safetensors): Adam moments keyed like the saved weights, the step,
# RNG states and the data order, all as tensors; plain strings go into the safetensors metadata.
def save_trainer_state(path, moments, step, extra=None, metadata=None):
    """moments: {key: (exp_avg, exp_avg_sq)} with key = peft key (LoRA) or parameter name (full
    fine-tuning); extra: more tensors (e.g. `rng/cpu/0`, `data_order`); metadata: {str: str}."""
    t = {"step": torch.tensor(int(step), dtype=torch.int64)}
    for k, (m, v) in moments.items():
        t[f"exp_avg/{k}"], t[f"exp_avg_sq/{k}"] = m, v
    t.update(extra or {})
    save_safetensors(path, t, {"format": "pt", **(metadata or {})})


def load_trainer_state(path):
    """(tensors, metadata) of a trainer_state.safetensors file; InputError if missing/unreadable."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing (no trainer state; not made by finetune.py?)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def load_adam_moments(adapter_dir, with_step=False):
    """{param_name: (exp_avg, exp_avg_sq)} from an adapter folder's trainer state, keyed by our
    module parameter names (as lora_parameters(model) gives them); with_step=True returns
    (moments, optimizer steps taken). GRAIT's LESS features precondition per-sample gradients
    with these (SPEC 5.3, SPEC 9 #9)."""
    t, _ = load_trainer_state(os.path.join(adapter_dir, TRAINER_STATE))
    out = {}
    for k, m in t.items():
        if k.startswith("exp_avg/"):
            key = k[len("exp_avg/"):]
            out[our_name(key)] = (m, t[f"exp_avg_sq/{key}"])
    return (out, int(t["step"])) if with_step else out

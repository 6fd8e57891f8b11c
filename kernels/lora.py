"""kernels/lora.py: the LoRA linear layer (Hu et al. 2021) and the functions around it.

    y = base(x) + (alpha / r) * B(A(dropout(x)))        A: kaiming-uniform(a=sqrt 5), B: zeros

A and B are separate nn.Linear modules so that per-sample gradient hooks (kernels/persample.py)
can attach to them. Module and key names follow peft, so adapters round-trip with
`peft.PeftModel.from_pretrained`: a wrapped `...q_proj` holds `base_layer`, `lora_A`, `lora_B`, and
the saved key of `...q_proj.lora_A.weight` is `base_model.model....q_proj.lora_A.weight`.
"""
import math

import torch
from torch import nn


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
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self):
        """The dense update (alpha/r) * B @ A, shaped like the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


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
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def lora_modules(model):
    """(name, LoRALinear) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """(name, parameter) of every LoRA A/B matrix, in module order (A before B)."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]

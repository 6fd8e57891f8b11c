"""kernels/embed.py: sentence embeddings for the OEQA certainty (SPEC 2.2), without
sentence-transformers.

all-MiniLM-L6-v2 as sentence-transformers defines it (its modules.json: Transformer -> Pooling ->
Normalize): tokenise with padding to the longest text and truncation at `max_seq_length` (256,
from sentence_bert_config.json), run the BERT encoder, average the last hidden states over the
non-pad tokens (1_Pooling/config.json: pooling_mode_mean_tokens), L2-normalise.
"""
import json
import os
import sys

import torch

DEFAULT_EMBEDDER = os.path.join(sys.prefix, "share", "all-MiniLM-L6-v2")  # `make install`


def mean_pool(hidden, mask):
    """Mean of hidden states [B, T, D] over positions where mask [B, T] is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Embedder:
    """Load once, then `encode(texts)` -> [len(texts), D] float32 unit vectors (CPU)."""

    def __init__(self, name=DEFAULT_EMBEDDER, device="cpu", batch_size=64):
        from transformers import AutoModel, AutoTokenizer
        if os.path.isdir(name) and not any(f.endswith(".safetensors") for f in os.listdir(name)):
            raise ValueError(f"{name}: no .safetensors weights (pickled checkpoints are refused)")
        self.name, self.device, self.batch_size = name, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name, use_safetensors=True).to(device).eval()
        self.max_seq_length = 256                                  # all-MiniLM-L6-v2's setting
        cfg = os.path.join(name, "sentence_bert_config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                self.max_seq_length = json.load(f).get("max_seq_length", self.max_seq_length)

    @torch.no_grad()
    def encode(self, texts):
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                 truncation="longest_first", max_length=self.max_seq_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            out.append(torch.nn.functional.normalize(
                mean_pool(hidden, enc["attention_mask"]).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

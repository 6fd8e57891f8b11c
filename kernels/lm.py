"""kernels/lm.py: batched causal-LM numerics for the knowledge query (SPEC 2).

Every function takes lists of token-id lists of different lengths, left-pads them into one batch
and passes explicit position ids (cumulative attention mask), so each row is computed exactly as
it would be alone (up to float rounding):
- `last_logprobs`: log-softmax of the next token after each sequence (the MCQA letter reader).
- `mean_last_hidden`: the last layer's states averaged over a sequence (CRSS representations).
- `continuation_logliks`: summed log-likelihood of a continuation after a context (option reader).
- `warp_logits` + `sample`: temperature / top-k / top-p sampling with a KV cache and a seeded
  torch.Generator, so a batch seed fixes every sampled token (OEQA reader).
"""
import torch


def left_pad(seqs, pad_id, device):
    """(input_ids, attention_mask, position_ids) for left-padded `seqs` (lists of ints)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def last_logprobs(model, seqs, pad_id):
    """Log-probabilities (float32, [B, vocab]) of the token that follows each sequence."""
    ids, mask, pos = left_pad(seqs, pad_id, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                use_cache=False)
    return out.logits[:, -1].float().log_softmax(-1)


@torch.no_grad()
def mean_last_hidden(model, seqs, pad_id):
    """The last layer's hidden states (after the final norm) averaged over each sequence's tokens
    ([B, hidden] float32): the question representation of CRSS (SPEC 7; README says why the mean
    and not the last token's state)."""
    ids, mask, pos = left_pad(seqs, pad_id, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    m = mask[..., None].to(out.hidden_states[-1].dtype)
    return ((out.hidden_states[-1] * m).sum(1) / m.sum(1)).float().cpu()


@torch.no_grad()
def continuation_logliks(model, contexts, continuations, pad_id):
    """sum_t log p(cont_t | context, cont_<t) for each (context, continuation) pair ([B] float64).

    Rows are left-padded, so every continuation ends at the last column: only the logits of the
    last max(len(cont)) + 1 positions are computed."""
    if any(len(c) == 0 for c in continuations) or any(len(c) == 0 for c in contexts):
        raise ValueError("contexts and continuations must be non-empty")
    seqs = [a + b for a, b in zip(contexts, continuations)]
    keep = max(len(c) for c in continuations) + 1
    ids, mask, pos = left_pad(seqs, pad_id, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep,
                use_cache=False)
    logp = out.logits.double().log_softmax(-1)          # [B, keep, V]; column j predicts j + 1
    total = torch.zeros(len(seqs), dtype=torch.float64)
    for i, cont in enumerate(continuations):
        n = len(cont)
        rows = logp[i, keep - 1 - n: keep - 1]          # positions predicting the n cont tokens
        tgt = torch.tensor(cont, device=rows.device)
        total[i] = rows.gather(-1, tgt[:, None]).sum().cpu()
    return total


def warp_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, then top-k, then top-p (nucleus) filtering, as transformers' sampling warpers
    do in that order; filtered entries become -inf. top_k=0 and top_p=1.0 switch a filter off."""
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)                        # tokens outside the nucleus
        drop[..., -1] = False                            # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model, prompts, n, generator, pad_id, stop_ids, max_new_tokens, temperature=1.0,
           top_k=0, top_p=1.0, done_fn=None):
    """n sampled continuations of each prompt: a list (len(prompts) * n, prompt-major) of token
    lists, each cut before its first stop token. Each prompt is run once and its KV cache copied
    n times; finished rows leave the batch (and the cache), so the step cost follows the rows
    still running.

    Each step draws one token per running row from `generator` (row order fixed), so the same
    seed and the same batch give the same tokens. With top_k the draw is over the k most likely
    tokens (the distribution of warp_logits, except that ties with the k-th logit are not
    kept). `done_fn(row_tokens) -> bool` ends a row early when the caller discards whatever
    would follow (e.g. past a cut marker)."""
    ids, mask, pos = left_pad(prompts, pad_id, model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=model.device)
    out_tokens = [[] for _ in range(len(prompts) * n)]
    rows = list(range(len(out_tokens)))            # output row of each running batch row
    for step in range(max_new_tokens):
        if step:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
        cand = None
        if top_k and top_k < logits.size(-1):      # same distribution, drawn over k candidates
            logits, cand = torch.topk(logits, top_k, dim=-1)
        probs = warp_logits(logits, temperature, 0, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)          # [running rows, 1]
        if cand is not None:
            nxt = cand.gather(-1, nxt)
        keep = []
        for j, (tok, s) in enumerate(zip(nxt[:, 0].tolist(), torch.isin(nxt[:, 0], stop))):
            if not s:
                out_tokens[rows[j]].append(tok)
                if done_fn is None or not done_fn(out_tokens[rows[j]]):
                    keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):                  # drop finished rows from batch and cache
            idx = torch.tensor(keep, device=model.device)
            cache.batch_select_indices(idx)
            rows, nxt, mask = [rows[j] for j in keep], nxt[idx], mask[idx]
        ids = nxt
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
    return out_tokens

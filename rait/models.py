"""rait/models.py: talking to a model: the SPEC 2.3 prompts and the one function that renders
them, tokenisation of (prompt, target) pairs (the chat rendering, or LESS's tulu format for
GRAIT's LESS warm-up, SPEC 5.3), answer matching, and model loading (safetensors only, DESIGN
security).
"""
import os

from kernels.base import InputError
from rait.files import LETTERS, answer_form

# ----------------------------------------------------------------------------------------------
# Prompt and refusal strings, quoted from SPEC 2.3 (exact; do not edit)
MCQA_BASIC_HINT = ("There is a single choice question about {subject}. "
                   "Answer the question by replying A, B, C or D.")
MCQA_REFUSE_HINT = ("There is a single choice question about {subject}. If you know the answer, "
                    "please directly respond with the correct answer A, B, C, or D. If you do not "
                    "know the answer, please respond with \"I don't know.\".")
OEQA_BASIC1 = "{q}"                                                   # eval Init-Basic, rehearsal
OEQA_BASIC2 = "Answer the following question as simple as possible.\nQuestion: {q}\nAnswer:"  # KQ
OEQA_REFUSE1 = ("Answer the following question, and if you don't know the answer, "
                "only reply with 'I don't know': {q}")
IDK = {"mcqa": "I don't know.", "oeqa": "I don't know"}              # SPEC 4 refusal targets
REFUSAL_MARK = "i don't know"                                         # SPEC 7 / 9 #14 detector
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>")   # SPEC 2.2 / 7 Llama-3 stops, ChatML
ARC_SUBJECT = "STEM"                                                  # SPEC 2.3: ARC subject


def mcqa_body(hint, question, choices):
    """SPEC 2.3 MCQA 0-shot body: `{hint}\\nQuestion: {q}\\nA. {A}\\n...Answer: ` (trailing space)."""
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{hint}\nQuestion: {question}{opts}\nAnswer: "


def user_prompt(item, style):
    """The user turn for an item under the BASIC or REFUSE prompt (SPEC 2.3, SPEC 9 #13)."""
    if style not in ("basic", "refuse"):
        raise ValueError(f"unknown prompt style {style!r}")
    if item["task"] == "mcqa":
        subject = item.get("subject") or ARC_SUBJECT
        hint = (MCQA_BASIC_HINT if style == "basic" else MCQA_REFUSE_HINT).format(subject=subject)
        return mcqa_body(hint, item["question"], item["choices"])
    return (OEQA_BASIC1 if style == "basic" else OEQA_REFUSE1).format(q=item["question"])


def has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user, history=()):
    """Render a user turn (after optional (user, assistant) shot turns) as the model sees it.

    Chat models: the tokenizer's own chat template with the generation prompt (DESIGN "Models and
    prompts"). Models without a template (the world): plain text, each shot `user answer\\n`, then
    the user turn and a space, so the response follows directly.
    """
    if has_chat_template(tokenizer):
        msgs = []
        for u, a in history:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{u} {a}\n" for u, a in history) + user + " "


def encode(tokenizer, text):
    """Token ids of a rendered prompt. A chat template already writes BOS into the text, so only
    plain prompts get the tokenizer's special tokens."""
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def raw_prompt_bos(tokenizer):
    """[BOS id] to start a raw (not chat-templated) prompt, as opencompass's HF wrapper does for
    the letter reader (SPEC 2.1), or [] when there is none or when the BOS is a chat control token
    that the chat template writes itself (SmolLM2's BOS is `<|im_start|>`, which opens a chat
    turn: a raw prompt must not start with it). Llama-2/3 templates write BOS through the
    `bos_token` variable, so their BOS stays."""
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or not bos:
        return []
    template = getattr(tokenizer, "chat_template", None)
    return [] if isinstance(template, str) and bos in template else [tokenizer.bos_token_id]


def encode_example(tokenizer, prompt_text, target, max_len=None):
    """(input_ids, labels) for SFT: rendered prompt + target + EOS, loss on target tokens only.

    If longer than max_len, tokens are cut from the left of the prompt, never from the target.
    Returns (ids, labels, n_cut)."""
    p = encode(tokenizer, prompt_text)
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _join(p, t, max_len)


def _join(p, t, max_len):
    """(prompt ids + answer ids, labels -100 on the prompt, n_cut): a prompt too long for max_len
    loses tokens from its left, the answer never."""
    cut = 0
    if max_len is not None and len(p) + len(t) > max_len:
        cut = min(len(p), len(p) + len(t) - max_len)
        p = p[cut:]
    return p + t, [-100] * len(p) + t, cut


# LESS's "tulu" chat format (SPEC 5.3 step 1; LESS less/data_selection/get_training_dataset.py,
# concat_messages + encode_with_messages_format): GRAIT's released warm-up adapter was trained in
# it, not in the model's own chat template. The user part, `<|assistant|>\n` included, gets no loss.
TULU_PROMPT = "<|user|>\n{user}\n<|assistant|>\n"
TULU_ANSWER = "{answer}{eos}\n"
FORMATS = ("chat", "tulu")          # finetune.py --format, construct.py --warmup-format


def tulu_text(user, answer, eos):
    """SPEC 5.3 step 1: `<|user|>\n{prompt}\n<|assistant|>\n{answer}{eos}\n`, each message
    stripped of surrounding whitespace as LESS's concat_messages does (so the MCQA body's
    trailing space after `Answer:` goes). Returns (prompt part, whole text)."""
    prompt = TULU_PROMPT.format(user=user.strip())
    return prompt, prompt + TULU_ANSWER.format(answer=answer.strip(), eos=eos)


def encode_sft(tokenizer, user, target, fmt="chat", max_len=None):
    """(input_ids, labels, n_cut) of one training example: the user turn `user` (not yet
    templated) answered with `target`, loss on the answer only; finetune.py trains on it and
    construct.py's GRAIT feature views take gradients of it.

    chat: render() (the chat template, or the plain prompt) + target + EOS (encode_example).
    tulu: LESS's format (SPEC 5.3 step 1) tokenized as one text with the tokenizer's special
      tokens, labels -100 on the tokens of the prompt part (`<|user|>\n{user}\n<|assistant|>\n`),
      as LESS masks it; the loss covers `{answer}{eos}\n`.
    A prompt too long for max_len loses tokens from its left (both formats)."""
    if fmt == "chat":
        return encode_example(tokenizer, render(tokenizer, user), target, max_len)
    if fmt != "tulu":
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    prompt, text = tulu_text(user, target, tokenizer.eos_token)
    ids = tokenizer(text)["input_ids"]
    n = len(tokenizer(prompt)["input_ids"])
    return _join(ids[:n], ids[n:], max_len)


def format_note(tokenizer, fmt):
    """One line on how `fmt` renders prompts for this tokenizer (said out loud, STYLE)."""
    if fmt == "tulu":
        unk = tokenizer.unk_token_id
        lost = unk is not None and unk in tokenizer(TULU_PROMPT.format(user=""))["input_ids"]
        return ("LESS tulu format (SPEC 5.3)" + ("; this tokenizer reads its <|user|> / "
                "<|assistant|> markers as unknown tokens" if lost else ""))
    return "the chat template" if has_chat_template(tokenizer) else "plain prompt (no chat template)"


def stop_token_ids(model, tok):
    """Ids that end an answer: the tokenizer's and generation_config's EOS, plus the chat stop
    words of STOP_TOKENS that the vocabulary has (SPEC 2.2 / 7)."""
    vocab = tok.get_vocab()
    ids = {tok.eos_token_id} | {vocab[t] for t in STOP_TOKENS if t in vocab}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


def is_refusal(text, strict=False):
    """SPEC 9 #14: case-insensitive `i don't know`, curly apostrophes folded unless strict."""
    t = text.lower()
    if not strict:
        t = t.replace("\u2019", "'").replace("\u2018", "'")
    return REFUSAL_MARK in t


def alias_match(text, aliases):
    """SPEC 2.2 / 7: correct if any alias is a substring of the output, both in the one normal
    form files.answer_form (NFKC, zero-width characters removed, whitespace folded, lower case;
    README "Labels")."""
    t = answer_form(text)
    return any(f and f in t for f in map(answer_form, aliases))



def check_context(model, seqs, items):
    """Refuse a prompt the model cannot see whole (README "Prompt length"): seqs[i], the token ids
    of items[i]'s prompt, must fit max_position_embeddings; past it a model's answers are noise,
    so an item too long stops the run with one line naming it."""
    limit = getattr(model.config, "max_position_embeddings", None)
    for s, it in zip(seqs, items):
        if limit and len(s) > limit:
            raise InputError(f"item {it['id']!r}: prompt of {len(s)} tokens exceeds the model's "
                             f"context of {limit} tokens (max_position_embeddings); shorten or "
                             "drop the item")


def first_line(text):
    """The first non-empty line of a response (raw-prompt answers: evaluate.py --newline-stop)."""
    return next((line for line in text.split("\n") if line.strip()), "")


def target_of(item, reader):
    """The original answer as a training target: the gold letter (letter reader), the gold
    option's text (option reader, SPEC 10) or the gold answer string (OEQA)."""
    if item["task"] == "oeqa":
        return item["answer"]
    if reader == "letter":
        return item["answer"]
    return item["choices"][LETTERS.index(item["answer"])]


# ----------------------------------------------------------------------------------------------
# Models: one loader for every model, weights through safetensors only (DESIGN, security)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TRUST_HELP = ("run Python code shipped with the model folder / hub repo (off by default: only "
              "trust models whose code you have read)")


def device_and_dtype(device=None):
    """bf16 on GPU, fp32 on CPU (DESIGN "Scaling out"), said out loud by the caller."""
    import torch
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return device, dtype


def check_model_dir(path):
    """A local model folder must hold safetensors weights; pickled checkpoints are refused."""
    if not os.path.isdir(path):
        return
    files = os.listdir(path)
    if not any(f.endswith(".json") and f.startswith("config") for f in files):
        raise InputError(f"{path}: not a model folder (no config.json)")
    if not any(f.endswith(".safetensors") for f in files):
        pick = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        why = (f"only pickle checkpoints ({', '.join(sorted(pick))}); they can run arbitrary code "
               "when loaded, convert them to safetensors") if pick else "no .safetensors weights"
        raise InputError(f"{path}: refusing to load: {why}")


def config_mismatch(folder):
    """The first weight of a local model folder whose shape is not the one its config.json
    builds (`name: file (a, b), config (c, d)`), else None; transformers would stop on it with a
    RuntimeError after a table on stderr. Reads the safetensors headers and builds the model on
    the meta device (no memory)."""
    import glob
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from rait.files import read_safetensors_header
    if not os.path.isdir(folder):
        return None
    try:
        with torch.device("meta"):
            want = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).state_dict()
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: cannot load model ({str(e).splitlines()[0]})") from None
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors"))):
        try:
            header = read_safetensors_header(path)
        except InputError:
            return None             # a damaged file: the loader names it
        for k, t in header.items():
            if k in want and tuple(t["shape"]) != tuple(want[k].shape):
                return f"{k}: file {tuple(t['shape'])}, config {tuple(want[k].shape)}"
    return None


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise InputError(f"{name}: the tokenizer has neither a pad nor an eos token (batches "
                             "are padded with one, answers end at the eos)")
        tok.pad_token = tok.eos_token
    return tok


def load_model(name, adapter=None, device=None, dtype=None, trust_remote_code=False):
    """AutoModelForCausalLM + tokenizer (+ a LoRA adapter folder), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from safetensors import SafetensorError
    check_model_dir(name)
    shape_problem = not trust_remote_code and config_mismatch(name)
    if shape_problem:
        raise InputError(f"{name}: cannot load model: config.json does not match the weights "
                         f"({shape_problem})")
    dev, dt = device_and_dtype(device)
    dtype = dtype or dt
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:   # SafetensorError: a truncated file
        raise InputError(f"{name}: cannot load model ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:          # a hub model whose config does not match its weights
        raise InputError(f"{name}: cannot load model ({str(e).splitlines()[0]})") from None
    bad = next((k for k, p in model.state_dict().items()
                if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad:
        raise InputError(f"{name}: the weights hold NaN or infinite values ({bad})")
    tok = load_tokenizer(name, trust_remote_code)
    if adapter:
        from kernels.lora import load_adapter
        load_adapter(model, adapter)
    model.to(dev).eval()
    return model, tok


"""The built-in toy task and the `tiny` model that `opo train` uses by default.

Task: add two numbers of 1-4 digits, writing the column totals from the right
before the answer, so response length grows with the number of columns:

    prompt   "457+68="
    response "15,12,5>525"      (7+8=15, 5+6+1=12, 4+1=5; then the answer)

The model is a transformers LlamaForCausalLM with a character-level fast tokenizer
built with `tokenizers`, so it runs through exactly the code path real models use.
`opo toy-base` rebuilds the shipped weights: it warm-starts the model by supervised
training on worked examples and stops early, leaving room for RL to improve it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parent / "assets" / "tiny"
CHARS = "0123456789+=,>"
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def worked_answer(a: int, b: int) -> tuple[str, str]:
    """(response text, final answer) for a+b with column totals written out."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    totals, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        total = int(xs[i] if i < len(xs) else 0) + int(ys[i] if i < len(ys) else 0) + carry
        totals.append(str(total))
        carry = total // 10
    return ",".join(totals) + ">" + str(a + b), str(a + b)


def make_addition_examples(n: int, seed: int, min_digits: int = 1, max_digits: int = 4) -> list[dict]:
    """n problems `a+b=` with each operand's digit count uniform in [min_digits, max_digits]."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"toy_addition needs 1 <= min_digits <= max_digits, got "
                         f"{min_digits}, {max_digits}")
    rng = random.Random(seed)

    def number() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    out = []
    for _ in range(n):
        a, b = number(), number()
        worked, answer = worked_answer(a, b)
        out.append({"question": f"{a}+{b}=", "answer": answer, "meta": {"worked": worked}})
    return out


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def build_model(tokenizer, hidden: int = 192, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _sft_batch(tokenizer, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response+eos ids, and labels that score only the response."""
    rows, labels = [], []
    for ex in examples:
        p = tokenizer(ex["question"], add_special_tokens=False)["input_ids"]
        r = tokenizer(ex["meta"]["worked"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def build_toy_base(out_dir: str | Path = ASSET_DIR, iters: int = 300, batch_size: int = 64,
                   lr: float = 1e-3, seed: int = 0, log=print) -> Path:
    """Deterministically warm-start the tiny model and save it as a HF folder (safetensors)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    examples = make_addition_examples(iters * batch_size, seed=seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start = time.time()
    for it in range(iters):
        ids, lab = _sft_batch(tokenizer, examples[it * batch_size:(it + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 50 == 0 or it == iters - 1:
            log(f"toy-base iter {it:4d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

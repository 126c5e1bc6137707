"""The built-in toy task and the `tiny` model that `opo train` uses by default.

Task: add two numbers of the same number of digits (2-4 by default), writing the column totals from the right
before the answer, so response length grows with the number of columns:

    prompt   "457+68="
    response "15,12,5>525"      (7+8=15, 5+6+1=12, 4+1=5; then the answer)

The model is a transformers LlamaForCausalLM with a character-level fast tokenizer
built with `tokenizers`, so it runs through exactly the code path real models use.
`opo toy-base` rebuilds the shipped weights by supervised training on worked examples
that are deliberately imperfect: in `slip_rate` (70%) of the demonstrations the carries
are forgotten. The warm-started model therefore solves carry-free problems and, when
sampled, carries correctly only some of the time; greedy decoding mostly forgets. The
verifier's reward is what teaches it to carry, so RL has clear, measurable work to do,
much like RL after supervised fine-tuning on noisy human demonstrations.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parent.parent / "assets" / "tiny"
MODEL_NAME = "tiny"          # the model.path that resolves to ASSET_DIR
REWARD = "exact_match"       # the answer after ">" compared as text
PLAIN_MAX_NEW_TOKENS = 32    # enough for 4-digit working
CHARS = "0123456789+=,>"
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def worked_answer(a: int, b: int, carry_in: bool = True) -> tuple[str, str]:
    """(response text, final answer) for a+b with column totals written out.

    carry_in=False is the classic slip: each column's carry is never added to the next
    column, and the answer is read off those wrong totals.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    totals, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        total = int(xs[i] if i < len(xs) else 0) + int(ys[i] if i < len(ys) else 0) + carry
        totals.append(total)
        carry = total // 10 if carry_in else 0
    digits = [t % 10 for t in totals] + ([totals[-1] // 10] if totals[-1] >= 10 else [])
    answer = str(int("".join(map(str, reversed(digits)))))
    return ",".join(map(str, totals)) + ">" + answer, answer


def make_addition_examples(n: int, seed: int, min_digits: int = 2, max_digits: int = 4) -> list[dict]:
    """n problems `a+b=`; both operands have d digits, d uniform in [min_digits, max_digits].

    Equal widths keep the columns aligned, so a model's mistakes are carries and sums
    rather than reading the wrong digit, which is what RL can fix quickly.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"toy_addition needs 1 <= min_digits <= max_digits, got "
                         f"{min_digits}, {max_digits}")
    rng = random.Random(seed)

    def number(d: int) -> int:
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    out = []
    for _ in range(n):
        d = rng.randint(min_digits, max_digits)
        a, b = number(d), number(d)
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


def demonstrations(n: int, seed: int, slip_rate: float) -> list[dict]:
    """Training demonstrations for the warm start; a `slip_rate` share forget carries."""
    rng = random.Random(seed + 7)
    out = []
    for ex in make_addition_examples(n, seed=seed):
        if rng.random() < slip_rate:
            a, b = map(int, ex["question"][:-1].split("+"))
            ex = {**ex, "meta": {"worked": worked_answer(a, b, carry_in=False)[0]}}
        out.append(ex)
    return out


def build_toy_base(out_dir: str | Path = ASSET_DIR, iters: int = 1000, batch_size: int = 64,
                   lr: float = 2e-3, slip_rate: float = 0.7, seed: int = 0, log=print,
                   snapshot_every: int = 0, examples: list[dict] | None = None) -> Path:
    """Deterministically warm-start the tiny model and save it as a HF folder (safetensors).

    The same command gives the same weights on the same machine and torch thread count.
    `examples` (at least iters * batch_size, the text to imitate in meta["worked"])
    replaces the toy task's demonstrations, so other built-in tasks reuse this recipe.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    if examples is None:
        examples = demonstrations(iters * batch_size, seed=seed + 1, slip_rate=slip_rate)
    elif len(examples) < iters * batch_size:
        raise ValueError(f"build_toy_base needs {iters * batch_size} examples, got {len(examples)}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(iters // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, 0.55 + 0.45 * math.cos(math.pi * min(i / iters, 1.0))))
    model.train()
    start = time.time()
    for it in range(iters):
        ids, lab = _sft_batch(tokenizer, examples[it * batch_size:(it + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if it % 100 == 0 or it == iters - 1:
            log(f"toy-base iter {it:4d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
        if snapshot_every and (it + 1) % snapshot_every == 0:
            _save(model, tokenizer, Path(f"{out_dir}_{it + 1}"))
    return _save(model, tokenizer, Path(out_dir))


def _save(model, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

"""Held-out evaluation: pass@1 averaged over n samples, unbiased pass@k and maj@k, length.

`opo train` calls `evaluate` for its periodic held-out accuracy and `opo eval` calls
it for reports, so both measure the same thing the same way.
"""

from __future__ import annotations

from typing import Callable

from opo.config import Config, PromptConfig
from opo.data import encode_prompts, source_defaults, uses_chat_template
from opo.metrics import maj_at_k, pass_at_k
from opo.rewards import normalise_answer
from opo.rollout import SamplingParams


def eval_max_new_tokens(cfg: Config, tokenizer, training: bool = False) -> int:
    """The evaluation token limit: eval.max_new_tokens, or when that is 0, in training
    rollout.max_new_tokens (evaluate what is trained), else the data source's default for
    chat or plain prompts (see opo.data.SourceDefaults)."""
    if cfg.eval.max_new_tokens > 0:
        return cfg.eval.max_new_tokens
    if training:
        return cfg.rollout.max_new_tokens
    defaults = source_defaults(cfg.data.source)
    chat = uses_chat_template(tokenizer, cfg.prompt)
    return defaults.max_new_tokens if chat else defaults.plain_max_new_tokens


def evaluate(engine, tokenizer, examples: list[dict], scorer, prompt_cfg: PromptConfig, *,
             samples: int = 1, temperature: float = 0.0, k: list[int] = (1,),
             max_new_tokens: int = 256, top_p: float = 1.0, chunk: int = 0,
             progress: Callable[[int, int], None] | None = None,
             on_sample: Callable[[dict], None] | None = None) -> dict:
    """Sample `samples` responses per example and score them.

    Returns {"pass@1", "pass@K", "maj@K" for each K in k, "mean_length", "accuracy"
    (= pass@1), "truncated_rate", "problems", "samples", "reward_errors"}. pass@K and maj@K
    are unbiased estimates over all `samples` responses (see opo.metrics). `chunk` bounds how
    many problems are generated at once; `progress(done, total)` is called after each chunk.
    `on_sample(record)` is called once per response, in order, with a dict: problem (index
    into `examples`), sample, question, prompt, response, answer (what the reward read, or
    None), gold, reward, correct, finish_reason, length.
    """
    ks = sorted({1, *k})
    if any(not 1 <= kk <= samples for kk in ks):
        raise ValueError(f"eval k values {list(k)} must lie between 1 and samples={samples}")
    if not examples:
        raise ValueError("evaluate needs at least one example")
    params = SamplingParams(n=samples, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens)
    chunk = chunk or len(examples)
    sums = {f"pass@{kk}": 0.0 for kk in ks} | {f"maj@{kk}": 0.0 for kk in ks}
    total_len = errors = truncated_count = 0
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        texts, ids = encode_prompts(tokenizer, [ex["question"] for ex in part], prompt_cfg)
        batch = engine.generate(ids, params)
        truncated = [reason == "length" for reason in batch.finish_reasons]
        result = scorer.score([texts[g] for g in batch.group_ids], batch.texts,
                              [part[g] for g in batch.group_ids], truncated=truncated)
        errors += result.errors
        total_len += sum(batch.lengths)
        truncated_count += sum(truncated)
        for g in range(len(part)):
            rows = range(g * samples, (g + 1) * samples)  # generate keeps each group together
            correct = [result.correct[i] for i in rows]
            # Votes count the answer the reward read, normalised ("1,000." and "1000" agree).
            votes = [None if result.answers[i] is None else normalise_answer(result.answers[i])
                     for i in rows]
            for kk in ks:
                sums[f"pass@{kk}"] += pass_at_k(samples, sum(correct), kk)
                sums[f"maj@{kk}"] += maj_at_k(votes, correct, kk)
        if on_sample:
            for i, g in enumerate(batch.group_ids):
                on_sample({"problem": start + g, "sample": i - g * samples,
                           "question": part[g]["question"], "prompt": texts[g],
                           "response": batch.texts[i], "answer": result.answers[i],
                           "gold": part[g]["answer"], "reward": result.rewards[i],
                           "correct": result.correct[i], "finish_reason": batch.finish_reasons[i],
                           "length": batch.lengths[i]})
        if progress:
            progress(min(start + chunk, len(examples)), len(examples))
    n = len(examples)
    out = {key: value / n for key, value in sums.items()}
    out.update(accuracy=out["pass@1"], mean_length=total_len / (n * samples),
               truncated_rate=truncated_count / (n * samples), problems=n, samples=samples,
               reward_errors=errors)
    return out

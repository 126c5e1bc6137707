"""Held-out evaluation: pass@1 averaged over n samples, unbiased pass@k and maj@k, length.

`opo train` calls `evaluate` for its periodic held-out accuracy and `opo eval` calls
it for reports, so both measure the same thing the same way.
"""

from __future__ import annotations

from typing import Callable

from opo.config import Config, ConfigError, PromptConfig, apply_overrides, load_config
from opo.data import SOURCES, encode_prompts, load_split, source_defaults, uses_chat_template
from opo.metrics import maj_at_k, pass_at_k
from opo.models import load_policy
from opo.rewards import RewardScorer, normalise_answer
from opo.rollout import SamplingParams, engine_from_config


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


# --------------------------------------------------------------------------- a whole evaluation

def eval_settings(*, model: str | None = None, preset: str | None = None, task: str | None = None,
                  data: str | None = None, task_config: dict | None = None, reward: str | None = None,
                  samples: int | None = None, k: list[int] | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  max_new_tokens: int | None = None, batch: int | None = None,
                  overrides: list[str] = ()) -> Config:
    """The Config an evaluation runs with: a preset (or the defaults), then these settings,
    then dotted `overrides`. None leaves a setting to the preset or the data source.

    A preset's task settings (task_config, reward, instruction) belong to its own task: when
    `task`/`data` names a different one, those come from the new source's defaults instead
    (opo.data.SourceDefaults). Likewise its prompt template belongs to its model: another
    `model` gets template auto (its chat template if it has one). Raises ConfigError for any
    bad setting.
    """
    import difflib

    cfg = load_config(preset) if preset else Config()
    preset_task = (cfg.data.source, cfg.data.task) if preset else None
    if task and data:
        raise ConfigError("give --task or --data (a task or a data file), not both")
    if task:
        builtin = task in SOURCES and task != "reasoning_gym"
        cfg.data.source, cfg.data.task = (task, "") if builtin else ("reasoning_gym", task)
    if data:
        cfg.data.source, cfg.data.task = data, ""
    if (cfg.data.source, cfg.data.task) != preset_task:
        defaults = source_defaults(cfg.data.source)
        cfg.data.task_config = {}
        cfg.reward.kind = defaults.reward
        cfg.prompt.instruction = defaults.instruction
    if task_config is not None:
        cfg.data.task_config = dict(task_config)
    if reward:
        cfg.reward.kind = reward
    if model and model != cfg.model.path:
        cfg.model.path = model
        cfg.prompt.template = "auto"  # a preset's template suits its own model; a chat model gets its own
    if samples is not None:
        cfg.eval.samples = samples
        if k is None:  # the preset's k values were chosen for its own samples; keep those that fit
            cfg.eval.k = [x for x in cfg.eval.k if x <= samples] or [1]
    if k is not None:
        cfg.eval.k = list(k)
        cfg.eval.samples = max(cfg.eval.samples, *cfg.eval.k)
    if temperature is not None:
        cfg.eval.temperature = temperature
    elif cfg.eval.samples > 1 and cfg.eval.temperature == 0:
        cfg.eval.temperature = 1.0  # n identical greedy samples would measure nothing
    if top_p is not None:
        cfg.eval.top_p = top_p
    if max_new_tokens is not None:
        cfg.eval.max_new_tokens = max_new_tokens
    if batch is not None:
        cfg.eval.batch_size = batch
    try:
        return apply_overrides(cfg, list(overrides))  # overrides win over everything; validates
    except ConfigError as exc:
        close = difflib.get_close_matches(task or "", [s for s in SOURCES if s != "reasoning_gym"], n=1)
        if task and close and task not in SOURCES:
            raise ConfigError(f"{exc} (or did you mean task {close[0]}?)") from None
        raise


def run_evaluation(cfg: Config, *, limit: int = 0, seed: int = 0,
                   on_sample: Callable[[dict], None] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Load cfg's model and held-out problems (the first `limit`, 0 = all) and evaluate them.

    Returns `evaluate`'s figures plus what was run: model, task, reward, answer_format,
    prompt, temperature, top_p, max_new_tokens, seed.
    """
    import random

    import numpy as np
    import torch

    split = load_split(cfg.data)
    held_out = split.held_out[:limit] if limit else split.held_out
    model, tokenizer = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)
    engine = engine_from_config(cfg, model, tokenizer, log or print)
    max_new_tokens = eval_max_new_tokens(cfg, tokenizer)
    task = cfg.data.task or cfg.data.source
    template = "chat" if uses_chat_template(tokenizer, cfg.prompt) else "plain"
    if log:
        log(f"opo eval: {cfg.model.path} on {task}, {len(held_out)} of {len(split.held_out)} held-out "
            f"problems; reward {cfg.reward.kind} (answer_format {cfg.reward.answer_format}), "
            f"{template} prompt, at most {max_new_tokens} new tokens")
    if cfg.trainer.threads:  # trainer.threads=1 helps on a machine shared with other jobs
        torch.set_num_threads(cfg.trainer.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with RewardScorer.from_config(cfg.reward) as scorer:
        result = evaluate(engine, tokenizer, held_out, scorer, cfg.prompt, samples=cfg.eval.samples,
                          temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, k=cfg.eval.k,
                          max_new_tokens=max_new_tokens, chunk=cfg.eval.batch_size,
                          progress=progress, on_sample=on_sample)
    result.update(model=cfg.model.path, task=task, reward=cfg.reward.kind,
                  answer_format=cfg.reward.answer_format, prompt=template,
                  temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                  max_new_tokens=max_new_tokens, seed=seed)
    return result


def evaluate_model(model: str | None = None, *, limit: int = 0, seed: int = 0,
                   samples_out: str | None = None, **settings) -> dict:
    """Evaluate a model on held-out problems: the Python form of `opo eval`.

        opo.evaluate("runs/x/final", task="toy_addition", samples=4, k=[1, 4], limit=50)

    `settings` are those of `eval_settings` (preset, task, data, task_config, reward,
    samples, k, temperature, top_p, max_new_tokens, batch, overrides). `samples_out` writes
    every prompt, response, extracted answer, gold answer and reward as JSON lines.
    """
    import json
    from pathlib import Path

    cfg = eval_settings(model=model, **settings)
    if samples_out is None:
        return run_evaluation(cfg, limit=limit, seed=seed)
    Path(samples_out).parent.mkdir(parents=True, exist_ok=True)
    with open(samples_out, "w", encoding="utf-8") as f:
        return run_evaluation(cfg, limit=limit, seed=seed,
                              on_sample=lambda r: f.write(json.dumps(r, ensure_ascii=False) + "\n"))

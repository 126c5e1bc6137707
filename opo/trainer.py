"""The training loop. This is the only place that knows the order of the steps:

    prompts -> rollouts -> rewards -> advantages -> one optimiser step -> metrics
            (-> held-out evaluation, checkpoint)

Exact on-policy (algo.updates_per_batch = 1, the OPO setting): every rollout batch
feeds exactly one optimiser step, so the importance ratio is 1 and nothing is clipped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opo import checkpoint as ckpt
from opo.advantages import compute_advantages
from opo.config import Config, apply_overrides, dump_yaml, from_dict, read_yaml
from opo.data import PromptSampler, encode_prompts, load_examples
from opo.evaluate import evaluate
from opo.loss import policy_loss
from opo.metrics import KLProbe, repetition_rate
from opo.models import eos_ids, load_policy
from opo.rewards import RewardScorer
from opo.rollout import SamplingParams, make_engine
from opo.sequences import batched_logprobs, micro_batches, pack, score

TIMING_FIELDS = ("seconds", "wall_seconds")  # the only metrics that differ across a resume


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    """Everything besides weights and optimiser that a checkpoint must restore."""

    step: int = 0                 # rollout batches done
    policy_version: int = 0       # optimiser steps applied to the weights
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    initial_accuracy: float = float("nan")
    sampler: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    wall_seconds: float = 0.0


def lr_lambda(cfg: Config):
    warm, total, kind = cfg.optim.warmup_steps, max(cfg.trainer.steps, 1), cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def policy_update(model, optimizer, packed, advantages, cfg: Config, ref_model=None) -> dict:
    """The optimiser step(s) for one rollout batch; returns loss statistics.

    updates_per_batch = 1: one step on the whole batch, old_logp = None (ratio == 1).
    updates_per_batch = U > 1: U mini-batch steps with stored old log-probs and PPO
    clipping; this is the off-policy comparison the paper makes, not the default.
    """
    a = cfg.algo
    n = packed.input_ids.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    old_logp = None
    if a.updates_per_batch > 1:
        old_logp = batched_logprobs(model, packed, a.micro_batch_size)
    order = torch.randperm(n) if a.updates_per_batch > 1 else torch.arange(n)
    stats: dict[str, float] = {"loss": 0.0, "entropy": 0.0, "grad_norm": 0.0, "clip_frac": 0.0,
                               "bad_updates": 0}
    batch_tokens = float(packed.response_mask.sum())
    for chunk in order.chunk(a.updates_per_batch):
        mini = packed.rows(chunk)
        total_tokens = float(mini.response_mask.sum())
        optimizer.zero_grad(set_to_none=True)
        mini_loss = 0.0
        for s in micro_batches(len(chunk), a.micro_batch_size):
            micro = mini.rows(s)
            logp, entropy = score(model, micro, with_entropy=True, entropy_grad=a.entropy_coef > 0)
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = score(ref_model, micro)[0]
            loss, st = policy_loss(
                logp, None if old_logp is None else old_logp[chunk][s], advantages[chunk][s],
                micro.response_mask, agg=a.loss_agg, total_tokens=total_tokens,
                total_seqs=float(len(chunk)), clip_eps=a.clip_eps if old_logp is not None else None,
                entropy=entropy, entropy_coef=a.entropy_coef, ref_logp=ref, kl_coef=a.kl_coef)
            loss.backward()
            mini_loss += float(loss.detach())
            stats["clip_frac"] += st["clip_frac"] / a.updates_per_batch
            stats["entropy"] += float((entropy.detach() * micro.response_mask).sum()) / batch_tokens
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not (math.isfinite(grad_norm) and math.isfinite(mini_loss)):
            optimizer.zero_grad(set_to_none=True)  # a NaN/inf step is skipped, never applied
            stats["bad_updates"] += 1
            continue
        optimizer.step()
        stats["loss"] += mini_loss / a.updates_per_batch
        stats["grad_norm"] += grad_norm / a.updates_per_batch
    optimizer.zero_grad(set_to_none=True)
    return stats


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run (or continue) training; return the summary that is also written to summary.json."""
    started = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    if not resume and ckpt.list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} already holds checkpoints; continue it with "
                            f"`opo train --resume {run_dir}` or choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    model, tokenizer = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)
    device = next(model.parameters()).device
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ref_model = None
    if cfg.algo.kl_coef > 0:  # only then does a second copy of the model live in memory
        ref_model = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)[0]
        ref_model.eval().requires_grad_(False)
    train_set, held_out = load_examples(cfg.data)
    sampler = PromptSampler(len(train_set), cfg.trainer.seed)
    scorer = RewardScorer(kind=cfg.reward.kind, format_weight=cfg.reward.format_weight,
                          timeout_s=cfg.reward.timeout_s, workers=cfg.reward.workers,
                          isolate=cfg.reward.isolate)
    engine = make_engine(cfg.rollout.engine, model, tokenizer, eos_ids(model, tokenizer), cfg.rollout.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = RunState()
    logprobs = lambda p: batched_logprobs(model, p, cfg.algo.micro_batch_size)  # noqa: E731
    held_eval = lambda: evaluate(engine, tokenizer, held_out, scorer, cfg.prompt,  # noqa: E731
                                 samples=cfg.eval.samples, temperature=cfg.eval.temperature, k=cfg.eval.k,
                                 max_new_tokens=cfg.rollout.max_new_tokens, chunk=cfg.eval.batch_size)

    if resume:
        state, probe = _restore(run_dir, model, optimizer, scheduler, sampler)
        engine.sync_weights(model, state.policy_version)
        log(f"resumed {run_dir} at step {state.step}")
    else:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "metrics.jsonl").write_text("")
        probe = _make_probe(engine, tokenizer, train_set, cfg, logprobs)
        state.initial_accuracy = held_eval()["accuracy"]
        state.wall_seconds = time.perf_counter() - started  # set-up and the first evaluation
        log(f"initial held-out accuracy {state.initial_accuracy:.3f} on {len(held_out)} problems")

    params = SamplingParams(n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens)
    bar = _progress(cfg, state.step)
    accuracy = state.rows[-1].get("eval_accuracy", state.initial_accuracy) if state.rows else state.initial_accuracy
    with _StopFlag() as stop, open(run_dir / "metrics.jsonl", "a") as metrics_file:
        while state.step < cfg.trainer.steps and not stop.requested:
            t0 = time.perf_counter()
            examples = [train_set[i] for i in sampler.next_batch(cfg.rollout.prompts_per_step)]
            prompt_texts, prompt_ids = encode_prompts(tokenizer, [ex["question"] for ex in examples], cfg.prompt)
            rollout = engine.generate(prompt_ids, params)
            if cfg.algo.updates_per_batch == 1 and rollout.policy_version != state.policy_version:
                raise TrainingError(f"exact on-policy training refuses responses from policy version "
                                    f"{rollout.policy_version}; the weights are at version {state.policy_version}")
            rewards = scorer.score([prompt_texts[g] for g in rollout.group_ids], rollout.texts,
                                   [examples[g] for g in rollout.group_ids])
            if rewards.errors and not any(row.get("reward_errors") for row in state.rows):
                log(f"step {state.step + 1}: {rewards.errors} reward checks failed and scored 0 "
                    f"({rewards.timeouts} timeouts); first: {rewards.error_messages[0]}")
            r = torch.tensor(rewards.rewards, dtype=torch.float32)
            lengths = torch.tensor(rollout.lengths, dtype=torch.float32)
            groups = torch.tensor(rollout.group_ids)
            adv = compute_advantages(cfg.algo.estimator, r, lengths, groups)
            packed = pack(rollout.prompt_ids, rollout.response_ids, tokenizer.pad_token_id).to(device)
            stats = policy_update(model, optimizer, packed, adv.to(device), cfg, ref_model)

            state.step += 1
            if stats["bad_updates"] == cfg.algo.updates_per_batch:
                state.bad_steps_in_row += 1
                state.skipped_steps += 1
                log(f"step {state.step}: loss or gradient is NaN/inf; step skipped "
                    f"({state.bad_steps_in_row} in a row)")
                if state.bad_steps_in_row >= cfg.trainer.max_bad_steps:
                    raise TrainingError(f"{state.bad_steps_in_row} consecutive steps had a NaN/inf loss or "
                                        f"gradient; stopping. Lower optim.lr or check the rewards.")
            else:
                state.bad_steps_in_row = 0
                scheduler.step()
                state.policy_version += cfg.algo.updates_per_batch - stats["bad_updates"]
                engine.sync_weights(model, state.policy_version)

            group_min = torch.full((len(examples),), math.inf).scatter_reduce(0, groups, r, "amin")
            group_max = torch.full((len(examples),), -math.inf).scatter_reduce(0, groups, r, "amax")
            row = {
                "step": state.step,
                "reward_mean": float(r.mean()),
                "accuracy": sum(rewards.correct) / len(rewards.correct),
                "entropy": stats["entropy"],
                "kl_to_init": probe.estimate(logprobs) if probe else None,
                "response_length_mean": float(lengths.mean()),
                "truncated_rate": rollout.finish_reasons.count("length") / len(rollout),
                "repetition_rate": repetition_rate(rollout.response_ids, cfg.metrics.repetition_ngram),
                "grad_norm": stats["grad_norm"],
                "loss": stats["loss"],
                "clip_frac": stats["clip_frac"],
                "adv_mean": float(adv.mean()),
                "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
                "zero_variance_groups": float((group_min == group_max).float().mean()),
                "reward_errors": rewards.errors,
                "reward_timeouts": rewards.timeouts,
                "skipped_steps": state.skipped_steps,
                "policy_version": state.policy_version,
                "lr": scheduler.get_last_lr()[0],
                "tokens": int(lengths.sum()),
            }
            if (cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0) or state.step == cfg.trainer.steps:
                accuracy = held_eval()["accuracy"]
                row["eval_accuracy"] = accuracy
            row["seconds"] = time.perf_counter() - t0
            state.wall_seconds += row["seconds"]
            state.rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{accuracy:.3f}")
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < cfg.trainer.steps:
                _save(run_dir, cfg, model, optimizer, scheduler, sampler, state, probe)
        bar.close()
        if stop.requested and state.step < cfg.trainer.steps:
            _save(run_dir, cfg, model, optimizer, scheduler, sampler, state, probe)
            log(f"stopped after step {state.step}; resume with: opo train --resume {run_dir}")
            scorer.close()
            return {"stopped_at": state.step}

    _save(run_dir, cfg, model, optimizer, scheduler, sampler, state, probe)
    final_accuracy = state.rows[-1]["eval_accuracy"] if state.rows else held_eval()["accuracy"]
    _save_final(run_dir, model, tokenizer)
    scorer.close()
    summary = {"initial_accuracy": state.initial_accuracy, "final_accuracy": final_accuracy,
               "steps": state.step, "wall_seconds": state.wall_seconds, "estimator": cfg.algo.estimator,
               "skipped_steps": state.skipped_steps,
               "reward_errors": sum(row["reward_errors"] for row in state.rows), "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"held-out accuracy {summary['initial_accuracy']:.3f} -> {final_accuracy:.3f} "
        f"in {state.step} steps, {state.wall_seconds:.0f}s of training; run folder {run_dir}")
    return summary


def _make_probe(engine, tokenizer, train_set, cfg: Config, logprobs) -> KLProbe | None:
    """Sample the fixed KL probe from the starting policy (temperature 1)."""
    n = cfg.metrics.kl_probe_size
    if n == 0:
        return None
    _, ids = encode_prompts(tokenizer, [ex["question"] for ex in train_set[:n]], cfg.prompt)
    batch = engine.generate(ids, SamplingParams(n=1, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens))
    packed = pack(batch.prompt_ids, batch.response_ids, tokenizer.pad_token_id)
    return KLProbe(packed, logprobs(packed).cpu())


def _save(run_dir, cfg, model, optimizer, scheduler, sampler, state: RunState, probe) -> None:
    state.sampler = sampler.state_dict()
    state.scheduler = scheduler.state_dict()
    rng_plain, rng_tensors = ckpt.rng_state()
    payload = {**state.__dict__, "rng": rng_plain}
    tensors = {**rng_tensors, **(probe.state_dict() if probe else {})}
    ckpt.save_checkpoint(run_dir, state.step, model=model, optimizer=optimizer, state=payload,
                         tensors=tensors, keep=cfg.checkpoint.keep)


def _restore(run_dir: Path, model, optimizer, scheduler, sampler):
    path = ckpt.latest_checkpoint(run_dir)
    payload, tensors = ckpt.load_checkpoint(path, model=model, optimizer=optimizer)
    ckpt.set_rng_state(payload.pop("rng"), tensors)
    state = RunState(**payload)
    sampler.load_state_dict(state.sampler)
    scheduler.load_state_dict(state.scheduler)
    # Rows logged after this checkpoint by the interrupted run are replayed, so drop them.
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in state.rows))
    os.replace(tmp, run_dir / "metrics.jsonl")
    probe = KLProbe.from_state_dict(tensors) if "probe.logp0" in tensors else None
    return state, probe


def _save_final(run_dir: Path, model, tokenizer) -> None:
    tmp, final = run_dir / "final.tmp", run_dir / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _progress(cfg: Config, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.steps, initial=initial, disable=not cfg.trainer.progress,
                desc="opo train", unit="step", dynamic_ncols=True)


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The resolved config of an existing run, with optional overrides (e.g. more steps)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ckpt.CheckpointError(f"cannot resume: {path} does not exist")
    return apply_overrides(from_dict(read_yaml(path)), overrides)

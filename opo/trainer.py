"""The training loop. This is the only place that knows the order of the steps:

    set up -> [ rollout -> rewards -> advantages -> update -> log -> evaluate -> checkpoint ]*

Exact on-policy (algo.updates_per_batch = 1, the OPO setting): every rollout batch
feeds exactly one optimiser step, so the importance ratio is 1 and nothing is clipped;
every step also checks that the trainer's log-probs of the sampled tokens equal the
sampler's (`logp_mismatch_*`), so "on-policy" is measured, not assumed.

Under torchrun every rank runs this same loop on its share of whole prompt groups;
`opo.parallel` does the reductions, so all ranks log, skip, stop and save alike, and
only rank 0 writes the run folder. One process is the same code with a world of one.
"""

from __future__ import annotations

import json
import math
import time

import torch

from opo import parallel
from opo.advantages import compute_advantages, estimator_needs
from opo.console import StopFlag, print_profile, progress_bar, report_progress
from opo.data import encode_prompts
from opo.gradnorm import response_weights
from opo.metrics import repetition_counts
from opo.run import (Run, TrainingError, default_run_dir, load_run_config, save_final, set_up, write_row,
                     write_samples)
from opo.schema import Config
from opo.sequences import pack
from opo.update import OffPolicyError, PhaseTimer, policy_update, sampling_dist

__all__ = ["train", "train_step", "finish", "TrainingError", "load_run_config", "default_run_dir",
           "is_timing_field"]

# Fields that legitimately differ between a resumed and an uninterrupted run.
TIMING_PREFIXES = ("seconds", "wall_seconds", "eval_seconds", "time_")
TIMING_FIELDS = ("seconds", "wall_seconds", "eval_seconds")


def is_timing_field(name: str) -> bool:
    return name.startswith(TIMING_PREFIXES)


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run (or continue) training; return the summary that is also written to summary.json.

    Under torchrun, every process calls this; ranks other than 0 log nothing."""
    world = parallel.init(cfg.model.device, cfg.trainer.collective_timeout_minutes)
    try:
        started = time.perf_counter()
        run = set_up(cfg, resume, log if world.is_main else _silent, world)
        try:
            return _train(run, started)
        finally:
            run.release()  # before the process group goes: vLLM tears down groups of its own
    finally:
        parallel.shutdown(world)


def _silent(*args, **kwargs) -> None:
    pass


def _train(run: Run, started: float) -> dict:
    cfg, world, log, state = run.cfg, run.world, run.log, run.state
    if state.step > cfg.trainer.steps:
        raise TrainingError(f"the checkpoint in {run.dir} is at step {state.step}, beyond "
                            f"trainer.steps={cfg.trainer.steps}; resume with a larger trainer.steps")
    if not run.resumed:
        initial = run.evaluate()
        state.initial_accuracy = initial["accuracy"]
        state.wall_seconds = time.perf_counter() - started  # set-up and the first evaluation
        write_row(run, {"step": 0, "eval_accuracy": state.initial_accuracy,
                         "eval_seconds": state.wall_seconds})
        log(f"initial held-out accuracy {state.initial_accuracy:.3f} on {len(run.held_out)} problems")
    bar = progress_bar(cfg, state.step, world.is_main)
    last_save = time.monotonic()
    with StopFlag(announce=world.is_main) as stop:
        while state.step < cfg.trainer.steps and not world.any(stop.requested):  # all ranks stop alike
            row = train_step(run)
            if (cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0) or state.step == cfg.trainer.steps:
                t0 = time.perf_counter()
                row["eval_accuracy"] = run.evaluate()["accuracy"]
                row["eval_seconds"] = time.perf_counter() - t0
            state.wall_seconds += row["seconds"] + row.get("eval_seconds", 0.0)
            write_row(run, row)
            report_progress(run, row, bar)
            if world.any(_checkpoint_due(cfg, state.step, last_save)):
                run.save()
                last_save = time.monotonic()
        bar.close()
    if state.step < cfg.trainer.steps:  # stopped by SIGINT/SIGTERM
        run.save()
        launcher = "opo train" if world.size == 1 else "torchrun <the same options> -m opo train"
        log(f"stopped after step {state.step}; resume with: {launcher} --resume {run.dir}")
        run.scorer.close()
        run.loggers.close()
        return {"stopped_at": state.step}
    return finish(run)


def train_step(run: Run) -> dict:
    """One rollout batch, start to finish; returns its metrics row (without evaluation)."""
    cfg, state, timer = run.cfg, run.state, PhaseTimer()
    t0 = time.perf_counter()
    # Every rank draws the same global batch and keeps its own whole prompts.
    examples = [run.train_set[i] for i in run.world.share(run.sampler.next_batch(cfg.rollout.prompts_per_step))]
    prompt_texts, prompt_ids = encode_prompts(run.tokenizer, [ex["question"] for ex in examples], cfg.prompt)
    with timer("generate"):
        batch = run.generate(prompt_ids, run.sampling())
    if cfg.algo.updates_per_batch == 1 and batch.policy_version != state.policy_version:
        raise TrainingError(f"exact on-policy training refuses responses from policy version "
                            f"{batch.policy_version}; the weights are at version {state.policy_version}")
    with timer("reward"):
        rewards = run.scorer.score([prompt_texts[g] for g in batch.group_ids], batch.texts,
                                   [examples[g] for g in batch.group_ids], truncated=batch.truncated)
    if rewards.errors and not any(row.get("reward_errors") for row in state.rows):
        run.log(f"step {state.step + 1}: {rewards.errors} reward checks failed and scored 0 "
                f"({rewards.timeouts} timeouts); first: {rewards.error_messages[0]}")
    # The global batch's numbers on every rank: batch-level estimators and the metrics need them.
    r, lengths, groups, correct, truncated = run.world.gather(
        torch.tensor(rewards.rewards, dtype=torch.float32), torch.tensor(batch.lengths, dtype=torch.float32),
        torch.tensor(batch.group_ids) + run.world.rank * len(examples),
        torch.tensor(rewards.correct, dtype=torch.float32), torch.tensor(batch.truncated, dtype=torch.float32))
    packed = pack(batch.prompt_ids, batch.response_ids, run.tokenizer.pad_token_id)
    if batch.logprobs:
        packed.values["sampler_logp"] = packed.spread(batch.logprobs)
    device = next(run.model.parameters()).device
    weights = None
    needs = estimator_needs(cfg.algo.estimator)
    if needs:  # opo_exact / opo_proxy: per-response ‖∇log π‖² under the sampling distribution
        with timer("grad_weights"):
            local = response_weights(needs, run.model, packed.to(device), sampling_dist(cfg),
                                     cfg.algo.micro_batch_size)
        weights = run.world.gather(local.cpu())[0]
    adv = compute_advantages(cfg.algo.estimator, r, lengths, groups, weights=weights)

    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    try:
        stats = policy_update(run.policy, run.optimizer, packed.to(device), run.world.local_part(adv).to(device),
                              cfg, run.ref_model, timer, run.world, run.precision, teacher=run.teacher)
    except OffPolicyError as exc:
        raise TrainingError(f"step {state.step + 1}: {exc}") from None
    state.step += 1
    _account_update(run, stats)

    with timer("metrics"):
        n_groups = len(examples) * run.world.size
        group_min = torch.full((n_groups,), math.inf).scatter_reduce(0, groups, r, "amin")
        group_max = torch.full((n_groups,), -math.inf).scatter_reduce(0, groups, r, "amax")
        no_signal = float((group_min == group_max).float().mean())
        repeated, ngrams, errors, timeouts = run.world.sum(
            *repetition_counts(batch.response_ids, cfg.metrics.repetition_ngram), rewards.errors, rewards.timeouts)
        row = {
            "step": state.step, "reward_mean": float(r.mean()),
            "accuracy": float(correct.sum()) / len(correct), "entropy": stats["entropy"],
            "response_length_mean": float(lengths.mean()),
            "truncated_rate": float(truncated.sum()) / len(truncated),
            "repetition_rate": repeated / ngrams if ngrams else 0.0,
            "grad_norm": stats["grad_norm"], "loss": stats["loss"], "clip_frac": stats["clip_frac"],
            "ratio_max": stats["ratio_max"], "logp_mismatch_max": stats["logp_mismatch_max"],
            "logp_mismatch_mean": stats["logp_mismatch_mean"], "mismatch_kl": stats["mismatch_kl"],
            "is_weight_mean": stats["is_weight_mean"], "is_weight_max": stats["is_weight_max"],
            "is_corrected_share": stats["is_corrected_share"], "teacher_kl": stats["teacher_kl"],
            "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std()) if len(adv) > 1 else 0.0, "zero_variance_groups": no_signal,
            "reward_errors": int(errors), "reward_timeouts": int(timeouts),
            "skipped_steps": state.skipped_steps, "policy_version": state.policy_version,
            "lr": lr, "tokens": int(lengths.sum()),
        }
    with timer("kl_probe"):
        row["kl_to_init"] = run.probe.estimate(run.logprobs) if run.probe else None
    _watch_signal(run, no_signal)
    write_samples(run, _sample_records(run, prompt_texts, examples, batch, rewards, run.world.local_part(adv)))
    row.update(timer.row())
    row["seconds"] = time.perf_counter() - t0
    return row


def _sample_records(run: Run, prompt_texts, examples, batch, rewards, adv) -> list[dict]:
    """trainer.log_samples of this rank's responses, one every len/N, for samples.jsonl."""
    n = min(run.cfg.trainer.log_samples, len(batch))
    picks = range(0, len(batch), max(1, len(batch) // n))[:n] if n else []
    return [{"step": run.state.step, "prompt": prompt_texts[batch.group_ids[i]], "response": batch.texts[i],
             "reward": rewards.rewards[i], "answer_read": rewards.answers[i] if rewards.answers else None,
             "gold": str(examples[batch.group_ids[i]].get("answer", "")), "advantage": float(adv[i]),
             "length": batch.lengths[i], "finish_reason": batch.finish_reasons[i],
             "sampler_logprob_sum": float(sum(batch.logprobs[i])) if batch.logprobs else None}
            for i in picks]


def _account_update(run: Run, stats: dict) -> None:
    """Skipped (NaN/inf) updates, the scheduler and the policy version after one update."""
    state, cfg = run.state, run.cfg
    if stats["bad_updates"] == cfg.algo.updates_per_batch:
        state.bad_steps_in_row += 1
        state.skipped_steps += 1
        run.log(f"step {state.step}: loss or gradient is NaN/inf; step skipped "
                f"({state.bad_steps_in_row} in a row)")
        if state.bad_steps_in_row >= cfg.trainer.max_bad_steps:
            raise TrainingError(f"{state.bad_steps_in_row} consecutive steps had a NaN/inf loss or "
                                f"gradient; stopping. Lower optim.lr or check the rewards.")
        return
    state.bad_steps_in_row = 0
    run.scheduler.step()
    state.policy_version += cfg.algo.updates_per_batch - stats["bad_updates"]
    run.engine.sync_weights(run.model, state.policy_version)


def _watch_signal(run: Run, no_signal_share: float) -> None:
    """Warn once when the run has had no learning signal for a while."""
    state, limit = run.state, run.cfg.trainer.warn_no_signal_steps
    if run.teacher is not None and run.cfg.algo.distill_coef > 0:  # a signal besides the rewards
        limit = 0
    state.no_signal_in_row = state.no_signal_in_row + 1 if no_signal_share == 1.0 else 0
    if limit and state.no_signal_in_row == limit:
        run.log(f"warning: for {limit} steps in a row every group's rewards were all equal, so every "
                f"advantage was 0 and nothing was learned. Likely causes: the task is too hard (all "
                f"wrong) or too easy (all right) for this model, the reward never fires (check "
                f"reward.kind and the answer format with `opo eval --show 5`), or the tokenizer cannot "
                f"read the prompts (model.path=tiny only knows digits and + = , >).")


def _checkpoint_due(cfg: Config, step: int, last_save: float) -> bool:
    if step >= cfg.trainer.steps:
        return False  # the final save follows
    by_step = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
    by_time = cfg.checkpoint.every_minutes and time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes
    return bool(by_step or by_time)


def finish(run: Run) -> dict:
    state = run.state
    run.save()
    last = state.rows[-1] if state.rows else {}
    final_accuracy = last["eval_accuracy"] if "eval_accuracy" in last else run.evaluate()["accuracy"]
    save_final(run)
    run.scorer.close()
    run.loggers.close()
    summary = {"initial_accuracy": state.initial_accuracy, "final_accuracy": final_accuracy,
               "steps": state.step, "wall_seconds": state.wall_seconds, "estimator": run.cfg.algo.estimator,
               "skipped_steps": state.skipped_steps,
               "reward_errors": sum(row.get("reward_errors", 0) for row in state.rows), "run_dir": str(run.dir)}
    if run.world.is_main:
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if run.cfg.trainer.profile:
        print_profile(run)
    run.log(f"held-out accuracy {summary['initial_accuracy']:.3f} -> {final_accuracy:.3f} "
            f"in {state.step} steps, {state.wall_seconds:.0f}s of training; run folder {run.dir}")
    return summary



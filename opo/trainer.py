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

import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opo import checkpoint as ckpt
from opo import lora, parallel
from opo.advantages import compute_advantages, estimator_needs
from opo.checkpoint import RunState
from opo.config import Config, apply_overrides, dump_yaml, from_dict, read_yaml
from opo.data import PromptSampler, derive_seed, encode_prompts, load_split
from opo.evaluation import evaluate
from opo.gradnorm import response_weights
from opo.metrics import KLProbe, repetition_counts
from opo.models import eos_ids, load_policy, pick_device
from opo.precision import Precision
from opo.rewards import RewardScorer
from opo.rollout import SamplingParams, make_engine
from opo.sequences import batched_logprobs, pack
from opo.update import OffPolicyError, PhaseTimer, policy_update, sampling_dist

# Fields that legitimately differ between a resumed and an uninterrupted run.
TIMING_PREFIXES = ("seconds", "wall_seconds", "eval_seconds", "time_")
TIMING_FIELDS = ("seconds", "wall_seconds", "eval_seconds")


def is_timing_field(name: str) -> bool:
    return name.startswith(TIMING_PREFIXES)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class Run:
    """Everything a run holds while it trains; built once by `set_up`."""

    cfg: Config
    dir: Path
    model: torch.nn.Module
    tokenizer: object
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scorer: RewardScorer
    train_set: list
    held_out: list
    sampler: PromptSampler
    state: RunState
    probe: KLProbe | None
    ref_model: torch.nn.Module | None
    log: object
    world: parallel.World
    policy: torch.nn.Module  # what is scored and optimised: `model`, or its DDP/FSDP2 wrapper
    precision: Precision = field(default_factory=Precision)  # every policy forward runs under it

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, max_new_tokens=r.max_new_tokens)

    def logprobs(self, packed):
        a = self.cfg.algo
        with self.precision.autocast():
            return batched_logprobs(self.policy, packed, sampling_dist(self.cfg), max_rows=a.micro_batch_size,
                                    max_tokens=a.max_tokens_per_micro_batch, chunk_tokens=a.logprob_chunk_size,
                                    same_count=self.world.same_count)

    def generate(self, prompt_ids, params: SamplingParams, *, main_only: bool = False):
        """Sample from the policy (on rank 0 alone with main_only; None elsewhere)."""
        with parallel.gathered(self.policy), self.precision.autocast():  # the loss forward's autocast
            return self.engine.generate(prompt_ids, params) if self.world.is_main or not main_only else None

    def evaluate(self) -> dict:
        """Held-out evaluation, each rank on its part of the problems; means over all of them."""
        e, mine = self.cfg.eval, self.world.split(self.held_out)
        with parallel.gathered(self.policy), self.precision.autocast():
            result = evaluate(self.engine, self.tokenizer, mine, self.scorer, self.cfg.prompt,
                              samples=e.samples, temperature=e.temperature, top_p=e.top_p, k=e.k,
                              max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                              chunk=e.batch_size) if mine else {}
        return self.world.mean_over_ranks(result, len(mine), totals=("problems", "reward_errors"))

    def save(self) -> None:
        """A checkpoint; every rank takes part (FSDP2 gathers, every rank's RNG state is kept)."""
        self.state.grad_scaler = self.precision.state_dict()
        weights = parallel.full_weights(self.world, self.policy)
        optimizer_state = parallel.optimizer_state(self.world, self.policy, self.optimizer)
        rngs = self.world.all_gather_json(ckpt.rng_to_json(*ckpt.rng_state()))
        if self.world.is_main:
            ckpt.save_run(self.dir, self.cfg.checkpoint.keep, self.state, self.model, self.tokenizer,
                          self.optimizer, self.scheduler, self.sampler,
                          self.probe.state_dict() if self.probe else {}, weights=weights,
                          optimizer_state=optimizer_state, other_rank_rngs=rngs[1:])


def lr_lambda(cfg: Config):
    warm, total, kind = cfg.optim.warmup_steps, max(cfg.trainer.steps, 1), cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]
    return factor


def default_run_dir(cfg: Config) -> str:
    return f"runs/{cfg.preset}-{cfg.algo.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    """Run (or continue) training; return the summary that is also written to summary.json.

    Under torchrun, every process calls this; ranks other than 0 log nothing."""
    world = parallel.init(cfg.model.device)
    try:
        return _train(cfg, resume, log if world.is_main else _silent, world)
    finally:
        parallel.shutdown(world)


def _silent(*args, **kwargs) -> None:
    pass


def _train(cfg: Config, resume: bool, log, world: parallel.World) -> dict:
    started = time.perf_counter()
    run = set_up(cfg, resume, log, world)
    state = run.state
    if state.step > cfg.trainer.steps:
        raise TrainingError(f"the checkpoint in {run.dir} is at step {state.step}, beyond "
                            f"trainer.steps={cfg.trainer.steps}; resume with a larger trainer.steps")
    if not resume:
        initial = run.evaluate()
        state.initial_accuracy = initial["accuracy"]
        state.wall_seconds = time.perf_counter() - started  # set-up and the first evaluation
        _write_row(run, {"step": 0, "eval_accuracy": state.initial_accuracy,
                         "eval_seconds": state.wall_seconds})
        log(f"initial held-out accuracy {state.initial_accuracy:.3f} on {len(run.held_out)} problems")
    bar = _progress(cfg, state.step, world.is_main)
    last_save = time.monotonic()
    with _StopFlag(announce=world.is_main) as stop:
        while state.step < cfg.trainer.steps and not world.any(stop.requested):  # all ranks stop alike
            row = train_step(run)
            if (cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0) or state.step == cfg.trainer.steps:
                t0 = time.perf_counter()
                row["eval_accuracy"] = run.evaluate()["accuracy"]
                row["eval_seconds"] = time.perf_counter() - t0
            state.wall_seconds += row["seconds"] + row.get("eval_seconds", 0.0)
            _write_row(run, row)
            _report_progress(run, row, bar)
            if world.any(_checkpoint_due(cfg, state.step, last_save)):
                run.save()
                last_save = time.monotonic()
        bar.close()
    if state.step < cfg.trainer.steps:  # stopped by SIGINT/SIGTERM
        run.save()
        launcher = "opo train" if world.size == 1 else "torchrun <the same options> -m opo train"
        log(f"stopped after step {state.step}; resume with: {launcher} --resume {run.dir}")
        run.scorer.close()
        return {"stopped_at": state.step}
    return finish(run)


def set_up(cfg: Config, resume: bool, log, world: parallel.World = parallel.SINGLE) -> Run:
    """Load model, data, reward, engine and optimiser; restore a checkpoint when resuming."""
    parallel.check_config(world, cfg)
    if estimator_needs(cfg.algo.estimator) and world.size > 1 and cfg.trainer.parallel == "fsdp":
        raise TrainingError(f"algo.estimator={cfg.algo.estimator} takes per-response gradients of the "
                            f"whole model, which FSDP2 shards; use trainer.parallel=ddp")
    # An empty run.dir gets a name with a timestamp; every rank uses rank 0's.
    cfg.run.dir = world.broadcast_json(cfg.run.dir or default_run_dir(cfg))
    run_dir = Path(cfg.run.dir)
    if not resume and ckpt.list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} already holds checkpoints; continue it with "
                            f"`opo train --resume {run_dir}` or choose another run.dir")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    # Rank 0 keeps the single-process seed; other ranks sample their own responses.
    seed_everything(cfg.trainer.seed if world.is_main else derive_seed(cfg.trainer.seed, f"rank {world.rank}"))
    split = load_split(cfg.data)
    train_set, held_out = split.train, split.held_out
    log(split.summary())
    scorer = RewardScorer.from_config(cfg.reward)
    # Mixed precision: fp32 master weights, low-precision compute under autocast (opo.precision).
    precision = Precision.from_config(cfg.model, pick_device(world.device))
    model, tokenizer = load_policy(cfg.model.path, precision.param_dtype, world.device, cfg.model.cache_dir)
    if cfg.model.lora.r:  # adapters injected in place: engines and scorer call the same module
        lora.attach(model, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    if cfg.model.gradient_checkpointing:
        # HF only checkpoints activations in train() mode; dropout is off (see load_policy),
        # so train() and eval() compute the same function and sampling stays on-policy.
        # Non-reentrant: gradients reach LoRA adapters even though the embeddings are frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ref_model = None
    if cfg.algo.kl_coef > 0:  # only then does a second copy of the model live in memory
        ref_model = load_policy(cfg.model.path, precision.param_dtype, world.device, cfg.model.cache_dir)[0]
        ref_model.requires_grad_(False)
    _warn_unknown_tokens(tokenizer, train_set, cfg, log)
    checkpoint = ckpt.latest_checkpoint(run_dir) if resume else None
    if checkpoint:  # the full weights, on every rank, before any sharding
        ckpt.load_checkpoint(checkpoint, model=model)
    policy = parallel.wrap(model, world, cfg.trainer.parallel)
    engine = make_engine(cfg.rollout.engine, model, tokenizer, eos_ids(model, tokenizer), cfg.rollout.batch_size,
                         vllm_options={**dataclasses.asdict(cfg.rollout.vllm), "dtype": cfg.model.dtype,
                                       "seed": cfg.trainer.seed})
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    run = Run(cfg, run_dir, model, tokenizer, engine, optimizer, scheduler, scorer, train_set, held_out,
              PromptSampler(len(train_set), cfg.trainer.seed), RunState(), None, ref_model, log, world, policy,
              precision)
    if checkpoint:
        run.state, tensors = ckpt.restore_run(run_dir, None, None, scheduler, run.sampler, rank=world.rank,
                                              write_metrics=world.is_main)
        parallel.load_optimizer_state(world, policy, optimizer, lambda: ckpt.read_optimizer_state(checkpoint))
        run.probe = KLProbe.from_state_dict(tensors) if "probe.logp0" in tensors else None
        precision.load_state_dict(run.state.grad_scaler)
        engine.sync_weights(model, run.state.policy_version)
        log(f"resumed {run_dir} at step {run.state.step}")
        if run.state.world_size != world.size:
            log(f"note: the checkpoint was written by {run.state.world_size} process(es), this run has "
                f"{world.size}: training continues correctly, but does not replay the samples an "
                f"uninterrupted run would have drawn")
    else:
        if world.is_main:
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (run_dir / "metrics.jsonl").write_text("")
        run.probe = _make_probe(run)
    run.state.world_size = world.size
    return run


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
    weights = None
    needs = estimator_needs(cfg.algo.estimator)
    if needs:  # opo_exact / opo_proxy: per-response ‖∇log π‖² under the sampling policy
        with timer("grad_weights"):
            local = response_weights(needs, run.model, packed, cfg.rollout.temperature, cfg.algo.micro_batch_size)
        weights = run.world.gather(local.cpu())[0]
    adv = compute_advantages(cfg.algo.estimator, r, lengths, groups, weights=weights)

    device = next(run.model.parameters()).device
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    try:
        stats = policy_update(run.policy, run.optimizer, packed.to(device), run.world.local_part(adv).to(device),
                              cfg, run.ref_model, timer, run.world, run.precision)
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
            "logp_mismatch_mean": stats["logp_mismatch_mean"], "adv_mean": float(adv.mean()),
            "adv_std": float(adv.std()) if len(adv) > 1 else 0.0, "zero_variance_groups": no_signal,
            "reward_errors": int(errors), "reward_timeouts": int(timeouts),
            "skipped_steps": state.skipped_steps, "policy_version": state.policy_version,
            "lr": lr, "tokens": int(lengths.sum()),
        }
    with timer("kl_probe"):
        row["kl_to_init"] = run.probe.estimate(run.logprobs) if run.probe else None
    _watch_signal(run, no_signal)
    row.update(timer.row())
    row["seconds"] = time.perf_counter() - t0
    return row


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
    state.no_signal_in_row = state.no_signal_in_row + 1 if no_signal_share == 1.0 else 0
    if limit and state.no_signal_in_row == limit:
        run.log(f"warning: for {limit} steps in a row every group's rewards were all equal, so every "
                f"advantage was 0 and nothing was learned. Likely causes: the task is too hard (all "
                f"wrong) or too easy (all right) for this model, the reward never fires (check "
                f"reward.kind and the answer format with `opo eval --show 5`), or the tokenizer cannot "
                f"read the prompts (model.path=tiny only knows digits and + = , >).")


def _warn_unknown_tokens(tokenizer, train_set, cfg: Config, log) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    _, ids = encode_prompts(tokenizer, [ex["question"] for ex in train_set[:64]], cfg.prompt)
    total = sum(map(len, ids))
    unknown = sum(row.count(unk) for row in ids)
    if unknown:
        log(f"warning: {unknown} of {total} prompt tokens in the first {len(ids)} training prompts map "
            f"to the tokenizer's unknown token: the model cannot read these prompts "
            f"(model.path={cfg.model.path}).")


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
    _save_final(run)
    run.scorer.close()
    summary = {"initial_accuracy": state.initial_accuracy, "final_accuracy": final_accuracy,
               "steps": state.step, "wall_seconds": state.wall_seconds, "estimator": run.cfg.algo.estimator,
               "skipped_steps": state.skipped_steps,
               "reward_errors": sum(row.get("reward_errors", 0) for row in state.rows), "run_dir": str(run.dir)}
    if run.world.is_main:
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if run.cfg.trainer.profile:
        _print_profile(run)
    run.log(f"held-out accuracy {summary['initial_accuracy']:.3f} -> {final_accuracy:.3f} "
            f"in {state.step} steps, {state.wall_seconds:.0f}s of training; run folder {run.dir}")
    return summary


def _make_probe(run: Run) -> KLProbe | None:
    """Sample the fixed KL probe from the starting policy, with the rollout's sampling settings."""
    n = run.cfg.metrics.kl_probe_size
    if n == 0:
        return None
    _, ids = encode_prompts(run.tokenizer, [ex["question"] for ex in run.train_set[:n]], run.cfg.prompt)
    params = SamplingParams(**{**run.sampling().__dict__, "n": 1})
    batch = run.generate(ids, params, main_only=True)  # rank 0 samples; every rank keeps the same probe
    prompt_ids, response_ids = run.world.broadcast_json(None if batch is None else [batch.prompt_ids,
                                                                                    batch.response_ids])
    packed = pack(prompt_ids, response_ids, run.tokenizer.pad_token_id)
    return KLProbe(packed, run.logprobs(packed).cpu())


def _write_row(run: Run, row: dict) -> None:
    run.state.rows.append(row)
    if run.world.is_main:
        with open(run.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _save_final(run: Run) -> None:
    weights = parallel.full_weights(run.world, run.policy)  # FSDP2: gathered on rank 0; else None
    if not run.world.is_main:
        return
    tmp = run.dir / "final.tmp"
    ckpt.shutil.rmtree(tmp, ignore_errors=True)
    if lora.is_lora(run.model):
        lora.save_final(run.model, tmp, merge=run.cfg.model.lora.merge_on_save)
    else:
        run.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    run.tokenizer.save_pretrained(tmp)
    ckpt.replace_folder(tmp, run.dir / "final")


def _print_profile(run: Run) -> None:
    rows = [r for r in run.state.rows if r.get("step", 0) > 0]
    names = sorted({k for r in rows for k in r if k.startswith("time_")})
    run.log("seconds per step by phase (median over steps):")
    for name in names + ["seconds"]:
        values = sorted(r[name] for r in rows if name in r)
        if values:
            run.log(f"  {name.removeprefix('time_'):<14}{values[len(values) // 2]:8.3f}")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.announce:
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _progress(cfg: Config, initial: int, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.steps, initial=initial, disable=not (cfg.trainer.progress and show),
                desc="opo train", unit="step", dynamic_ncols=True)


def _report_progress(run: Run, row: dict, bar) -> None:
    held = next((r["eval_accuracy"] for r in reversed(run.state.rows) if "eval_accuracy" in r), None)
    parts = {"reward": f"{row['reward_mean']:.3f}", "train_acc": f"{row['accuracy']:.3f}"}
    if held is not None:
        parts["heldout_acc"] = f"{held:.3f}"
    bar.update(1)
    bar.set_postfix(parts)
    cfg = run.cfg.trainer
    if not cfg.progress and (row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps):
        text = " ".join(f"{k} {v}" for k, v in parts.items())
        run.log(f"step {row['step']}/{cfg.steps} {text} {row['seconds']:.2f}s")


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The resolved config of an existing run, with optional overrides (e.g. more steps)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ckpt.CheckpointError(f"cannot resume: {path} does not exist")
    return apply_overrides(from_dict(read_yaml(path)), overrides)

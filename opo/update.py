"""One policy update: the optimiser step(s) for one rollout batch.

Exact on-policy (updates_per_batch = 1, the OPO setting): one step on the whole batch,
old log-probs are not needed (the ratio is exp(logp − sg(logp)) = 1), and the sampler's
own log-probs are compared with the trainer's before the step is taken.

Off-policy comparison (updates_per_batch = U > 1): old log-probs are computed once,
under the sampling distribution, before the first of U mini-batch steps with PPO
clipping. That is the paper's "off-policy" arm, not the default.

Gradients of the micro-batches of one step add up to the full-batch gradient: the loss
of each is divided by the token count of the whole (mini-)batch, not its own. Under data
parallelism (`world`, see opo.parallel) "whole" means across all ranks: token counts,
the mismatch verdict, the NaN/inf verdict and the statistics are reduced, so every rank
takes the same decision and the step equals the single-process step on the global batch.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from opo.distill import reverse_kl_advantage, reverse_kl_sum, token_advantages
from opo.loss import policy_loss, rollout_correction
from opo.parallel import SINGLE, World, clip_grad_norm
from opo.precision import Precision, mismatch_kl_limit, mismatch_limit
from opo.sequences import Dist, Packed, batched_logprobs, score


class OffPolicyError(RuntimeError):
    """The trainer's log-probs disagree with the sampler's: the update would not be on-policy."""


class PhaseTimer:
    """Seconds spent per named phase of a step: `with timer("forward"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def row(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.seconds.items()}


def sampling_dist(cfg) -> Dist:
    return Dist(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)


def policy_update(model, optimizer, packed: Packed, advantages: torch.Tensor, cfg, ref_model=None,
                  timer: PhaseTimer | None = None, world: World = SINGLE,
                  precision: Precision | None = None, teacher=None) -> dict:
    """Apply the update for one rollout batch; return its statistics.

    packed.values may hold "sampler_logp" (the engine's per-token log-probs); then
    logp_mismatch_max / logp_mismatch_mean report |log pi_sampler − log pi_trainer| over
    the batch's response tokens under the weights that sampled them, and in exact
    on-policy mode a mismatch above algo.max_logp_mismatch raises OffPolicyError before
    any weight changes.

    `model` is the module to score and optimise: a causal LM, or its DDP/FSDP2 wrapper
    from `parallel.wrap`; `packed` and `advantages` hold this rank's rows only.
    Forwards run under `precision`'s autocast (the trainer passes the run's, whose
    gradient scaler lives across steps; by default one is built from cfg.model).
    `teacher` (algo.teacher, frozen) scores each micro-batch under the same distribution;
    its per-token reverse-KL advantage is added to algo.reward_coef x the sequence one
    (opo.distill), and teacher_kl reports KL(student || teacher) per token.
    """
    a = cfg.algo
    timer = timer or PhaseTimer()
    amp = precision or Precision.from_config(cfg.model, next(model.parameters()).device)
    dist = sampling_dist(cfg)
    limits = {"max_rows": a.micro_batch_size, "max_tokens": a.max_tokens_per_micro_batch}
    on_policy = a.updates_per_batch == 1
    params = [p for p in model.parameters() if p.requires_grad]
    stats = {"loss": 0.0, "entropy": 0.0, "grad_norm": 0.0, "clip_frac": 0.0, "ratio_max": 0.0,
             "bad_updates": 0, "teacher_kl": None}
    teacher_gap = 0.0  # Σ (log π_student − log π_teacher) over response tokens
    mismatch = _Mismatch()
    correction = _Correction()
    batch_tokens = world.sum(packed.response_mask.sum())
    if not on_policy:
        with timer("old_logprobs"), amp.autocast():
            old = batched_logprobs(model, packed, dist, chunk_tokens=a.logprob_chunk_size,
                                   same_count=world.same_count, **limits)
        packed.values["old_logp"] = old
        mismatch.add(old, packed)
    order = torch.randperm(packed.num_rows) if not on_policy else torch.arange(packed.num_rows)
    # tensor_split gives exactly U mini-batches (chunk can give fewer: 6 rows, U=4 -> 3 chunks).
    for rows in torch.tensor_split(order, a.updates_per_batch):
        mini = packed.rows(rows)
        mini_adv = advantages[rows]
        # Denominators over the whole (mini-)batch, all ranks: every loss_agg then gives
        # each rank its share of the single-process loss (this rank's count alone would
        # make the seq-mean aggregations world-size times too large).
        mini_tokens, mini_seqs = world.sum(mini.response_mask.sum(), len(rows))
        optimizer.zero_grad(set_to_none=True)
        mini_loss = clipped = 0.0
        for idx in world.micro_batches(model, mini.micro_batches(**limits)):
            idx = torch.tensor(idx)
            micro = mini.rows(idx)
            with timer("forward"), amp.autocast():
                logp, entropy = score(model, micro, dist, with_entropy=True,
                                      chunk_tokens=a.logprob_chunk_size, entropy_grad=a.entropy_coef > 0)
                weights = correction.weights(micro, logp, a.rollout_correction, a.correction_cap)
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref = score(ref_model, micro, dist, chunk_tokens=a.logprob_chunk_size)[0]
                distill_adv = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logp = score(teacher, micro, dist, chunk_tokens=a.logprob_chunk_size)[0]
                    teacher_gap += reverse_kl_sum(logp, teacher_logp, micro.response_mask)
                    distill_adv = reverse_kl_advantage(logp, teacher_logp, micro.response_mask, a.distill_coef)
                micro_adv = token_advantages(mini_adv[idx.to(mini_adv.device)], distill_adv, a.reward_coef)
                loss, st = policy_loss(
                    logp, micro.values.get("old_logp"), micro_adv,
                    micro.response_mask, agg=a.loss_agg, total_tokens=mini_tokens,
                    total_seqs=mini_seqs, clip_eps=None if on_policy else a.clip_eps,
                    entropy=entropy, entropy_coef=a.entropy_coef, ref_logp=ref, kl_coef=a.kl_coef,
                    is_weights=weights)
            if on_policy:
                mismatch.add(logp.detach(), micro)
            with timer("backward"):
                amp.backward(loss * world.size)  # DDP and FSDP2 average gradients over ranks
            mini_loss += float(loss.detach())
            micro_tokens = float(micro.response_mask.sum())
            clipped += st["clip_frac"] * micro_tokens
            stats["ratio_max"] = max(stats["ratio_max"], st["ratio_max"])
            stats["entropy"] += float((entropy.detach() * micro.response_mask).sum()) / batch_tokens
        if on_policy:
            mismatch.reduce(world)
            mismatch.check(mismatch_limit(cfg))
            correction.check(world, mismatch_kl_limit(cfg))
        mini_loss, clipped = world.sum(mini_loss, clipped)
        with timer("optimizer"):
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            amp.unscale_(optimizer)
            grad_norm = clip_grad_norm(params, clip)
            if world.any(not (math.isfinite(grad_norm) and math.isfinite(mini_loss))):
                optimizer.zero_grad(set_to_none=True)  # a NaN/inf step is skipped, never applied
                amp.skip()
                stats["bad_updates"] += 1
                continue
            amp.step(optimizer)
        stats["loss"] += mini_loss / a.updates_per_batch
        stats["grad_norm"] += grad_norm / a.updates_per_batch
        stats["clip_frac"] += clipped / max(mini_tokens, 1.0) / a.updates_per_batch
    optimizer.zero_grad(set_to_none=True)
    stats["entropy"] = world.sum(stats["entropy"])
    stats["ratio_max"] = world.max(stats["ratio_max"])
    if teacher is not None:
        stats["teacher_kl"] = world.sum(teacher_gap) / max(float(batch_tokens), 1.0)
    if not on_policy:
        mismatch.reduce(world)
    stats.update(mismatch.summary())
    stats.update(correction.summary(world))
    return stats


class _Correction:
    """Rollout-correction weights per micro-batch (opo.loss.rollout_correction) and their
    statistics summed over the step, for the metrics row."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.max = 0.0

    def weights(self, micro: Packed, logp: torch.Tensor, mode: str, cap: float) -> torch.Tensor | None:
        """The weights for this micro-batch's tokens, or None when there is nothing to correct.
        ρ compares the sampler with the policy the step starts from: the scored log-probs
        on-policy, the old log-probs of the first pass off-policy (their PPO ratio does the rest)."""
        sampler = micro.values.get("sampler_logp")
        if sampler is None:
            return None
        behaviour = micro.values.get("old_logp", logp)
        weights, st = rollout_correction(behaviour, sampler.to(logp.device), micro.response_mask, mode, cap)
        values = dict(zip(st, torch.stack([v.float() for v in st.values()]).tolist()))  # one sync
        self.max = max(self.max, values.pop("weight_max"))
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        return None if mode == "none" else weights

    def check(self, world: World, limit: float) -> None:
        """Stop before the optimiser step when the batch's mean KL(sampler ‖ trainer) per token
        is above `limit` (0 = off); the figures are summed over ranks, so all ranks agree."""
        if not limit:
            return
        tokens, kl = world.sum(self.sums.get("tokens", 0.0), self.sums.get("kl", 0.0))
        if tokens and not kl / tokens <= limit:
            raise OffPolicyError(
                f"the sampler-vs-trainer KL is {kl / tokens:.3g} per token (algo.max_mismatch_kl="
                f"{limit:g}): the responses were not sampled from the policy being trained. Usual "
                f"causes: an engine whose weights were not synced, or a sampler that does not use the "
                f"configured temperature/top_p/top_k. No weights were changed by this step.")

    def summary(self, world: World) -> dict:
        keys = ("tokens", "kl", "weight", "corrected", "seqs", "seqs_corrected")
        tokens, kl, weight, corrected, seqs, seqs_corrected = world.sum(*(self.sums.get(k, 0.0) for k in keys))
        weight_max = world.max(self.max)
        if not tokens:
            return {"mismatch_kl": None, "is_weight_mean": None, "is_weight_max": None, "is_corrected_share": None}
        share = seqs_corrected / seqs if seqs else corrected / tokens  # sequence modes count responses
        return {"mismatch_kl": kl / tokens, "is_weight_mean": weight / tokens, "is_weight_max": weight_max,
                "is_corrected_share": share}


class _Mismatch:
    """Running max and mean of |log pi_sampler − log pi_trainer| over response tokens."""

    def __init__(self):
        self.max = 0.0
        self.total = 0.0
        self.tokens = 0
        self.seen = False

    def add(self, trainer_logp: torch.Tensor, packed: Packed) -> None:
        sampler = packed.values.get("sampler_logp")
        if sampler is None:
            return
        mask = packed.response_mask.bool()
        diff = (trainer_logp.float() - sampler.to(trainer_logp.device))[mask].abs()
        if diff.numel():
            self.seen = True
            self.max = max(self.max, float(diff.max()))
            self.total += float(diff.double().sum())
            self.tokens += diff.numel()

    def reduce(self, world: World) -> None:
        """The figures over all ranks, so that every rank reaches the same verdict."""
        self.max = world.max(self.max)
        self.total, self.tokens = world.sum(self.total, self.tokens)
        self.tokens = int(self.tokens)
        self.seen = self.tokens > 0

    def check(self, limit: float) -> None:
        if limit and self.seen and not self.max <= limit:
            raise OffPolicyError(
                f"the trainer's log-probabilities differ from the sampler's by up to {self.max:.3g} "
                f"(algo.max_logp_mismatch={limit:g}): the update would not be exactly on-policy. "
                f"Usual causes: a sampler that does not use the configured temperature/top_p/top_k, "
                f"an engine whose weights were not synced, or low-precision kernel noise beyond the "
                f"limit (`auto` picks one per model.dtype). No weights were changed by this step.")

    def summary(self) -> dict:
        if not self.seen:
            return {"logp_mismatch_max": None, "logp_mismatch_mean": None}
        return {"logp_mismatch_max": self.max, "logp_mismatch_mean": self.total / self.tokens}

"""Policy-gradient loss on per-token log-probabilities.

Shapes: B responses, T response tokens (right-padded, ``mask`` marks real tokens), V
vocabulary. All functions are pure tensor maths; the trainer owns models and batches.

Reductions take their denominators (``total_tokens``, ``total_seqs``) from the caller:
they are counts over the whole optimiser step, so the losses of its micro-batches add
up to exactly the full-batch loss and accumulated gradients equal full-batch ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# Rollout correction (algo.rollout_correction): how the policy-gradient term of each token is
# reweighted for the gap between the sampler's distribution and the trainer's.
CORRECTIONS = ("none", "token-tis", "token-mask", "sequence-tis", "sequence-mask")


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target]: logits [B,T,V], targets [B,T] -> [B,T] float32.

    Uses logsumexp and a gather instead of a full log_softmax, so at most one extra
    [B,T,V] float32 tensor exists (the upcast of half-precision logits).
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): [B,T,V] -> [B,T] float32.

    H = logsumexp(z) − Σ_v p_v z_v; the sum is a batched dot product, so only the
    probabilities (and the upcast for half-precision input) are materialised.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    expected = (probs.unsqueeze(-2) @ logits.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - expected


def aggregate(values: Tensor, mask: Tensor, mode: str, total_tokens: float,
              total_seqs: float) -> Tensor:
    """Reduce per-token values [B,T] over the real tokens of ``mask`` [B,T] to a scalar.

    token-mean:          Σ v·m / total_tokens
    seq-mean-token-mean: Σ_seq (Σ_t v·m / Σ_t m) / total_seqs   (empty rows count 0)
    seq-mean-token-sum:  Σ v·m / total_seqs
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {', '.join(AGG_MODES)}")
    keep = mask.bool()
    # where() rather than v*m: padding may hold inf/NaN (e.g. a KL on garbage logits).
    v = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token-mean":
        return v.sum() / _positive(total_tokens, "total_tokens")
    total_seqs = _positive(total_seqs, "total_seqs")
    row = v.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        row = row / keep.sum(dim=-1).clamp_min(1)
    return row.sum() / total_seqs


def _positive(x: float, name: str) -> float:
    if not x > 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return float(x)


def importance_ratio(logp: Tensor, old_logp: Tensor | None) -> Tensor:
    """π/π_old per token [B,T]. On-policy (old_logp None) it is exp(logp − logp.detach()):
    exactly 1.0 in value with gradient ∇logp, so one code path serves both cases."""
    return torch.exp(logp - (logp.detach() if old_logp is None else old_logp))


def rollout_correction(logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str,
                       cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights [B,T] (detached) for the gap between the policy being trained and the
    engine that sampled, and their statistics as sums over the masked tokens.

    logp [B,T] is log π_θ of the sampled tokens, sampler_logp [B,T] the engine's own log π_s
    of them, mask [B,T] marks response tokens, cap C > 1. With ρ_t = π_θ(y_t)/π_s(y_t) and
    the sequence's geometric mean ρ̄ = exp(mean_t log ρ_t):
      none           w = 1
      token-tis      w = min(ρ_t, C)                   (truncated importance sampling)
      token-mask     w = 1 if 1/C <= ρ_t <= C, else 0
      sequence-tis   w = min(ρ̄, C) on every token of the sequence
      sequence-mask  w = 1 if 1/C <= ρ̄ <= C, else 0, for the whole sequence
    Stats (sums, so the caller can add micro-batches and ranks): "tokens", "kl" (Σ of the
    k3 estimate of KL(π_s ‖ π_θ) per token, ρ − 1 − log ρ, from samples of π_s),
    "weight" (Σ w), "weight_max", "corrected" (tokens whose w was capped or zeroed), and
    "seqs" / "seqs_corrected" for the sequence modes.
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; allowed: {', '.join(CORRECTIONS)}")
    keep = mask.bool()
    log_rho = torch.where(keep, (logp.detach().float() - sampler_logp.float()), 0.0)
    rho = torch.exp(log_rho)
    lo, hi = 1.0 / _positive(cap, "cap"), float(cap)
    corrected = torch.zeros_like(keep)
    stats: dict[str, Tensor] = {}
    if mode == "none":
        weights = torch.ones_like(rho)
    elif mode == "token-tis":
        weights = rho.clamp(max=hi)
        corrected = rho > hi
    elif mode == "token-mask":
        inside = (rho >= lo) & (rho <= hi)
        weights, corrected = inside.float(), ~inside
    else:
        n = keep.sum(-1).clamp_min(1)
        seq_rho = torch.exp(log_rho.sum(-1) / n)                  # [B]
        if mode == "sequence-tis":
            seq_w, seq_corrected = seq_rho.clamp(max=hi), seq_rho > hi
        else:
            seq_corrected = (seq_rho < lo) | (seq_rho > hi)
            seq_w = (~seq_corrected).float()
        weights = seq_w.unsqueeze(-1).expand_as(rho)
        corrected = seq_corrected.unsqueeze(-1).expand_as(keep)
        has_tokens = keep.any(-1)
        stats["seqs"] = has_tokens.sum().float()
        stats["seqs_corrected"] = (seq_corrected & has_tokens).sum().float()
    weights = torch.where(keep, weights, 0.0)
    stats.update({
        "tokens": keep.sum().float(),
        "kl": torch.where(keep, rho - 1 - log_rho, 0.0).sum(),
        "weight": weights.sum(),
        "weight_max": weights.max() if weights.numel() else weights.new_zeros(()),
        "corrected": (corrected & keep).sum().float(),
    })
    return weights.to(logp.dtype), stats


def policy_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
                agg: str, total_tokens: float, total_seqs: float,
                clip_eps: float | None = None, entropy: Tensor | None = None,
                entropy_coef: float = 0.0, ref_logp: Tensor | None = None,
                kl_coef: float = 0.0, is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Surrogate loss to minimise for one micro-batch, and its statistics.

    logp [B,T] (with grad), old_logp [B,T] or None (exact on-policy), advantages [B]
    (broadcast over each response's tokens) or [B,T] (one per token, as on-policy
    distillation gives, opo.distill), mask [B,T]. Per token the loss is
    −A·ratio, or with old_logp and clip_eps the PPO form
    max(−A·ratio, −A·clamp(ratio, 1−ε, 1+ε)). Optional terms, each reduced with the
    same ``agg``: −entropy_coef·H (entropy [B,T]) and +kl_coef·k3(ref_logp ‖ logp) with
    k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0. ``is_weights`` [B,T] (detached, from
    ``rollout_correction``) multiply the policy-gradient term of each token.

    Stats (floats) are plain means over this micro-batch's masked tokens: pg_loss,
    ratio_mean, ratio_max, clip_frac, plus entropy / kl when those terms are used.
    """
    for name, t in (("old_logp", old_logp), ("mask", mask), ("entropy", entropy),
                    ("ref_logp", ref_logp), ("is_weights", is_weights)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if logp.dim() != 2 or advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"need logp [B,T] and advantages [B] or [B,T], got {tuple(logp.shape)} "
                         f"and {tuple(advantages.shape)}")

    def reduce(values: Tensor) -> Tensor:
        return aggregate(values, mask, agg, total_tokens, total_seqs)

    keep = mask.bool()
    adv = advantages.detach().to(logp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    ratio = importance_ratio(logp, old_logp)
    pg = -adv * ratio
    clipped = torch.zeros_like(keep)
    if old_logp is not None and clip_eps is not None:
        pg_clip = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
        clipped = pg_clip > pg  # the clamped branch wins, so this token gets no gradient
        pg = torch.maximum(pg, pg_clip)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = reduce(pg)

    stats = {"pg_loss": pg, "ratio_mean": ratio, "clip_frac": clipped}
    if entropy is not None and entropy_coef > 0:
        loss = loss - entropy_coef * reduce(entropy)
        stats["entropy"] = entropy
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        loss = loss + kl_coef * reduce(kl)
        stats["kl"] = kl

    with torch.no_grad():
        n = keep.sum().clamp_min(1)
        means = [torch.where(keep, v.detach().float(), 0.0).sum() / n for v in stats.values()]
        # ratio > 0, so masked-out zeros never win the max (and an empty mask gives 0).
        r_max = (torch.where(keep, ratio.detach(), 0.0).amax() if ratio.numel()
                 else ratio.new_zeros(()))
        values = torch.stack(means + [r_max.float()]).tolist()  # one device sync
    out = dict(zip(stats, values[:-1]))
    out["ratio_max"] = values[-1]
    return loss, out

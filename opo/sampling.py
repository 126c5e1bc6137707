"""The sampling distribution, as pure tensor maths.

Exact on-policy training must score tokens under the very distribution they were drawn
from. A sampler with temperature T, top-k and top-p (nucleus) filtering draws from

    pi_s(v) ∝ exp(z_v / T)  for v in S(z),  0 elsewhere,

where S(z) is the set of tokens that survive top-k (the k largest logits, ties kept), then
top-p (the smallest high-probability set whose mass under the renormalised top-k
distribution reaches p; a token is dropped when the mass of all tokens *less* likely than
or as likely as it, itself included, is at most 1 − p). This matches transformers'
temperature, top-k and top-p warpers applied in that order.

Every engine samples through `filter_logits` and every scorer (the trainer's loss, the
KL probe, the entropy metric) goes through the same function, so sampler and trainer
agree up to floating-point noise, which `logp_mismatch` measures each step.

Shapes: `[..., V]` logits over a vocabulary of V; leading dimensions are free.
"""

from __future__ import annotations

import torch
from torch import Tensor


def uses_filtering(top_p: float, top_k: int) -> bool:
    """True when top-p or top-k removes tokens, i.e. the support is not the whole vocabulary."""
    return top_p < 1.0 or top_k > 0


def filter_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  keep: Tensor | None = None) -> Tensor:
    """Logits of the sampling distribution: [..., V] -> [..., V] float32.

    Divides by `temperature` (> 0) and sets tokens outside the top-k / top-p support to
    −inf. `keep` [...] (token ids) forces those tokens into the support: the trainer
    passes the tokens the sampler actually drew, so that floating-point noise between
    two forward passes can never turn a drawn token's log-probability into −inf (the
    mismatch metric still reports the difference honestly). The support is chosen
    without gradient; the result is differentiable with respect to `logits` inside it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a sampling distribution, got {temperature}")
    z = _scaled(logits, temperature)
    if not uses_filtering(top_p, top_k):
        return z
    with torch.no_grad():
        removed = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        if top_k > 0 and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
            removed |= z < kth
        if top_p < 1.0:
            masked = z.masked_fill(removed, float("-inf"))
            ascending, order = torch.sort(masked, dim=-1)
            mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = mass_below <= (1.0 - top_p)
            drop_sorted[..., -1] = False  # the most likely token always stays
            removed |= drop_sorted.scatter(-1, order, drop_sorted)
        if keep is not None:
            removed.scatter_(-1, keep.long().unsqueeze(-1), False)
    return z.masked_fill(removed, float("-inf"))


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32 (the logits themselves when already float32 and T = 1)."""
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def target_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0) -> Tensor:
    """log pi_s(target) for logits [..., V] and targets [...]: returns [...] float32.

    A logsumexp and a gather instead of a full log-softmax: one [..., V] float32 tensor
    (the filtered logits) is all that is materialised.
    """
    z = filter_logits(logits, temperature, top_p, top_k, keep=targets)
    picked = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            grad: bool = False) -> Tensor:
    """Entropy of the sampling distribution, [..., V] -> [...] float32: detached (a metric),
    or with `grad` differentiable with respect to `logits` (an entropy bonus; the support
    itself is chosen without gradient).

    H = logsumexp(z) − Σ_v p_v z_v over the support (tokens outside it have p_v = 0 and
    contribute nothing; masking avoids 0 · (−inf)).
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = filter_logits(logits if grad else logits.detach(), temperature, top_p, top_k)
        probs = torch.softmax(z, dim=-1)
        finite = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))
        return torch.logsumexp(z, dim=-1) - (probs * finite).sum(-1)


def target_logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0,
                                top_p: float = 1.0, top_k: int = 0) -> tuple[Tensor, Tensor]:
    """`target_logprobs` and (detached) `entropy` of the same logits [..., V], as [...] each.

    Over the whole vocabulary both come from one logsumexp: H = lse − Σ_v p_v z_v with
    p = exp(z − lse), so the entropy costs one more pass over the logits instead of a
    softmax, a mask and a second logsumexp. With top-k/top-p filtering the two are computed
    apart (the entropy's support does not force the drawn token in)."""
    if uses_filtering(top_p, top_k):
        return target_logprobs(logits, targets, temperature, top_p, top_k), entropy(logits, temperature, top_p, top_k)
    z = filter_logits(logits, temperature)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logp = (z.gather(-1, targets.long().unsqueeze(-1)) - lse).squeeze(-1)
    with torch.no_grad():
        z, lse = z.detach(), lse.detach()
        ent = lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(-1)
    return logp, ent


# Tokens per block of the two-level inverse-CDF draw in `sample`.
SAMPLE_BLOCK = 256


def sample(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits [B, V]: (tokens [B] long, their log pi_s [B]).

    temperature <= 0 means greedy: the arg-max, with log-probability 0 (a point mass).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    z = filter_logits(logits, temperature, top_p, top_k)
    top = z.amax(dim=-1, keepdim=True)  # finite: the filter always keeps the most likely token
    # Unnormalised probabilities, 0 outside the support: in place when z is a fresh tensor
    # (one [B, V] float32 tensor fewer to allocate and fault in at every decode step).
    fresh = z.data_ptr() != logits.data_ptr()
    weights = (z.sub_(top) if fresh else z - top).exp_()
    tokens, total = inverse_cdf_draw(weights, generator)
    # A drawn token is inside the support, so its filtered logit is its scaled logit.
    drawn = _scaled(logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), temperature)
    return tokens, drawn - (top.squeeze(-1) + total.log().float())


def inverse_cdf_draw(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw an index per row with probability proportional to weights [B, V] (>= 0, float32):
    (indices [B] long, the row totals [B] float64).

    The draw is the first index whose cumulative weight exceeds u ~ U[0, total), found in two
    levels: the row's blocks of `SAMPLE_BLOCK` weights are summed and the block is chosen on
    their cumulative sum, then the index inside that block on its own cumulative sum. The law
    is the flat inverse CDF's; the work is one pass of block sums instead of a cumulative sum
    over the whole vocabulary (for 32 rows of SmolLM2's 49,152 tokens on a 2-core Xeon,
    torch.multinomial, one exponential variate per entry, cost ~25 ms and a flat float64
    cumsum ~10 ms; this ~1.3 ms: benchmarks/bench_sampling.py).
    Each block is summed in float32 (the CPU's vectorised cascade sum: relative error ~1e-7 of
    the block's mass, against a float64 sum that first copies the whole [B, V] tensor, three
    times the cost of the draw itself at SmolLM2's vocabulary); the cumulative sums, across
    blocks and within the chosen one, run in float64. An entry of weight 0
    adds nothing to a cumulative sum, so it can never be the first to exceed u; u itself can
    round up to a total, and the last entry with weight (where the sum first reaches the total)
    is then the draw, at both levels.
    """
    rows, size = weights.shape
    block = min(SAMPLE_BLOCK, size)
    n_blocks, whole = -(-size // block), size // block
    sums = weights.new_zeros(rows, n_blocks, dtype=torch.float64)
    sums[:, :whole] = weights[:, :whole * block].reshape(rows, whole, block).sum(-1)
    if whole < n_blocks:
        sums[:, whole] = weights[:, whole * block:].sum(-1)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand((rows, 1), dtype=torch.float64, device=weights.device, generator=generator) * total
    chosen = _first_above(cdf, u)                                             # [B, 1]
    before = torch.nn.functional.pad(cdf, (1, 0)).gather(-1, chosen)         # mass of the blocks before it
    index = chosen * block + torch.arange(block, device=weights.device)       # [B, block]
    inside = index < size  # a last, shorter block
    within = (weights.gather(-1, index.clamp_max(size - 1)).double() * inside).cumsum(-1)
    offset = _first_above(within, u - before)
    return (chosen * block + offset).squeeze(-1), total.squeeze(-1)


def _first_above(cdf: Tensor, u: Tensor) -> Tensor:
    """[B, 1]: the first position where the non-decreasing cdf [B, N] exceeds u [B, 1], or,
    where u reaches the last value (rounding), the first position that reaches it."""
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(torch.searchsorted(cdf, u.contiguous(), right=True), last)


__all__ = ["uses_filtering", "filter_logits", "target_logprobs", "entropy", "target_logprobs_and_entropy",
           "sample", "inverse_cdf_draw"]

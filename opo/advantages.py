"""Advantage estimators: one scalar advantage per response.

The policy gradient of a sampled response y with reward r is ∇logπ(y)·(r − b). Any
baseline b that does not depend on y keeps the estimate unbiased; the one that
minimises its variance is

    b* = E[‖∇logπ(y)‖² · r] / E[‖∇logπ(y)‖²].

OPO (Hao et al. 2025) makes this usable with one cheap proxy: logπ(y) is a sum of
per-token log-probabilities whose gradients are roughly orthogonal and of similar
size, so ‖∇logπ(y)‖² grows like the response length l. Over the responses sampled
for one prompt this gives the length-weighted mean reward

    b = Σ lᵢ rᵢ / Σ lᵢ,    Aᵢ = rᵢ − b,

with no division by a standard deviation (that would rescale the gradient and move
it away from the exact on-policy one).

The other estimators are the usual baselines for comparison. Every estimator is a
pure, vectorised function registered in ``ESTIMATORS``; ``compute_advantages``
validates the inputs, maps arbitrary group ids to 0..G-1 and calls it. Estimators
work in float64 so that group sums of many rewards stay exact to float32 precision.

Two estimators go beyond the paper and test its assumption instead of making it:
``opo_exact`` and ``opo_proxy`` weight the baseline by a per-response estimate wᵢ of
‖∇logπ(yᵢ)‖² itself, b = Σ wᵢ rᵢ / Σ wᵢ. Such an estimator declares what it needs
(``needs="grad_sq_norm_exact"`` or ``"grad_sq_norm_proxy"``, see ``estimator_needs``)
and the caller passes ``weights=`` to ``compute_advantages``; ``opo.gradnorm``
computes both kinds of weight from a model and a packed batch.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from opo.schema import Config, require

# fn(rewards[B] f64, lengths[B] f64, group_index[B] long, num_groups, **options) -> [B] f64
# An estimator registered with needs=... also receives weights=[B] f64 (all finite, >= 0).
Estimator = Callable[..., Tensor]
ESTIMATORS: dict[str, Estimator] = {}

# What an estimator may ask the caller for, besides rewards, lengths and groups:
# per-response weights wᵢ ≈ ‖∇_θ logπ(yᵢ|x)‖², computed exactly (one backward pass per
# response; small models) or from the logits alone (one forward pass; any size).
WEIGHT_KINDS = ("grad_sq_norm_exact", "grad_sq_norm_proxy")


def check_config(cfg: Config) -> None:
    """algo.estimator names a registered estimator (opo.config runs this with the others)."""
    require(cfg.algo.estimator in ESTIMATORS, "algo.estimator",
            "use one of " + ", ".join(sorted(ESTIMATORS)), cfg.algo.estimator)


def register(name: str, needs: str | None = None) -> Callable[[Estimator], Estimator]:
    """Decorator that adds an estimator to ``ESTIMATORS`` under ``name``.

    ``needs`` names the per-response weights (one of ``WEIGHT_KINDS``) the estimator
    takes as ``weights=``; ``estimator_needs(name)`` tells the trainer which to compute.
    """
    if needs is not None and needs not in WEIGHT_KINDS:
        raise ValueError(f"needs={needs!r} is not a known weight kind; use one of "
                         + ", ".join(WEIGHT_KINDS))

    def add(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        fn.needs = needs
        ESTIMATORS[name] = fn
        return fn
    return add


def estimator_needs(estimator: str) -> str | None:
    """The weight kind (from ``WEIGHT_KINDS``) that ``estimator`` needs, or None."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; "
                         f"known: {', '.join(sorted(ESTIMATORS))}")
    return getattr(ESTIMATORS[estimator], "needs", None)


def compute_advantages(estimator: str, rewards: Tensor, lengths: Tensor, group_ids: Tensor,
                       weights: Tensor | None = None, **options) -> Tensor:
    """Advantages [B] (float32, on rewards' device) for rewards [B] of responses with
    token lengths [B] (all >= 1); responses with equal group_ids [B] (any integers)
    answer the same prompt. ``weights`` [B] (finite, >= 0) is required by, and only
    accepted for, estimators that declare ``needs`` (see ``estimator_needs``).
    ``options`` go to the estimator (e.g. ``eps``)."""
    needs = estimator_needs(estimator)
    shapes = {"rewards": rewards.shape, "lengths": lengths.shape, "group_ids": group_ids.shape}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError("rewards, lengths and group_ids must be 1-D of equal length, got "
                         + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()))
    if rewards.numel() == 0:
        raise ValueError("cannot compute advantages of an empty batch")
    gdt = group_ids.dtype
    if gdt.is_floating_point or gdt.is_complex or gdt == torch.bool:
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    device = rewards.device
    r = rewards.detach().to(device=device, dtype=torch.float64)
    l = lengths.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()):
        bad = (~torch.isfinite(r)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"rewards must be finite; NaN/inf at index {bad}")
    ok = torch.isfinite(l) & (l >= 1)  # NaN fails `>= 1` too
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()[:5].tolist()
        raise ValueError(f"lengths must be finite and >= 1 (a response has at least one "
                         f"token); bad at index {bad}: {l[bad].tolist()}")
    if needs is not None:
        options = {**options, "weights": _checked_weights(estimator, needs, weights, r)}
    elif weights is not None:
        raise ValueError(f"advantage estimator {estimator!r} takes no weights; only "
                         + ", ".join(sorted(n for n, f in ESTIMATORS.items()
                                            if getattr(f, "needs", None))) + " do")
    fn = ESTIMATORS[estimator]
    try:  # check options against the signature without calling, so real TypeErrors surface
        inspect.signature(fn).bind(r, l, r, 0, **options)
    except TypeError as e:
        raise ValueError(f"bad option for advantage estimator {estimator!r}: {e}") from None
    ids, group_index = torch.unique(group_ids.to(device), return_inverse=True)
    return fn(r, l, group_index, ids.numel(), **options).to(torch.float32)


def _checked_weights(estimator: str, needs: str, weights: Tensor | None, r: Tensor) -> Tensor:
    if weights is None:
        raise ValueError(f"advantage estimator {estimator!r} needs weights={needs} per response "
                         f"(opo.gradnorm.response_weights({needs!r}, model, packed))")
    if weights.shape != r.shape:
        raise ValueError(f"weights must have the rewards' shape {tuple(r.shape)}, "
                         f"got {tuple(weights.shape)}")
    w = weights.detach().to(device=r.device, dtype=torch.float64)
    ok = torch.isfinite(w) & (w >= 0)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()[:5].tolist()
        raise ValueError(f"weights must be finite and >= 0; bad at index {bad}: {w[bad].tolist()}")
    return w


def _group_sum(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """[B] -> [G]: sum of values in each group."""
    return values.new_zeros(num_groups).index_add_(0, group_index, values)


def _group_mean(r: Tensor, group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-sample group mean [B] (0 for singleton groups) and group size [B]."""
    n = _group_sum(torch.ones_like(r), group_index, num_groups)
    mean = _group_sum(r, group_index, num_groups) / n
    mean = torch.where(n > 1, mean, torch.zeros_like(mean))
    return mean[group_index], n[group_index]


@register("opo")
def opo(rewards, lengths, group_index, num_groups):
    """Length-weighted group mean reward as baseline: Aᵢ = rᵢ − Σ_g lr / Σ_g l."""
    n = _group_sum(torch.ones_like(rewards), group_index, num_groups)
    baseline = (_group_sum(lengths * rewards, group_index, num_groups)
                / _group_sum(lengths, group_index, num_groups))
    # A lone response would get A = 0 and teach nothing; verl leaves it unbaselined.
    baseline = torch.where(n > 1, baseline, torch.zeros_like(baseline))
    return rewards - baseline[group_index]


def weighted_group_baseline(rewards: Tensor, weights: Tensor, group_index: Tensor,
                            num_groups: int) -> Tensor:
    """Per-response baseline [B]: Σ_g w r / Σ_g w over the response's group.

    rewards [B], weights [B] (>= 0), group_index [B] in 0..num_groups-1. A group whose
    weights sum to 0 falls back to its plain mean (every weight equal), and a group of
    one gets baseline 0, as in ``opo``.
    """
    n = _group_sum(torch.ones_like(rewards), group_index, num_groups)
    w_sum = _group_sum(weights, group_index, num_groups)
    weighted = _group_sum(weights * rewards, group_index, num_groups) / w_sum.clamp_min(1e-300)
    plain = _group_sum(rewards, group_index, num_groups) / n
    baseline = torch.where(w_sum > 0, weighted, plain)
    return torch.where(n > 1, baseline, torch.zeros_like(baseline))[group_index]


@register("opo_exact", needs="grad_sq_norm_exact")
def opo_exact(rewards, lengths, group_index, num_groups, *, weights):
    """Optimal-baseline plug-in with the true ‖∇logπ(yᵢ)‖²: Aᵢ = rᵢ − Σ_g w r / Σ_g w."""
    return rewards - weighted_group_baseline(rewards, weights, group_index, num_groups)


@register("opo_proxy", needs="grad_sq_norm_proxy")
def opo_proxy(rewards, lengths, group_index, num_groups, *, weights):
    """As ``opo_exact`` with wᵢ = Σ_t ‖∂logπ(y_t)/∂z_t‖² (logit-gradient proxy, forward only)."""
    return rewards - weighted_group_baseline(rewards, weights, group_index, num_groups)


@register("opo_batch")
def opo_batch(rewards, lengths, group_index, num_groups):
    """One length-weighted baseline over the whole batch, ignoring groups."""
    if rewards.numel() == 1:  # same convention as a singleton group in `opo`
        return rewards.clone()
    return rewards - (lengths * rewards).sum() / lengths.sum()


@register("grpo")
def grpo(rewards, lengths, group_index, num_groups, *, eps: float = 1e-6):
    """(r − group mean) / (unbiased group std + eps); singleton groups use mean 0, std 1."""
    mean, n = _group_mean(rewards, group_index, num_groups)
    centred = rewards - mean
    # Two-pass variance: subtracting the mean first avoids cancellation.
    sq = _group_sum(centred ** 2, group_index, num_groups)[group_index]
    std = torch.where(n > 1, (sq / (n - 1).clamp_min(1)).sqrt(), torch.ones_like(sq))
    return centred / (std + eps)


@register("dr_grpo")
def dr_grpo(rewards, lengths, group_index, num_groups):
    """GRPO without the std division (Dr. GRPO): r − group mean."""
    mean, _ = _group_mean(rewards, group_index, num_groups)
    return rewards - mean


@register("rloo")
def rloo(rewards, lengths, group_index, num_groups):
    """Leave-one-out: r minus the mean reward of the other members of the group."""
    n = _group_sum(torch.ones_like(rewards), group_index, num_groups)[group_index]
    total = _group_sum(rewards, group_index, num_groups)[group_index]
    others = torch.where(n > 1, (total - rewards) / (n - 1).clamp_min(1), torch.zeros_like(total))
    return rewards - others


@register("reinforce_pp")
def reinforce_pp(rewards, lengths, group_index, num_groups, *, eps: float = 1e-6):
    """REINFORCE++: whiten over the whole batch, ignoring groups.

    The reward reaches every token of its response, so the whitening statistics are
    taken over tokens, i.e. weighted by length: μ = Σ lr / Σ l and
    σ² = Σ l(r − μ)² / (Σ l − 1). The numerator r − μ is then exactly ``opo_batch``
    (for batches of more than one response; a lone response whitens to 0).
    """
    total = lengths.sum()
    mu = (lengths * rewards).sum() / total
    var = (lengths * (rewards - mu) ** 2).sum() / (total - 1).clamp_min(1)
    return (rewards - mu) / (var.sqrt() + eps)

"""Diagnostics: pass@k, majority vote, repetition, and the KL-from-start probe."""

from __future__ import annotations

from collections import Counter
from math import comb

import torch

from opo.sequences import Packed


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021) from n samples of which c are correct.

    1 - C(n-c, k) / C(n, k): the chance that k draws without replacement hit a correct one.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """1.0 when the most common extracted answer among the first k samples is correct.

    Ties go to the answer seen first; samples without an extracted answer do not vote.
    """
    votes = [(a, ok) for a, ok in zip(answers[:k], correct[:k]) if a is not None]
    if not votes:
        return 0.0
    counts = Counter(a for a, _ in votes)
    best = max(counts.values())
    winner = next(a for a, _ in votes if counts[a] == best)
    return float(next(ok for a, ok in votes if a == winner))


def repetition_rate(responses: list[list[int]], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same response, over the batch."""
    repeated, total = repetition_counts(responses, n)
    return repeated / total if total else 0.0


def repetition_counts(responses: list[list[int]], n: int = 4) -> tuple[int, int]:
    """(n-grams that repeat an earlier one of the same response, all n-grams), summed over
    the responses; counts add up across data-parallel ranks, rates would not."""
    repeated = total = 0
    for tokens in responses:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated, total


class KLProbe:
    """Estimate KL(pi_0 || pi_t) without keeping pi_0 in memory.

    At the start we sample a fixed set of responses from pi_0 (temperature 1) and store
    their tokens and pi_0 log-probs. Later, with r = pi_t(y)/pi_0(y) per token,

        KL(pi_0 || pi_t) ~= mean over probe tokens of (r - 1) - log r        ("k3")

    which is unbiased for tokens drawn from pi_0 and never negative, unlike the plain
    mean of log pi_0 - log pi_t ("k1"), which is noisy and can go below zero.
    It is a per-token KL along pi_0's own trajectories.
    """

    def __init__(self, packed: Packed, logp0: torch.Tensor):
        self.packed = packed  # the probe sequences, packed as for training
        self.logp0 = logp0    # [N, T] log pi_0 of each probe response token

    def state_dict(self) -> dict[str, torch.Tensor]:
        p = self.packed
        return {"probe.prompt_ids": p.prompt_ids, "probe.prompt_mask": p.prompt_mask,
                "probe.row_group": p.row_group, "probe.response_ids": p.response_ids,
                "probe.response_mask": p.response_mask, "probe.logp0": self.logp0}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "KLProbe":
        packed = Packed(d["probe.prompt_ids"], d["probe.prompt_mask"], d["probe.row_group"],
                        d["probe.response_ids"], d["probe.response_mask"])
        return cls(packed, d["probe.logp0"])

    @torch.no_grad()
    def estimate(self, logprob_fn) -> float:
        """logprob_fn(packed) -> log pi_t of every probe response token, [N, T]."""
        logp = logprob_fn(self.packed)
        log_ratio = (logp - self.logp0.to(logp.device)).double()
        k3 = torch.expm1(log_ratio) - log_ratio
        mask = self.packed.response_mask.to(logp.device).double()
        return float((k3 * mask).sum() / mask.sum().clamp(min=1))

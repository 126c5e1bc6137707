"""Diagnostics: pass@k, majority vote, repetition, and the KL-from-start probe."""

from __future__ import annotations

from fractions import Fraction
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
    """Unbiased maj@k from n samples: the expected correctness of a majority vote among k
    samples drawn without replacement from the n, averaged exactly over all C(n, k) draws.

    answers[i] is sample i's extracted answer (already normalised: votes count equal
    strings) or None, and None does not vote; a draw in which nobody votes scores 0. A tie
    for the most votes is broken uniformly at random, so a tie between a right and a wrong
    answer counts 1/2. An answer's correctness is the share of its samples judged correct
    (they agree unless the reward looked beyond the answer, e.g. at truncation).

    Cost: for each answer judged right at least once, a dynamic programme over the other
    answers' vote counts, polynomial in n (milliseconds for n = 64).
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"maj@k needs one correctness flag per answer, got {len(correct)} for {n}")
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
    groups: dict[str, list[bool]] = {}
    for answer, ok in zip(answers, correct):
        if answer is not None:
            groups.setdefault(answer, []).append(bool(ok))
    silent = n - sum(len(g) for g in groups.values())
    counts = {a: len(g) for a, g in groups.items()}
    total = Fraction(0)
    for answer, flags in groups.items():
        share = Fraction(sum(flags), len(flags))
        if share:
            others = [c for a, c in counts.items() if a != answer]
            total += share * _weighted_wins(counts[answer], others, silent, k)
    return float(total / comb(n, k))


def _weighted_wins(c: int, others: list[int], silent: int, k: int) -> Fraction:
    """Sum over k-subsets of 1/(number of answers tied for the most votes), counting only the
    subsets in which the answer with `c` samples is among them (others: the other answers'
    sample counts; silent: samples without an answer)."""
    total = Fraction(0)
    for v in range(1, min(c, k) + 1):  # v = votes the answer gets in the subset
        rest = k - v
        # ways[(s, t)]: ways to draw s samples from the groups seen so far with every other
        # answer at most v votes, t of them exactly v (tied with ours).
        ways = {(s, 0): comb(silent, s) for s in range(min(silent, rest) + 1)}
        for size in others:
            new: dict[tuple[int, int], int] = {}
            for (s, t), w in ways.items():
                for x in range(min(size, v, rest - s) + 1):
                    key = (s + x, t + (x == v))
                    new[key] = new.get(key, 0) + w * comb(size, x)
            ways = new
        picks = comb(c, v)
        total += sum(Fraction(picks * w, t + 1) for (s, t), w in ways.items() if s == rest)
    return total


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

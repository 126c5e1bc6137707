"""Verifiable rewards: answer extraction, built-in checks, and isolated scoring.

    extract.py   the final answer in a response (boxes, last number, answer markers)
    kinds.py     built-in reward kinds, the `REWARDS` registry, user functions, math_equivalent
    pool.py      `IsolatedPool`: killable worker processes with a hard per-call deadline
    worker.py    the worker process itself (standard library only, so it starts fast)
    scorer.py    `RewardScorer`: one reward kind over a batch, failures contained and counted

A reward function has the signature ``f(prompt: str, response: str, example: dict) -> float``,
where ``example`` is ``{"question": str, "answer": str, "meta": dict}``. Model output is hostile
input: checks that can be slow (math_verify and user functions by default) run in worker
processes that are killed at their deadline. Any failure (exception, timeout, NaN, a
non-number) scores 0 and is counted.

Every module of this package imports only the standard library at import time (math_verify
and reasoning_gym are imported on first use), so a worker process starts quickly.
"""

from opo.rewards.extract import (ANSWER_FORMATS, AUTO_BARE_MAX_CHARS, bare_answer_allowed, committed_answer,
                                 extract_boxed, extract_final_answer, normalise_answer)
from opo.rewards.kinds import (ANSWERS, IN_PROCESS_KINDS, REWARDS, answer_for, exact_match, format_reward,
                               load_user_reward, math_equivalent, math_verify_reward, reasoning_gym_reward)
from opo.rewards.pool import IsolatedPool, Outcome
from opo.rewards.scorer import TRUNCATED_POLICIES, RewardResult, RewardScorer

__all__ = [
    "extract_boxed", "extract_final_answer", "exact_match", "format_reward", "math_equivalent",
    "math_verify_reward", "reasoning_gym_reward", "load_user_reward", "Outcome", "IsolatedPool",
    "RewardResult", "RewardScorer", "REWARDS", "IN_PROCESS_KINDS", "ANSWERS", "answer_for",
    "ANSWER_FORMATS", "AUTO_BARE_MAX_CHARS", "TRUNCATED_POLICIES", "bare_answer_allowed",
    "committed_answer", "normalise_answer",
]

"""`RewardScorer`: scores a batch of responses with one reward kind, containing failures."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from opo.rewards.kinds import (_PRELOAD, IN_PROCESS_KINDS, REWARDS, _rg_meta, format_reward,
                               load_user_reward)
from opo.rewards.pool import IsolatedPool, Outcome


@dataclass
class RewardResult:
    rewards: list[float]  # correctness + format_weight * format
    correct: list[bool]  # correctness score >= 1 - 1e-6
    errors: int = 0  # exceptions, timeouts, NaN/inf and non-number returns (each scored 0)
    timeouts: int = 0
    error_messages: list[str] = field(default_factory=list)  # the first few, shortened


_MAX_MESSAGES = 5


def _as_score(value: Any) -> tuple[float, str | None]:
    """A reward value as a finite float, or 0.0 and why it was rejected."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        score = float(value)
        if math.isfinite(score):
            return score, None
        return 0.0, f"returned {score}"
    return 0.0, f"returned {type(value).__name__}, not a number"


class RewardScorer:
    """Scores batches of responses with one reward kind; see `REWARDS` for the built-in kinds.

    kind: a key of `REWARDS` or ``"module:function"``. isolate: ``"auto"`` runs math_verify
    and user functions in an `IsolatedPool` (hard `timeout_s` per check, `workers` processes)
    and the cheap built-ins in-process; ``"always"``/``"never"`` force one way. In-process
    checks have no timeout. Every failure scores 0 and is counted; the batch always completes.
    """

    def __init__(self, kind: str = "exact_match", format_weight: float = 0.0,
                 timeout_s: float = 5.0, workers: int = 2, isolate: str = "auto"):
        if kind in REWARDS:
            self.fn = REWARDS[kind]
            self.fn_ref = f"{self.fn.__module__}:{self.fn.__qualname__}"
        elif ":" in kind:
            self.fn = load_user_reward(kind)  # fail now, with a clear message, not per call
            self.fn_ref = kind
        else:
            raise ValueError(f"unknown reward kind {kind!r}: use one of {sorted(REWARDS)} "
                             "or 'module:function'")
        if isolate not in ("auto", "always", "never"):
            raise ValueError(f"isolate must be 'auto', 'always' or 'never', not {isolate!r}")
        self.kind = kind
        self.format_weight = float(format_weight)
        self.isolated = isolate == "always" or (isolate == "auto" and kind not in IN_PROCESS_KINDS)
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool: IsolatedPool | None = None
        if self.isolated and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")

    def score(self, prompts: list[str], responses: list[str], examples: list[dict]) -> RewardResult:
        if not len(prompts) == len(responses) == len(examples):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(examples)} examples; they must match")
        if self.kind == "reasoning_gym":
            for example in examples:
                _rg_meta(example)  # a data mistake: raise rather than score everything 0
        calls = list(zip(prompts, responses, examples))
        if self.isolated:
            outcomes = self._run_isolated(calls)
        else:
            outcomes = [self._run_here(call) for call in calls]

        result = RewardResult(rewards=[], correct=[])
        for i, (outcome, (_, response, example)) in enumerate(zip(outcomes, calls)):
            error = outcome.error
            score = 0.0
            if error is None:
                score, error = _as_score(outcome.value)
            if error is not None:
                result.errors += 1
                result.timeouts += outcome.timed_out
                if len(result.error_messages) < _MAX_MESSAGES:
                    result.error_messages.append(f"{self.kind} on response {i}: {error}"[:200])
            reward = score
            if self.format_weight:
                reward += self.format_weight * format_reward("", response, example)
            result.rewards.append(reward)
            result.correct.append(score >= 1 - 1e-6)
        return result

    def _run_here(self, call: tuple) -> Outcome:
        try:
            return Outcome(value=self.fn(*call))
        except Exception as exc:  # noqa: BLE001 - a failing check scores 0, the run goes on
            return Outcome(error=f"{type(exc).__name__}: {exc}")

    def _run_isolated(self, calls: list[tuple]) -> list[Outcome]:
        if self._pool is None:
            preload = [self.fn_ref.partition(":")[0]] + _PRELOAD.get(self.kind, [])
            self._pool = IsolatedPool(self.workers, self.timeout_s, preload=preload)
        return self._pool.map(self.fn_ref, calls)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

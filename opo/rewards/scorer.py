"""`RewardScorer`: scores a batch of responses with one reward kind, containing failures."""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from opo.rewards.extract import ANSWER_FORMATS
from opo.rewards.kinds import (_PRELOAD, IN_PROCESS_KINDS, REWARDS, _rg_meta, answer_for, format_reward,
                               load_user_reward)
from opo.rewards.pool import IsolatedPool, Outcome

TRUNCATED_POLICIES = ("score", "zero")
FULL_SCORE = 1 - 1e-6  # a check's score at or above this is a correct answer


@dataclass
class RewardResult:
    """Per-response rewards for one batch, in the order the responses were given."""

    rewards: list[float]  # score (binarised unless partial_credit) + format_weight * format
    correct: list[bool]  # the check's score >= 1 - 1e-6; False for a zeroed truncated response
    answers: list[str | None] = field(default_factory=list)  # the answer the kind read, if any
    errors: int = 0  # exceptions, timeouts, NaN/inf and non-number returns (each scored 0)
    timeouts: int = 0
    truncated_zeroed: int = 0  # truncated responses given 0 under truncated="zero"
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


def _option_names(fn) -> set[str]:
    """Which of the scorer's keyword options (answer_format, truncated) `fn` accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"answer_format", "truncated"}
    return {name for name in ("answer_format", "truncated") if name in params
            and params[name].kind in (inspect.Parameter.KEYWORD_ONLY,
                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)}


class RewardScorer:
    """Scores batches of responses with one reward kind; see `REWARDS` for the built-in kinds.

    kind: a key of `REWARDS` or ``"module:function"``. isolate: ``"auto"`` runs math_verify
    and user functions in an `IsolatedPool` (hard `timeout_s` per check, `workers` processes)
    and the cheap built-ins in-process; ``"always"``/``"never"`` force one way. In-process
    checks have no timeout. Every failure scores 0 and is counted; the batch always completes.

    partial_credit: keep fractional scores (reasoning-gym gives 0.5 for some near misses);
    False turns every score into 1 (a full score) or 0, so that reward and accuracy agree.
    answer_format: ``"auto"``, ``"boxed"`` or ``"last_number"``, which answers count (see
    `opo.rewards.extract.bare_answer_allowed`); passed to the kind, or to a user function
    whose signature names ``answer_format``. truncated: ``"score"`` scores a response cut off
    at the token limit like any other; ``"zero"`` gives it 0 without running the check.
    """

    def __init__(self, kind: str = "exact_match", format_weight: float = 0.0,
                 timeout_s: float = 5.0, workers: int = 2, isolate: str = "auto",
                 partial_credit: bool = False, answer_format: str = "auto",
                 truncated: str = "score"):
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
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, "
                             f"not {answer_format!r}")
        if truncated not in TRUNCATED_POLICIES:
            raise ValueError(f"truncated must be 'score' or 'zero', not {truncated!r}")
        self.kind = kind
        self.format_weight = float(format_weight)
        self.partial_credit = bool(partial_credit)
        self.answer_format = answer_format
        self.truncated_policy = truncated
        self.options = _option_names(self.fn)
        self.isolated = isolate == "always" or (isolate == "auto" and kind not in IN_PROCESS_KINDS)
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool: IsolatedPool | None = None
        if self.isolated and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")

    @classmethod
    def from_config(cls, reward_cfg) -> "RewardScorer":
        """A scorer for an `opo.config.RewardConfig` (every field of it)."""
        return cls(kind=reward_cfg.kind, format_weight=reward_cfg.format_weight,
                   timeout_s=reward_cfg.timeout_s, workers=reward_cfg.workers,
                   isolate=reward_cfg.isolate, partial_credit=reward_cfg.partial_credit,
                   answer_format=reward_cfg.answer_format, truncated=reward_cfg.truncated)

    def score(self, prompts: list[str], responses: list[str], examples: list[dict],
              truncated: list[bool] | None = None) -> RewardResult:
        """Score response i of prompt i against example i.

        truncated[i]: whether response i hit the token limit (finish reason "length"). None
        means unknown and counts as not truncated; it is refused under truncated="zero",
        which cannot work without it.
        """
        if not len(prompts) == len(responses) == len(examples):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(examples)} examples; they must match")
        if truncated is None:
            if self.truncated_policy == "zero":
                raise ValueError("reward.truncated=zero needs to know which responses were "
                                 "truncated: pass truncated=[finish_reason == 'length', ...]")
            truncated = [False] * len(responses)
        elif len(truncated) != len(responses):
            raise ValueError(f"got {len(truncated)} truncated flags for {len(responses)} responses")
        truncated = [bool(t) for t in truncated]
        if self.kind == "reasoning_gym":
            for example in examples:
                _rg_meta(example)  # a data mistake: raise rather than score everything 0
        zeroed = [t and self.truncated_policy == "zero" for t in truncated]
        todo = [i for i in range(len(responses)) if not zeroed[i]]
        calls = [(prompts[i], responses[i], examples[i]) for i in todo]
        options = [self._options_for(truncated[i]) for i in todo]
        if self.isolated:
            outcomes = self._run_isolated(calls, options)
        else:
            outcomes = [self._run_here(call, kw) for call, kw in zip(calls, options)]
        outcome_of = dict(zip(todo, outcomes))

        result = RewardResult(rewards=[], correct=[], truncated_zeroed=sum(zeroed))
        for i, (response, example) in enumerate(zip(responses, examples)):
            result.answers.append(answer_for(self.kind, response, example, self.answer_format,
                                             truncated[i]))
            if zeroed[i]:
                result.rewards.append(0.0)
                result.correct.append(False)
                continue
            outcome = outcome_of[i]
            error = outcome.error
            score = 0.0
            if error is None:
                score, error = _as_score(outcome.value)
            if error is not None:
                result.errors += 1
                result.timeouts += outcome.timed_out
                if len(result.error_messages) < _MAX_MESSAGES:
                    result.error_messages.append(f"{self.kind} on response {i}: {error}"[:200])
            correct = score >= FULL_SCORE
            reward = score if self.partial_credit else float(correct)
            if self.format_weight:
                reward += self.format_weight * format_reward("", response, example,
                                                             answer_format=self.answer_format,
                                                             truncated=truncated[i])
            result.rewards.append(reward)
            result.correct.append(correct)
        return result

    def _options_for(self, truncated: bool) -> dict:
        options = {"answer_format": self.answer_format, "truncated": truncated}
        return {name: value for name, value in options.items() if name in self.options}

    def _run_here(self, call: tuple, options: dict) -> Outcome:
        try:
            return Outcome(value=self.fn(*call, **options))
        except Exception as exc:  # noqa: BLE001 - a failing check scores 0, the run goes on
            return Outcome(error=f"{type(exc).__name__}: {exc}")

    def _run_isolated(self, calls: list[tuple], options: list[dict]) -> list[Outcome]:
        if self._pool is None:
            preload = [self.fn_ref.partition(":")[0]] + _PRELOAD.get(self.kind, [])
            self._pool = IsolatedPool(self.workers, self.timeout_s, preload=preload)
        return self._pool.map(self.fn_ref, calls, kwargs=options)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Built-in reward kinds and the registry that names them.

A reward function has the signature ``f(prompt: str, response: str, example: dict) -> float``,
where ``example`` is ``{"question": str, "answer": str, "meta": dict}``. Built-in kinds live in
`REWARDS`; a user function is named by an importable ``"module:function"`` string.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os
import sys
import threading
from typing import Any, Callable

from opo.rewards.extract import (_as_number, bare_answer_allowed, committed_answer, fallback_for,
                                 normalise_answer)
from opo.rewards.pool import IsolatedPool

RewardFn = Callable[[str, str, dict], Any]


# Every built-in kind takes two keyword options, which the scorer fills from the config:
#   answer_format  "auto" | "boxed" | "last_number": which answers count (opo.rewards.extract)
#   truncated      whether the response hit the token limit (unknown: False)
# A user function receives them too when its signature names them.


def exact_match_answer(response: str, example: dict, answer_format: str = "auto",
                       truncated: bool = False) -> str | None:
    """The answer `exact_match` compares: the last box; else, where the answer format allows a
    bare answer, the last number (numeric gold) or the text after the last answer marker."""
    gold = str(example.get("answer", ""))
    return committed_answer(response, fallback_for(gold), answer_format, truncated)


def exact_match(prompt: str, response: str, example: dict, *, answer_format: str = "auto",
                truncated: bool = False) -> float:
    """1.0 if the final answer equals ``example["answer"]`` after normalisation, else 0.0.

    Normalisation strips spaces, a trailing "." and thousands commas; two numbers compare by
    value ("5.0" equals "5", "0.5" equals "1/2").
    """
    gold = normalise_answer(str(example["answer"]))
    answer = exact_match_answer(response, example, answer_format, truncated)
    if answer is None:
        return 0.0
    answer = normalise_answer(answer)
    a, b = _as_number(answer), _as_number(gold)
    if a is not None and b is not None:
        return float(a == b)
    return float(answer == gold and gold != "")


def format_reward(prompt: str, response: str, example: dict, *, answer_format: str = "auto",
                  truncated: bool = False) -> float:
    """1.0 if a final answer can be extracted (as `exact_match` would look for it), else 0.0."""
    return float(exact_match_answer(response, example, answer_format, truncated) is not None)


@functools.lru_cache(maxsize=1)
def _math_verify():
    import logging

    import math_verify

    # We disable its signal-based timeouts (they need the main thread) and enforce our own;
    # it warns about that once per process, which would repeat at every worker start.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    configs = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
    return math_verify, configs


def _as_latex(text: str) -> str:
    # Bare strings such as "\frac12" are not extracted unless they sit in math delimiters.
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_verify_answer(response: str, example: dict, answer_format: str = "auto",
                       truncated: bool = False) -> str | None:
    """The answer `math_verify` checks: the last box; else, where the answer format allows a
    bare answer, the last number."""
    return committed_answer(response, "last_number", answer_format, truncated)


def _math_check(response_text: str, gold_answer: str, answer_format: str = "last_number",
                truncated: bool = False) -> float:
    """The unguarded check behind `math_equivalent`; run it only where it can be killed."""
    answer = committed_answer(response_text, "last_number", answer_format, truncated)
    if answer is None:
        return 0.0
    mv, configs = _math_verify()
    gold = mv.parse(_as_latex(gold_answer), extraction_config=configs, parsing_timeout=None)
    # parse() keeps the raw string next to the sympy value; a gold answer that produced no
    # sympy value at all ("???", "") is unparseable and must never verify as correct.
    if not any(not isinstance(g, str) for g in gold):
        return 0.0
    pred = mv.parse(_as_latex(answer), extraction_config=configs, parsing_timeout=None)
    if not pred:
        return 0.0
    return float(bool(mv.verify(gold, pred, timeout_seconds=None)))


def math_verify_reward(prompt: str, response: str, example: dict, *, answer_format: str = "auto",
                       truncated: bool = False) -> float:
    """Reward kind "math_verify": is `math_verify_answer` mathematically equal to
    ``example["answer"]``?

    It runs the check directly: the scorer isolates this kind in worker processes.
    """
    return _math_check(response, str(example["answer"]), answer_format, truncated)


@functools.lru_cache(maxsize=None)
def _rg_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _rg_meta(example: dict) -> tuple[str, dict]:
    meta = example.get("meta") or {}
    if "rg_task" not in meta or "rg_entry" not in meta:
        raise ValueError("reward kind 'reasoning_gym' needs example['meta']['rg_task'] and "
                         "example['meta']['rg_entry'] (use reasoning-gym data)")
    return meta["rg_task"], meta["rg_entry"]


def reasoning_gym_answer(response: str, example: dict, answer_format: str = "auto",
                         truncated: bool = False) -> str | None:
    """The answer passed to the task's scorer: the last box; else, where the answer format
    allows a bare answer, the last number (numeric gold) or the text after the last answer
    marker, else the last non-empty line; else None."""
    gold = str(((example.get("meta") or {}).get("rg_entry") or {}).get("answer", ""))
    answer = committed_answer(response, fallback_for(gold), answer_format, truncated)
    if answer is None and bare_answer_allowed(response, answer_format, truncated):
        lines = [line.strip() for line in response[-10_000:].splitlines() if line.strip()]
        answer = lines[-1] if lines else None
    return answer


def reasoning_gym_reward(prompt: str, response: str, example: dict, *,
                         answer_format: str = "auto", truncated: bool = False) -> float:
    """Reward kind "reasoning_gym": the task's own scorer on `reasoning_gym_answer`.

    Some tasks' scorers give partial credit (0.5 for "17" when the answer is 7, say); the
    scorer keeps or binarises it according to ``reward.partial_credit``.
    """
    task, entry = _rg_meta(example)
    answer = reasoning_gym_answer(response, example, answer_format, truncated)
    return _rg_scorer(task)(answer=answer or "", entry=entry)  # no task accepts ""


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math_verify": math_verify_reward,
    "reasoning_gym": reasoning_gym_reward,
}
# The answer each kind reads from a response, (response, example, answer_format, truncated)
# -> str | None. The evaluation shows it and majority votes count it. Kinds not listed
# (user functions) are shown the answer exact_match would read.
ANSWERS: dict[str, Callable[..., str | None]] = {
    "exact_match": exact_match_answer,
    "math_verify": math_verify_answer,
    "reasoning_gym": reasoning_gym_answer,
}
# Kinds cheap and safe enough to run in the trainer process under isolate="auto". Kinds not
# listed here (math_verify, new registrations, user functions) run in worker processes.
IN_PROCESS_KINDS = {"exact_match", "reasoning_gym"}
# Modules a worker imports at start-up so the slow import is not charged to a call's deadline.
_PRELOAD = {"math_verify": ["math_verify"]}


def answer_for(kind: str, response: str, example: dict, answer_format: str = "auto",
               truncated: bool = False) -> str | None:
    """The answer reward `kind` reads from `response` (for display and majority votes)."""
    return ANSWERS.get(kind, exact_match_answer)(response, example, answer_format, truncated)


def _import_user_module(module_name: str, spec: str):
    """Import `module_name`, looking in the current directory first, then on sys.path.

    The console script `opo` does not put the current directory on sys.path (Python puts the
    script's own folder there), so a reward.py next to the user's config would not be found.
    When the module's top-level name exists in the current directory, that directory goes to
    the front of sys.path for good: reward worker processes start with this sys.path too.
    """
    top = module_name.partition(".")[0]
    cwd = os.getcwd()
    try:
        in_cwd = importlib.machinery.PathFinder.find_spec(top, [cwd]) is not None
    except (ImportError, ValueError):
        in_cwd = False
    if in_cwd and not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            shown = [p or "." for p in sys.path[:4]] + (["..."] if len(sys.path) > 4 else [])
            raise ValueError(
                f"reward {spec!r}: cannot import module {module_name!r}: looked for {top}.py or a "
                f"package {top}/ in the current directory ({cwd}), then on sys.path ("
                + ", ".join(shown) + "). Put the file in the directory you run opo from, or add "
                "its directory to PYTHONPATH") from None
        raise ValueError(f"reward {spec!r}: importing module {module_name!r} failed: "
                         f"ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error in the user's module is reported
        raise ValueError(f"reward {spec!r}: importing module {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from None


def load_user_reward(spec: str) -> RewardFn:
    """Import a user reward function named ``"module:function"`` (dots allowed after the colon).

    The module is looked for in the current directory first, then on sys.path. Every failure
    is a ValueError whose message says what was tried.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function', e.g. my_rewards:score "
                         "for a function score in my_rewards.py")
    obj = _import_user_module(module_name, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute "
                             f"{attr!r}") from None
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


# --------------------------------------------------------------------------- math_equivalent

_shared_pool: IsolatedPool | None = None
_shared_pool_lock = threading.Lock()


def _get_shared_pool() -> IsolatedPool:
    global _shared_pool
    with _shared_pool_lock:
        if _shared_pool is None:
            _shared_pool = IsolatedPool(workers=2, timeout_s=5.0, preload=["math_verify"])
        return _shared_pool


def math_equivalent(response_text: str, gold_answer: str, timeout_s: float = 5.0) -> float:
    """1.0 if the response's final answer is mathematically equal to `gold_answer`, else 0.0.

    The final answer is the last ``\\boxed{}``, else the last number. The check runs in a shared
    worker process with a hard `timeout_s`; a timeout, an error or an unparseable gold answer
    gives 0.0. Safe to call from any thread (calls take turns on the shared pool).
    """
    if os.environ.get("OPO_IN_REWARD_WORKER"):
        # Already inside a killable worker (a user reward calling us): no nested pool.
        try:
            return _math_check(response_text, gold_answer)
        except Exception:
            return 0.0
    outcome = _get_shared_pool().map("opo.rewards.kinds:_math_check", [(response_text, gold_answer)],
                                     timeout_s=timeout_s)[0]
    return 1.0 if outcome.ok and outcome.value == 1.0 else 0.0

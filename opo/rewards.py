"""Verifiable rewards: answer extraction, built-in checks, and isolated scoring.

A reward function has the signature ``f(prompt: str, response: str, example: dict) -> float``,
where ``example`` is ``{"question": str, "answer": str, "meta": dict}``. Built-in kinds live in
`REWARDS`; a user function is named by an importable ``"module:function"`` string.

Model output is hostile input: a response can make sympy compute ``9^{9^{9^9}}`` or be a
megabyte long. Checks that can be slow (math_verify and user functions by default) run in
`IsolatedPool`, a few long-lived worker processes that are killed when a call passes its
deadline. Any failure (exception, timeout, NaN, a non-number) scores 0 and is counted.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import math
import multiprocessing
import numbers
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import wait
from typing import Any, Callable

__all__ = [
    "extract_boxed", "extract_final_answer", "exact_match", "format_reward", "math_equivalent",
    "math_verify_reward", "reasoning_gym_reward", "load_user_reward", "Outcome", "IsolatedPool",
    "RewardResult", "RewardScorer", "REWARDS",
]

RewardFn = Callable[[str, str, dict], Any]

# --------------------------------------------------------------------------- extraction

# Opening of a box; its closing brace is found by counting (see extract_boxed).
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: -3, 4.5, .5, 1,234,567 (thousands groups only, so "1,2" is two numbers), 1/2.
# The leading minus must not follow a word character, so "5-3" ends in "3", not "-3".
# Every part is a simple run or an optional suffix, so matching cannot backtrack badly.
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MARKERS = ("answer:", "####", "=")


def _closing_brace(text: str, start: int, limit: int) -> int | None:
    """Position of the "}" that closes the "{" at `start`, looking before `limit`; or None."""
    depth, pos = 1, start + 1
    while True:
        close = text.find("}", pos, limit)
        if close < 0:
            return None
        depth += text.count("{", pos, close) - 1  # str.find/count run in C: fast on long runs
        if depth == 0:
            return close
        pos = close + 1


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` whose braces balance, else None."""
    limit = len(text)
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        start = match.end() - 1
        end = _closing_brace(text, start, limit)
        if end is not None:
            return text[start + 1:end].strip()
        # This box never closes, so the depth after it stays above its own level: an earlier
        # box can only close before it. Each stretch of text is thus scanned once (linear).
        limit = start
    return None


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group().replace(",", "") if last else None


def _after_marker(text: str) -> str | None:
    lowered = text.lower()  # "Answer:" and "answer:" alike
    best, size = -1, 0
    for marker in _MARKERS:
        pos = lowered.rfind(marker)
        if pos > best:
            best, size = pos, len(marker)
    if best < 0:
        return None
    rest = text[best + size:].lstrip()
    line_end = rest.find("\n")
    line = rest if line_end < 0 else rest[:line_end]
    return line.strip().strip("*").strip() or None  # also drop markdown bold: "**Answer:** 4"


def extract_final_answer(text: str, fallback: str = "last_number") -> str | None:
    """The final answer in a response: the last box, else `fallback`, else None.

    fallback: ``"last_number"`` (last integer/decimal/fraction, thousands commas removed),
    ``"after_marker"`` (first line after the last "answer:", "####" or "=", case-insensitive),
    or ``"none"``.
    """
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    if fallback == "last_number":
        return _last_number(text)
    if fallback == "after_marker":
        return _after_marker(text)
    if fallback == "none":
        return None
    raise ValueError(f"fallback must be 'last_number', 'after_marker' or 'none', not {fallback!r}")


def _as_number(text: str) -> Fraction | None:
    # Only plain decimals and fractions of sane length: Fraction("1e999999999") would build
    # a billion-digit integer, and this runs in the trainer process.
    if len(text) > 100 or not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):  # "1.5/2" passes the pattern, not Fraction
        return None


def _normalise(text: str) -> str:
    text = "".join(text.split()).rstrip(".")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def _final_answer_for(response: str, gold: str) -> str | None:
    # A numeric gold answer is best found as the last number; any other answer as the text
    # after an "Answer:" marker (a last number would never match "yes" or "(1, 2)").
    fallback = "last_number" if _as_number(_normalise(gold)) is not None else "after_marker"
    return extract_final_answer(response, fallback)


# --------------------------------------------------------------------------- built-in rewards

def exact_match(prompt: str, response: str, example: dict) -> float:
    """1.0 if the final answer equals ``example["answer"]`` after normalisation, else 0.0.

    Normalisation strips spaces, a trailing "." and thousands commas; two numbers compare by
    value ("5.0" equals "5", "0.5" equals "1/2").
    """
    gold = _normalise(str(example["answer"]))
    answer = _final_answer_for(response, gold)
    if answer is None:
        return 0.0
    answer = _normalise(answer)
    a, b = _as_number(answer), _as_number(gold)
    if a is not None and b is not None:
        return float(a == b)
    return float(answer == gold and gold != "")


def format_reward(prompt: str, response: str, example: dict) -> float:
    """1.0 if a final answer can be extracted (as `exact_match` would look for it), else 0.0."""
    return float(_final_answer_for(response, str(example.get("answer", ""))) is not None)


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


def _math_check(response_text: str, gold_answer: str) -> float:
    """The unguarded check behind `math_equivalent`; run it only where it can be killed."""
    answer = extract_final_answer(response_text, "last_number")
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


def math_verify_reward(prompt: str, response: str, example: dict) -> float:
    """Reward kind "math_verify": `math_equivalent` of the response and ``example["answer"]``.

    It runs the check directly: the scorer isolates this kind in worker processes.
    """
    return _math_check(response, str(example["answer"]))


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


def reasoning_gym_reward(prompt: str, response: str, example: dict) -> float:
    """Reward kind "reasoning_gym": the task's own scorer on the extracted final answer.

    The answer passed is the last box; else, for a numeric gold answer, the last number; else
    the text after the last "answer:"/"####"/"=" marker; else the last non-empty line.
    """
    task, entry = _rg_meta(example)
    answer = _final_answer_for(response, str(entry.get("answer", "")))
    if answer is None:
        lines = [line.strip() for line in response[-10_000:].splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return _rg_scorer(task)(answer=answer, entry=entry)


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math_verify": math_verify_reward,
    "reasoning_gym": reasoning_gym_reward,
}
# Kinds cheap and safe enough to run in the trainer process under isolate="auto". Kinds not
# listed here (math_verify, new registrations, user functions) run in worker processes.
IN_PROCESS_KINDS = {"exact_match", "reasoning_gym"}
# Modules a worker imports at start-up so the slow import is not charged to a call's deadline.
_PRELOAD = {"math_verify": ["math_verify"]}


def load_user_reward(spec: str) -> RewardFn:
    """Import a user reward function named ``"module:function"`` (dots allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute "
                             f"{attr!r}") from None
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


# --------------------------------------------------------------------------- isolated pool

@dataclass(frozen=True)
class Outcome:
    """Result of one isolated call: `value`, or an `error` message (also set on timeout)."""

    value: Any = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


_STARTUP_LIMIT_S = 120.0  # generous: the machine may be busy training while workers start
_live_pools: "weakref.WeakSet[IsolatedPool]" = weakref.WeakSet()


class _Worker:
    """One worker process and our end of its socket."""

    def __init__(self, preload: list[str]):
        ours, theirs = multiprocessing.Pipe()
        # The worker must find `opo` before it receives our sys.path in the first message.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opo._reward_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = ours
        self.conn.send_bytes(json.dumps({"sys_path": [str(p) for p in sys.path],
                                         "preload": preload}).encode())
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index of the call it is running
        self.deadline = 0.0

    def receive(self) -> dict | None:
        try:
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            return None  # it died, or sent garbage: either way it is finished

    def kill(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


class IsolatedPool:
    """A few long-lived worker processes that run ``"module:function"`` calls with a hard deadline.

    A call that passes its deadline has its worker killed and replaced; a call that raises, or
    whose worker dies, gives an error outcome; the other calls are unaffected. Arguments and
    results travel as JSON, never pickle. `map` calls from several threads take turns.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, preload: list[str] | tuple = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.preload = list(preload)
        self._size = workers
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        _live_pools.add(self)

    def map(self, fn_ref: str, calls: list[tuple], timeout_s: float | None = None) -> list[Outcome]:
        """Run ``fn(*args)`` for each args tuple in `calls`, in parallel; outcomes in order."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        try:
            requests = [json.dumps({"fn": fn_ref, "args": list(args)}).encode() for args in calls]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"arguments for {fn_ref} must be JSON-serialisable: {exc}") from exc
        with self._lock:
            if self._closed:
                raise RuntimeError("IsolatedPool is closed")
            if not requests:
                return []
            outcomes: list[Outcome | None] = [None] * len(calls)
            try:
                self._run(requests, outcomes, timeout)
            finally:
                # Interrupted (Ctrl-C): busy workers hold stale calls, so they cannot be reused.
                for w in [w for w in self._workers if w.job is not None]:
                    self._replace(w)
            return outcomes  # type: ignore[return-value]

    def _run(self, requests: list[bytes], outcomes: list, timeout: float) -> None:
        pending = deque(range(len(requests)))
        while len(self._workers) < self._size:
            self._workers.append(_Worker(self.preload))
        while pending or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.job is None and pending:
                    job = pending.popleft()
                    try:
                        w.conn.send_bytes(requests[job])
                    except OSError:  # it died while idle: the call never ran, so requeue it
                        pending.appendleft(job)
                        self._replace(w)
                        continue
                    w.job, w.deadline = job, now + timeout
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            next_deadline = min(w.deadline if w.ready else w.started + _STARTUP_LIMIT_S
                                for w in waiting)
            ready_conns = wait([w.conn for w in waiting], max(0.0, next_deadline - now))
            for w in waiting:
                if w.conn in ready_conns:
                    self._on_message(w, w.receive(), outcomes)
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.deadline:
                    outcomes[w.job] = Outcome(error=f"timed out after {timeout:g} s",
                                              timed_out=True)
                    self._replace(w)
                elif not w.ready and now >= w.started + _STARTUP_LIMIT_S:
                    self._replace(w)
                    raise RuntimeError(f"reward worker did not start within {_STARTUP_LIMIT_S:g} s")

    def _on_message(self, w: _Worker, message: dict | None, outcomes: list) -> None:
        if not w.ready:
            if message is None or not message.get("ready"):
                self._replace(w)
                error = (message or {}).get("error", f"exit code {w.proc.returncode}")
                # A worker that cannot start is a setup problem (bad preload, broken install).
                raise RuntimeError(f"reward worker failed to start: {error}")
            w.ready = True
            return
        if message is None:
            self._replace(w)
            outcomes[w.job] = Outcome(error=f"worker died (exit code {w.proc.returncode})")
        else:
            outcomes[w.job] = (Outcome(value=message["value"]) if "error" not in message
                               else Outcome(error=str(message["error"])))
            w.job = None

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        if not self._closed:
            # Start the replacement now so its start-up overlaps the remaining calls.
            self._workers.append(_Worker(self.preload))

    def close(self) -> None:
        """Stop all workers (they exit when their socket closes; stragglers are killed)."""
        # At interpreter exit a daemon thread may still be inside map(); do not wait on it forever.
        locked = self._lock.acquire(timeout=5.0)
        try:
            self._closed = True
            for w in self._workers:
                w.conn.close()
            deadline = time.monotonic() + 1.0
            for w in self._workers:
                try:
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.kill()
            self._workers.clear()
        finally:
            if locked:
                self._lock.release()

    def __enter__(self) -> "IsolatedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_live_pools):
        pool.close()


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
    outcome = _get_shared_pool().map("opo.rewards:_math_check", [(response_text, gold_answer)],
                                     timeout_s=timeout_s)[0]
    return 1.0 if outcome.ok and outcome.value == 1.0 else 0.0


# --------------------------------------------------------------------------- batch scorer

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

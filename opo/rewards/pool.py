"""`IsolatedPool`: killable worker processes that run reward checks under a hard deadline.

Model output is hostile input: a response can make sympy compute ``9^{9^{9^9}}``. Checks
that can be slow run in a few long-lived worker processes (`opo.rewards.worker`) that are
killed when a call passes its deadline. Arguments and results travel as JSON, never pickle.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any


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
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opo.rewards.worker", str(theirs.fileno())],
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

    def map(self, fn_ref: str, calls: list[tuple], timeout_s: float | None = None,
            kwargs: list[dict] | None = None) -> list[Outcome]:
        """Run ``fn(*args, **kw)`` for each args tuple in `calls` (and, when given, the matching
        dict of `kwargs`), in parallel; outcomes in order."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if kwargs is not None and len(kwargs) != len(calls):
            raise ValueError(f"got {len(calls)} calls but {len(kwargs)} keyword dicts")
        try:
            requests = [json.dumps({"fn": fn_ref, "args": list(args),
                                    "kwargs": kwargs[i] if kwargs is not None else {}}).encode()
                        for i, args in enumerate(calls)]
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

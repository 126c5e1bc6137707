"""Worker process for `opo.rewards.IsolatedPool`; run as ``python -m opo.rewards.worker FD``.

It is started as a fresh interpreter (not through multiprocessing's spawn), so it never
re-imports the user's ``__main__`` script: no torch import per worker, and no
bootstrapping error when a training script lacks an ``if __name__ == "__main__"`` guard.

Protocol, one JSON document per message over the socket inherited as FD:
  parent -> worker  {"sys_path": [...], "preload": [...]}     once, at start
  worker -> parent  {"ready": true} | {"ready": false, "error": "..."}
  parent -> worker  {"fn": "module:function", "args": [...], "kwargs": {...}}   one per call
  worker -> parent  {"value": ...} | {"error": "..."}
The worker exits when the parent closes its end. This module, and the `opo.rewards`
package that Python imports before it, use only the standard library at import time, so
start-up stays cheap.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection


def _resolve(fn_ref: str):
    module_name, _, attr = fn_ref.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _exit_when_orphaned(parent_pid: int) -> None:
    # A call stuck in a long computation never reads the closed socket, so without
    # this a crashed trainer could leave workers burning CPU indefinitely.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _send(conn: Connection, message: dict) -> None:
    try:
        data = json.dumps(message)
    except (TypeError, ValueError) as exc:  # the value is not JSON (an object, a cycle, ...)
        data = json.dumps({"error": f"result is not JSON-serialisable: {exc}"[:300]})
    conn.send_bytes(data.encode())


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ["OPO_IN_REWARD_WORKER"] = "1"  # lets math_equivalent skip a nested pool
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)

    init = json.loads(conn.recv_bytes())
    sys.path[:] = init["sys_path"]  # so user reward modules import as in the parent
    try:
        for name in init["preload"]:
            importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        _send(conn, {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
        return
    _send(conn, {"ready": True})

    functions = {}
    while True:
        request = json.loads(conn.recv_bytes())  # EOFError when the parent closes the pool
        try:
            fn = functions.get(request["fn"])
            if fn is None:
                fn = functions[request["fn"]] = _resolve(request["fn"])
            reply = {"value": fn(*request["args"], **request.get("kwargs", {}))}
        except Exception as exc:  # noqa: BLE001 - any failure of the call is its outcome
            reply = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        _send(conn, reply)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]))
    except (EOFError, OSError):
        pass  # the parent went away (closed the pool, or exited) mid-conversation

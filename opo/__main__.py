"""`python -m opo ...`, and the entry point torchrun runs on every rank:

    torchrun --standalone --nproc_per_node N -m opo train [CONFIG] [key=value ...]
"""

import atexit
import os
import sys

from opo.cli import main


def _leave(code: int) -> None:
    """Exit a torchrun rank without the interpreter's final teardown.

    Once a run has finished (its process group destroyed, files written and closed), a rank
    of a CPU run under torchrun occasionally died of `terminate called without an active
    exception` (SIGABRT) while the interpreter tore down the C++ objects still alive, about
    one test run in ten, on the code before and after 2026-12-06's changes alike; torchrun
    then reported the whole job as failed. So a rank runs the exit handlers Python would
    run (the reward workers' shutdown among them), flushes its output and leaves at once.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main() or 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave(code)
    sys.exit(code)

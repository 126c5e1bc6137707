"""Reward functions for tests/test_rewards.py, imported by name inside worker processes."""

import math
import os
import time


def misbehaving(prompt, response, example):
    """Behaves as the response says; otherwise 1.0 when the response equals the answer."""
    if response == "raise":
        raise ValueError("boom")
    if response == "hang":
        time.sleep(60)
    if response == "nan":
        return math.nan
    if response == "inf":
        return math.inf
    if response == "string":
        return "1.0"
    if response == "none":
        return None
    if response == "true":
        return True
    if response == "die":
        os._exit(3)
    return float(response == example["answer"])


def add(a, b):
    return a + b


not_callable = 42


def always_raises(prompt, response, example):
    raise RuntimeError("this reward function is broken")


def even_length(prompt, response, example):
    """A reward with variance for a random model: 1.0 for responses of even length."""
    return float(len(response) % 2 == 0)


def sees_options(prompt, response, example, *, truncated=False, answer_format="auto"):
    """1.0 when the scorer said the response was truncated; checks the format arrived too."""
    assert answer_format in ("auto", "boxed", "last_number")
    return 1.0 if truncated else 0.0


def graded(prompt, response, example):
    """A user reward with partial scores: the response is the score."""
    return float(response)


def even_length_rank1_dies(prompt, response, example):
    """even_length; but on its first attempt, rank 1 of a torchrun job SIGKILLs itself as soon
    as the checkpoint folder named by OPO_TEST_DIE_AFTER exists (a rank lost mid-run)."""
    import signal
    from pathlib import Path

    marker = os.environ.get("OPO_TEST_DIE_AFTER")
    if (marker and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
            and Path(marker).exists()):
        os.kill(os.getpid(), signal.SIGKILL)
    return even_length(prompt, response, example)

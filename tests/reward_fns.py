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

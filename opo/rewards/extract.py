"""Answer extraction: the final answer a response commits to.

Everything here is pure string work on hostile input (a response can be a megabyte of
braces), so every pattern is linear: no nested quantifiers, and brace matching by
counting rather than by regular expression.
"""

from __future__ import annotations

import re
from fractions import Fraction

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


def normalise_answer(text: str) -> str:
    """An answer as compared and counted: no whitespace, no trailing ".", no thousands commas."""
    text = "".join(text.split()).rstrip(".")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def fallback_for(gold: str) -> str:
    """How to find an unboxed answer to compare with `gold`.

    A numeric gold answer is best found as the last number; any other answer as the text
    after an "Answer:" marker (a last number would never match "yes" or "(1, 2)").
    """
    return "last_number" if _as_number(normalise_answer(gold)) is not None else "after_marker"


# --------------------------------------------------------------------------- answer formats

ANSWER_FORMATS = ("auto", "boxed", "last_number")
# Under answer_format="auto", an unboxed answer counts only in a response of at most this many
# characters (surrounding whitespace aside). A short reply such as "The sum is 12." states its
# answer; in a long one the last number is as likely an intermediate step of the reasoning.
AUTO_BARE_MAX_CHARS = 200


def bare_answer_allowed(response: str, answer_format: str = "auto", truncated: bool = False) -> bool:
    """Whether an answer without a box may be read from `response` under `answer_format`.

    ``"last_number"``: always (the box-less fallback of `extract_final_answer`).
    ``"boxed"``: never. ``"auto"``: only when the response was not cut off at the token limit
    and is at most `AUTO_BARE_MAX_CHARS` characters long.
    """
    if answer_format == "last_number":
        return True
    if answer_format == "boxed":
        return False
    if answer_format == "auto":
        return not truncated and len(response.strip()) <= AUTO_BARE_MAX_CHARS
    raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, not {answer_format!r}")


def committed_answer(response: str, fallback: str, answer_format: str = "auto",
                     truncated: bool = False) -> str | None:
    """The answer `response` commits to: its last non-empty box, else (where
    `bare_answer_allowed`) what `fallback` finds (see `extract_final_answer`), else None.

    A box counts even in a truncated response; ``reward.truncated=zero`` is the way to give
    truncated responses nothing.
    """
    if not bare_answer_allowed(response, answer_format, truncated):
        fallback = "none"
    return extract_final_answer(response, fallback)

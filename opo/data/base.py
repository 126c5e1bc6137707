"""What every data module shares: the example type, `DataError`, seeds and the split.

An *example* is a plain dict ``{"question": str, "answer": str, "meta": dict}``.
``meta`` carries whatever a reward needs besides the gold answer (for example the
reasoning-gym entry its scorer reads) and is always JSON-serialisable, so examples
can be written to logs and checkpoints as they are.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from opo.schema import DataConfig


class DataError(ValueError):
    """The data source is missing, malformed, or too small for the requested split."""


Example = dict  # {"question": str, "answer": str, "meta": dict}


@dataclass
class Split:
    """Training and held-out examples, and a note when the held-out size was chosen for you."""

    train: list[Example]
    held_out: list[Example]
    note: str = ""  # e.g. why a small file's held-out split is smaller than 200

    def summary(self) -> str:
        """One line for the log: the two sizes, and the note if any."""
        line = f"data: {len(self.train)} training and {len(self.held_out)} held-out problems"
        return f"{line} ({self.note})" if self.note else line


# data.eval_size=0 ("auto"): generated sources hold out DEFAULT_EVAL_SIZE problems; a fixed
# set of rows (a file, CHAMP) at most AUTO_EVAL_FRACTION of them, so a small file is not
# swallowed by its held-out split (300 rows would otherwise leave 100 for training).
DEFAULT_EVAL_SIZE = 200
AUTO_EVAL_FRACTION = 0.1


def held_out_size(cfg: DataConfig, n_rows: int | None = None) -> tuple[int, str]:
    """(held-out size, note) for a source of `n_rows` rows (None: generated on demand).

    A positive data.eval_size is used as given. 0 means auto: DEFAULT_EVAL_SIZE, but for a
    fixed set of rows at most AUTO_EVAL_FRACTION of them (and at least 1); the note then
    says so.
    """
    if cfg.eval_size > 0:
        return cfg.eval_size, ""
    if n_rows is None:
        return DEFAULT_EVAL_SIZE, ""
    size = max(1, min(DEFAULT_EVAL_SIZE, int(n_rows * AUTO_EVAL_FRACTION)))
    if size == DEFAULT_EVAL_SIZE:
        return size, ""
    return size, (f"data.eval_size=0 (auto) held out {AUTO_EVAL_FRACTION:.0%} of the {n_rows} rows, "
                  f"not {DEFAULT_EVAL_SIZE}; set data.eval_size to choose")

# --------------------------------------------------------------------------- helpers


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for `purpose` that is unrelated to `seed` itself.

    Procedural generators such as reasoning-gym seed item i with `seed + i`, so a
    held-out seed of `seed + 1` would regenerate the training items shifted by one.
    Hashing puts the derived seed far away from the training range.
    """
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _permutation(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed % 2**64).permutation(n).tolist()


def _drop_overlap(train: list[Example], held_out: list[Example]) -> list[Example]:
    """Remove training examples whose question also appears in the held-out set."""
    held_questions = {ex["question"] for ex in held_out}
    return [ex for ex in train if ex["question"] not in held_questions]


def _to_jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of `value` (tuples become lists, sets sorted lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # NaN and inf are not valid JSON; keep them readable instead.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_to_jsonable(v) for v in value), key=repr)
    if isinstance(value, np.generic):
        return _to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    return str(value)


def _split(examples: list[Example], cfg: DataConfig, what: str) -> Split:
    """Shuffle deterministically, split off the held-out set, cap train at train_size."""
    if not examples:
        raise DataError(f"{what} has no rows")
    size, note = held_out_size(cfg, len(examples))
    if len(examples) <= size:
        raise DataError(f"{what} has {len(examples)} examples, but data.eval_size={size} "
                        f"held-out ones plus at least one for training are needed; "
                        f"lower data.eval_size")
    order = _permutation(len(examples), cfg.seed)
    shuffled = [examples[i] for i in order]
    held_out = shuffled[:size]
    train = _drop_overlap(shuffled[size:], held_out)
    return Split(_cap(train, cfg.train_size), held_out, note)


def _cap(train: list[Example], train_size: int) -> list[Example]:
    return train[:train_size] if train_size > 0 else train


def _need_procedural_sizes(cfg: DataConfig) -> None:
    # Generated sources have no "all"; zero would silently give an empty training set.
    if cfg.train_size < 1:
        raise DataError(f"data.train_size must be >= 1 for source={cfg.source!r} "
                        f"(it is the number of problems generated), got {cfg.train_size}")


def _unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"unknown {kind} {name!r}; {hint}{len(valid)} are available, e.g. "
            + ", ".join(valid[:8]))

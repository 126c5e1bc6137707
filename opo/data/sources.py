"""The source registry, the built-in sources, and `load_examples`, the entry point.

Sources are registered in ``SOURCES`` by name; anything else is treated as a path to
a file or a saved `datasets` folder (see `opo.data.files`). Adding a source is one
function ``f(cfg) -> (train, held_out)`` plus ``@source("name")``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from opo.config import DataConfig
from opo.data.base import (DataError, Example, _drop_overlap, _need_procedural_sizes, _split,
                           _to_jsonable, _unknown_name_message, derive_seed)
from opo.data.files import FILE_FORMATS, load_path

SOURCES: dict[str, Callable[[DataConfig], tuple[list[Example], list[Example]]]] = {}


def source(name: str):
    """Register a built-in data source under `name`."""
    def register(fn):
        SOURCES[name] = fn
        return fn
    return register


# --------------------------------------------------------------------------- entry point

def load_examples(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """Return (train, held_out) for `cfg`; the same cfg always gives the same lists."""
    if cfg.eval_size < 0:
        raise DataError(f"data.eval_size must be >= 0, got {cfg.eval_size}")
    if cfg.train_size < 0:
        raise DataError(f"data.train_size must be >= 0, got {cfg.train_size}")
    loader = SOURCES.get(cfg.source)
    if loader is not None:
        train, held_out = loader(cfg)
    elif Path(cfg.source).expanduser().exists():
        train, held_out = load_path(cfg)
    else:
        raise DataError(f"data.source {cfg.source!r} is neither a built-in source ("
                        + ", ".join(sorted(SOURCES)) + ") nor an existing path; files may be "
                        + ", ".join(FILE_FORMATS))
    if not train:
        raise DataError(f"data.source={cfg.source!r} left no training examples "
                        f"after splitting off {len(held_out)} held-out ones")
    return train, held_out


# --------------------------------------------------------------------------- built-in sources

@source("toy_addition")
def _load_toy_addition(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    from opo.toy import make_addition_examples

    _need_procedural_sizes(cfg)
    try:
        held_out = make_addition_examples(cfg.eval_size, derive_seed(cfg.seed, "held_out"),
                                          **cfg.task_config)
        train = make_addition_examples(cfg.train_size, cfg.seed, **cfg.task_config)
    except (TypeError, ValueError) as exc:
        # Unknown or out-of-range task_config keys surface here.
        raise DataError(f"data.task_config {cfg.task_config!r} is not valid for toy_addition: "
                        f"{exc}") from None
    return _drop_overlap(train, held_out), held_out


def _import_reasoning_gym():
    """The reasoning_gym module and its task registry (name -> (dataset, config) classes)."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError("data.source=reasoning_gym needs the reasoning-gym package: "
                        "pip install reasoning-gym") from None
    return reasoning_gym, DATASETS


def _make_gym_dataset(cfg: DataConfig, size: int, seed: int):
    reasoning_gym, registry = _import_reasoning_gym()
    if not cfg.task:
        raise DataError("data.source=reasoning_gym needs data.task, e.g. "
                        + ", ".join(sorted(registry)[:8]))
    if cfg.task not in registry:
        raise DataError("data.task: " + _unknown_name_message("reasoning-gym task", cfg.task,
                                                              registry))
    for reserved in ("size", "seed"):
        if reserved in cfg.task_config:
            raise DataError(f"data.task_config must not set {reserved!r}; use data.train_size, "
                            f"data.eval_size and data.seed")
    try:
        return reasoning_gym.create_dataset(cfg.task, size=size, seed=seed, **cfg.task_config)
    except (TypeError, ValueError, AssertionError) as exc:
        # Bad task_config keys or values: show which keys the task's config accepts.
        config_cls = registry[cfg.task][1]
        fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("size", "seed")]
        raise DataError(f"data.task_config {cfg.task_config!r} is not valid for reasoning-gym "
                        f"task {cfg.task!r}: {exc}; its config fields are: "
                        + ", ".join(fields)) from None


def _gym_examples(cfg: DataConfig, size: int, seed: int) -> list[Example]:
    dataset = _make_gym_dataset(cfg, size, seed)
    examples = []
    for i in range(len(dataset)):
        entry = dataset[i]
        answer = entry.get("answer")
        examples.append({
            "question": str(entry["question"]),
            "answer": "" if answer is None else str(answer),
            # The task's own scorer needs the whole entry (metadata included).
            "meta": {"rg_task": cfg.task, "rg_entry": _to_jsonable(entry)},
        })
    return examples


@source("reasoning_gym")
def _load_reasoning_gym(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    _need_procedural_sizes(cfg)
    held_out = _gym_examples(cfg, cfg.eval_size, derive_seed(cfg.seed, "held_out"))
    train = _gym_examples(cfg, cfg.train_size, cfg.seed)
    return _drop_overlap(train, held_out), held_out


@source("champ")
def _load_champ(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    try:
        import champ_dataset
    except ImportError:
        raise DataError("data.source=champ needs the champ-dataset package: "
                        "pip install champ-dataset") from None
    problems = champ_dataset.load("v0").problems
    # `problems` maps identifier -> Problem; sort so the order never depends on the file.
    items = sorted(problems.items()) if isinstance(problems, dict) else list(enumerate(problems))
    examples = [{"question": p.text, "answer": str(p.answer),
                 "meta": {"champ_id": str(key), "category": _to_jsonable(getattr(p, "category", None))}}
                for key, p in items]
    return _split(examples, cfg, "the CHAMP dataset")

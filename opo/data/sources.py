"""The source registry, the built-in sources, and `load_examples`, the entry point.

Sources are registered in ``SOURCES`` by name; anything else is treated as a path to
a file or a saved `datasets` folder (see `opo.data.files`). Adding a source is one
function ``f(cfg) -> (train, held_out)`` (or a `Split`) plus ``@source("name", defaults)``,
where `SourceDefaults` names the reward, instruction and evaluation length that suit it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opo.schema import Config, ConfigError, DataConfig
from opo.data.base import (DataError, Example, Split, _drop_overlap, _need_procedural_sizes, _split,
                           _to_jsonable, _unknown_name_message, derive_seed, held_out_size)
from opo.data.files import FILE_FORMATS, load_path
from opo.tasks import addition, scratchpad

Loader = Callable[[DataConfig], "Split | tuple[list[Example], list[Example]]"]
SOURCES: dict[str, Loader] = {}

BOX_INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class SourceDefaults:
    """What suits a source's problems when the user has not said otherwise.

    `opo eval` uses these unless a preset made for the same task, a flag or ``--set``
    says otherwise, so every source is judged by its natural reward out of the box.
    """

    reward: str                     # the reward kind that judges this source's answers
    instruction: str = ""           # appended to each question (prompt.instruction)
    max_new_tokens: int = 256       # evaluation token limit for chat (instruct) models
    plain_max_new_tokens: int = 256  # ... and for plain prompts (base models)


SOURCE_DEFAULTS: dict[str, SourceDefaults] = {}
# Files and datasets folders: most bring maths problems with a gold answer.
FILE_DEFAULTS = SourceDefaults(reward="math_verify", instruction=BOX_INSTRUCTION, max_new_tokens=512,
                               plain_max_new_tokens=512)


def source(name: str, defaults: SourceDefaults | None = None):
    """Register a built-in data source under `name`, with the defaults that suit it."""
    def register(fn):
        SOURCES[name] = fn
        SOURCE_DEFAULTS[name] = defaults or FILE_DEFAULTS
        return fn
    return register


def source_defaults(source_name: str) -> SourceDefaults:
    """The `SourceDefaults` of a built-in source, or of files for any other source."""
    return SOURCE_DEFAULTS.get(source_name, FILE_DEFAULTS)


def unknown_source_message(name: str) -> str:
    """Why `name` is no data source, with a close built-in name when there is one."""
    close = difflib.get_close_matches(name, sorted(SOURCES), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"data.source {name!r} is neither a built-in source (" + ", ".join(sorted(SOURCES))
            + f") nor an existing path; {hint}files may be " + ", ".join(FILE_FORMATS))


# --------------------------------------------------------------------------- entry point

def load_split(cfg: DataConfig) -> Split:
    """The training and held-out examples for `cfg`; the same cfg always gives the same lists.

    ``split.summary()`` is a line for the log with both sizes, and says when data.eval_size=0
    (auto) held out fewer than 200 problems of a small file.
    """
    if cfg.eval_size < 0:
        raise DataError(f"data.eval_size must be >= 0, got {cfg.eval_size}")
    if cfg.train_size < 0:
        raise DataError(f"data.train_size must be >= 0, got {cfg.train_size}")
    loader = SOURCES.get(cfg.source)
    if loader is not None:
        split = loader(cfg)
    elif Path(cfg.source).expanduser().exists():
        split = load_path(cfg)
    else:
        raise DataError(unknown_source_message(cfg.source))
    if not isinstance(split, Split):  # a registered loader may return (train, held_out)
        split = Split(*split)
    if not split.train:
        raise DataError(f"data.source={cfg.source!r} left no training examples "
                        f"after splitting off {len(split.held_out)} held-out ones")
    return split


def load_examples(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """(train, held_out) for `cfg`: `load_split` without the note."""
    split = load_split(cfg)
    return split.train, split.held_out


# --------------------------------------------------------------------------- built-in sources

def _procedural_split(cfg: DataConfig, make: Callable, name: str) -> tuple[list[Example], list[Example]]:
    """Held-out and training problems from a generator make(n, seed, **task_config)."""
    _need_procedural_sizes(cfg)
    try:
        held_out = make(held_out_size(cfg)[0], derive_seed(cfg.seed, "held_out"), **cfg.task_config)
        train = make(cfg.train_size, cfg.seed, **cfg.task_config)
    except (TypeError, ValueError) as exc:
        # Unknown or out-of-range task_config keys surface here.
        raise DataError(f"data.task_config {cfg.task_config!r} is not valid for {name}: {exc}") from None
    return _drop_overlap(train, held_out), held_out


@source("toy_addition", SourceDefaults(reward=addition.REWARD, plain_max_new_tokens=addition.PLAIN_MAX_NEW_TOKENS))
def _load_toy_addition(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    # Looked up at call time, so a test can stand a generator in for the module's.
    return _procedural_split(cfg, addition.make_addition_examples, "toy_addition")


@source("toy_scratchpad", SourceDefaults(reward=scratchpad.REWARD,
                                         plain_max_new_tokens=scratchpad.PLAIN_MAX_NEW_TOKENS))
def _load_toy_scratchpad(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """Toy addition where working is optional (opo.tasks.scratchpad): the same problems and
    split as toy_addition for the same settings."""
    return _procedural_split(cfg, scratchpad.make_scratchpad_examples, "toy_scratchpad")


def _import_reasoning_gym():
    """The reasoning_gym module and its task registry (name -> (dataset, config) classes)."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError("data.source=reasoning_gym needs the reasoning-gym package: "
                        "pip install reasoning-gym") from None
    return reasoning_gym, DATASETS


def check_config(cfg: Config) -> None:
    """data.source is a built-in source or an existing path, and data.task a valid task
    (opo.config runs this when a config is built, before any model loads)."""
    data = cfg.data
    if data.source not in SOURCES and not Path(data.source).expanduser().exists():
        raise ConfigError(unknown_source_message(data.source))
    try:
        check_task(data)  # a reasoning-gym task name (imports reasoning_gym, a few seconds)
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def check_task(cfg: DataConfig) -> None:
    """Raise `DataError` now, before any model loads, if ``cfg`` names no valid task."""
    if cfg.source == "reasoning_gym":
        _check_gym_task(cfg)


def _check_gym_task(cfg: DataConfig):
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
    return reasoning_gym, registry


def _make_gym_dataset(cfg: DataConfig, size: int, seed: int):
    reasoning_gym, registry = _check_gym_task(cfg)
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


@source("reasoning_gym", SourceDefaults(reward="reasoning_gym",
                                        instruction="Answer with just the final answer."))
def _load_reasoning_gym(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    _need_procedural_sizes(cfg)
    held_out = _gym_examples(cfg, held_out_size(cfg)[0], derive_seed(cfg.seed, "held_out"))
    train = _gym_examples(cfg, cfg.train_size, cfg.seed)
    return _drop_overlap(train, held_out), held_out


@source("champ", SourceDefaults(reward="math_verify", instruction=BOX_INSTRUCTION, max_new_tokens=512,
                                plain_max_new_tokens=512))
def _load_champ(cfg: DataConfig) -> Split:
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

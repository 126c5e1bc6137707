"""Training and held-out problems, prompt formatting, and the prompt sampler.

An *example* is a plain dict ``{"question": str, "answer": str, "meta": dict}``.
``meta`` carries whatever a reward needs besides the gold answer (for example the
reasoning-gym entry its scorer reads) and is always JSON-serialisable, so examples
can be written to logs and checkpoints as they are.

Sources are registered in ``SOURCES`` by name; anything else is treated as a path to
a .jsonl / .json / .parquet file or a folder written by ``datasets.save_to_disk``.
Adding a source is one function ``f(cfg) -> (train, held_out)`` plus ``@source("name")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from opo.config import DataConfig, PromptConfig


class DataError(ValueError):
    """The data source is missing, malformed, or too small for the requested split."""


Example = dict  # {"question": str, "answer": str, "meta": dict}

SOURCES: dict[str, Callable[[DataConfig], tuple[list[Example], list[Example]]]] = {}

FILE_FORMATS = (".jsonl", ".json", ".parquet", "a folder saved by datasets.save_to_disk")


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
    else:
        train, held_out = _load_path(cfg)
    if not train:
        raise DataError(f"data.source={cfg.source!r} left no training examples "
                        f"after splitting off {len(held_out)} held-out ones")
    return train, held_out


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


def _split(examples: list[Example], cfg: DataConfig, what: str) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically, split off eval_size held-out, cap train at train_size."""
    if not examples:
        raise DataError(f"{what} has no rows")
    if len(examples) <= cfg.eval_size:
        raise DataError(f"{what} has {len(examples)} examples, but data.eval_size={cfg.eval_size} "
                        f"held-out ones plus at least one for training are needed; "
                        f"lower data.eval_size")
    order = _permutation(len(examples), cfg.seed)
    shuffled = [examples[i] for i in order]
    held_out = shuffled[:cfg.eval_size]
    train = _drop_overlap(shuffled[cfg.eval_size:], held_out)
    return _cap(train, cfg.train_size), held_out


def _cap(train: list[Example], train_size: int) -> list[Example]:
    return train[:train_size] if train_size > 0 else train


def _need_procedural_sizes(cfg: DataConfig) -> None:
    # Generated sources have no "all"; zero would silently give an empty training set.
    if cfg.train_size < 1:
        raise DataError(f"data.train_size must be >= 1 for source={cfg.source!r} "
                        f"(it is the number of problems generated), got {cfg.train_size}")


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


def _unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"unknown {kind} {name!r}; {hint}{len(valid)} are available, e.g. "
            + ", ".join(valid[:8]))


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


# --------------------------------------------------------------------------- files

def _load_path(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {cfg.source!r} is neither a built-in source ("
                        + ", ".join(sorted(SOURCES)) + ") nor an existing path; files may be "
                        + ", ".join(FILE_FORMATS))
    if path.is_dir():
        return _load_saved_dataset(path, cfg)
    rows = _read_rows(path)
    return _split(_rows_to_examples(rows, path, cfg), cfg, f"{path}")


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs; the location names the line or row for error messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        table = _pyarrow_parquet(path).read_table(path)
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use "
                    + ", ".join(FILE_FORMATS))


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    # utf-8-sig tolerates the byte-order mark some editors write.
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} "
                                f"at column {exc.colno})") from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                        f"column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, "
                        f"got {type(data).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(data)]


def _text_field(row: dict, field: str, where: str) -> str:
    """The field's value as text; numbers (common for answers) are converted."""
    if field not in row:
        have = ", ".join(repr(k) for k in row) or "none"
        raise DataError(f"{where}: missing field {field!r} (the row has fields: {have}); "
                        f"set data.question_field / data.answer_field")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {field!r} must be a string or number, "
                        f"got {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and value.is_integer():
        # Integer columns with gaps come back as floats (3.0); the gold answer is "3".
        value = int(value)
    text = str(value)
    if not text.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rows_to_examples(rows: list[tuple[str, Any]], path: Path, cfg: DataConfig) -> list[Example]:
    examples = []
    for location, row in rows:
        where = f"{path}: {location}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__} "
                            f"{_short(row)}")
        question = _text_field(row, cfg.question_field, where)
        answer = _text_field(row, cfg.answer_field, where)
        extra = {k: v for k, v in row.items() if k not in (cfg.question_field, cfg.answer_field)}
        # The other fields travel along for user reward functions.
        examples.append({"question": question, "answer": answer,
                         "meta": {"file": str(path), "row": location,
                                  "fields": _to_jsonable(extra)}})
    return examples


# --------------------------------------------------------------------------- datasets folders

def _pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _pyarrow_ipc(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs pyarrow: "
                        f"pip install pyarrow") from None
    return pa, ipc


def _read_arrow_file(file: Path):
    """save_to_disk writes Arrow IPC *stream* files; accept the random-access format too."""
    pa, ipc = _pyarrow_ipc(file)
    try:
        with pa.memory_map(str(file), "r") as source:
            return ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(file), "r") as source:
            return ipc.open_file(source).read_all()


def _read_saved_split(folder: Path) -> list[tuple[str, Any]]:
    """Rows of one Dataset folder: state.json lists its arrow shards in order."""
    pa, _ = _pyarrow_ipc(folder)
    state_file = folder / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        files = [folder / f["filename"] for f in state.get("_data_files", [])]
        indices = [folder / f["filename"] for f in (state.get("_indices_data_files") or [])]
    else:
        files, indices = sorted(folder.glob("*.arrow")), []
    if not files:
        raise DataError(f"{folder}: no .arrow data files found; expected a folder written by "
                        f"datasets' save_to_disk")
    for file in files + indices:
        if not file.exists():
            raise DataError(f"{folder}: state.json lists {file.name}, which does not exist")
    table = pa.concat_tables([_read_arrow_file(f) for f in files])
    if indices:
        # Old datasets versions saved a selection as an indices mapping instead of copying rows.
        mapping = pa.concat_tables([_read_arrow_file(f) for f in indices]).column(0)
        table = table.take(mapping)
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _load_saved_dataset(folder: Path, cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    dict_file = folder / "dataset_dict.json"
    if not dict_file.exists():
        if not (folder / "state.json").exists() and not any(folder.glob("*.arrow")):
            raise DataError(f"{folder}: a folder source must be written by datasets' "
                            f"save_to_disk (state.json and .arrow files, or dataset_dict.json)")
        rows = _read_saved_split(folder)
        return _split(_rows_to_examples(rows, folder, cfg), cfg, f"{folder}")

    splits = json.loads(dict_file.read_text()).get("splits", [])
    if "train" not in splits:
        raise DataError(f"{folder}: this DatasetDict has no 'train' split (it has: "
                        + ", ".join(splits) + ")")
    train_dir = folder / "train"
    train_all = _rows_to_examples(_read_saved_split(train_dir), train_dir, cfg)
    if "test" not in splits:
        return _split(train_all, cfg, f"{train_dir}")
    test_dir = folder / "test"
    test_all = _rows_to_examples(_read_saved_split(test_dir), test_dir, cfg)
    return _split_with_test(train_all, test_all, cfg, test_dir)


def _split_with_test(train_all: list[Example], test_all: list[Example], cfg: DataConfig,
                     test_dir: Path) -> tuple[list[Example], list[Example]]:
    """Held-out comes from the test split; train is the whole train split, shuffled."""
    if len(test_all) < cfg.eval_size:
        raise DataError(f"{test_dir}: the test split has {len(test_all)} examples, fewer than "
                        f"data.eval_size={cfg.eval_size}; lower data.eval_size")
    held_order = _permutation(len(test_all), derive_seed(cfg.seed, "held_out"))
    held_out = [test_all[i] for i in held_order[:cfg.eval_size]]
    train = [train_all[i] for i in _permutation(len(train_all), cfg.seed)]
    return _cap(_drop_overlap(train, held_out), cfg.train_size), held_out


# --------------------------------------------------------------------------- prompts

def format_prompt(tokenizer: Any, question: str, cfg: PromptConfig) -> str:
    """The text the policy sees for `question`, ending where the response starts."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = cfg.template
    if template == "auto":
        template = "chat" if has_template else "plain"
    if template == "chat":
        if not has_template:
            raise DataError("prompt.template=chat, but this tokenizer has no chat template; "
                            "use prompt.template=plain (or auto)")
        return _chat_prompt(tokenizer, question, cfg)
    if template == "plain":
        return _plain_prompt(question, cfg)
    raise DataError(f"prompt.template: {template!r} is not allowed; use auto, chat or plain")


def encode_prompts(tokenizer: Any, questions: list[str], cfg: PromptConfig) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids. Chat templates already carry their own special
    tokens; plain prompts get the tokenizer's usual ones (a base model's BOS, say)."""
    texts = [format_prompt(tokenizer, q, cfg) for q in questions]
    chat = cfg.template == "chat" or (cfg.template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    return texts, [list(row) for row in ids]


def _chat_prompt(tokenizer: Any, question: str, cfg: PromptConfig) -> str:
    user = question + ("\n\n" + cfg.instruction if cfg.instruction else "")
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _plain_prompt(question: str, cfg: PromptConfig) -> str:
    instruction = "\n" + cfg.instruction if cfg.instruction else ""
    try:
        return cfg.plain_format.format(question=question, instruction=instruction)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"prompt.plain_format {cfg.plain_format!r} is not a valid format: "
                        f"only {{question}} and {{instruction}} may appear ({exc!r}); "
                        f"write literal braces as {{{{ and }}}}") from None


# --------------------------------------------------------------------------- sampling

class PromptSampler:
    """Endless, deterministic stream of example indices.

    Epoch e visits every index once, in a permutation drawn from a generator seeded
    by (seed, e), so the order depends on nothing but these two numbers: not on the
    global RNG, and not on how the stream was cut into batches. That is what lets a
    resumed run draw exactly the indices an uninterrupted run would have drawn.
    """

    def __init__(self, n_examples: int, seed: int):
        if n_examples < 1:
            raise ValueError(f"PromptSampler needs at least one example, got {n_examples}")
        self.n_examples = n_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None  # the current epoch's permutation, cached

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            # A seed sequence of (seed, epoch) keeps epochs of nearby seeds unrelated,
            # unlike seed + epoch, where seed 0's epoch 1 would be seed 1's epoch 0.
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])
            self._order = rng.permutation(self.n_examples).tolist()
        return self._order

    def next_batch(self, batch_size: int) -> list[int]:
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        batch: list[int] = []
        while len(batch) < batch_size:
            order = self._epoch_order()
            take = min(batch_size - len(batch), self.n_examples - self.position)
            batch.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == self.n_examples:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_examples:
            raise ValueError(f"sampler state {state!r} does not fit {self.n_examples} examples")
        self.epoch, self.position, self._order = epoch, position, None
        if position == self.n_examples:  # normalise a state saved exactly at an epoch's end
            self.epoch, self.position = epoch + 1, 0


__all__ = ["DataError", "Example", "SOURCES", "source", "load_examples", "derive_seed",
           "format_prompt", "PromptSampler"]


@source("toy_scratchpad")
def _load_toy_scratchpad(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """Toy addition where working is optional (opo.scratchpad): same problems and split
    as toy_addition for the same settings."""
    from opo.scratchpad import make_scratchpad_examples

    _need_procedural_sizes(cfg)
    try:
        held_out = make_scratchpad_examples(cfg.eval_size, derive_seed(cfg.seed, "held_out"),
                                            **cfg.task_config)
        train = make_scratchpad_examples(cfg.train_size, cfg.seed, **cfg.task_config)
    except (TypeError, ValueError) as exc:
        raise DataError(f"data.task_config {cfg.task_config!r} is not valid for toy_scratchpad: "
                        f"{exc}") from None
    return _drop_overlap(train, held_out), held_out

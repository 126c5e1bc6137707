"""File sources: .jsonl, .json, .parquet, and folders written by `datasets.save_to_disk`.

A malformed row is a `DataError` that names the file, the line (or row) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opo.schema import DataConfig
from opo.data.base import (DEFAULT_EVAL_SIZE, DataError, Example, Split, _cap, _drop_overlap, _permutation,
                           _split, _to_jsonable, derive_seed)

FILE_FORMATS = (".jsonl", ".json", ".parquet", "a folder saved by datasets.save_to_disk")

# --------------------------------------------------------------------------- files


def load_path(cfg: DataConfig) -> Split:
    """(train, held_out) from the file or folder at ``cfg.source``, which must exist."""
    path = Path(cfg.source).expanduser()
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
        pq = _pyarrow_parquet(path)
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError...: a file it cannot read
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use "
                    + ", ".join(FILE_FORMATS))


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, f"line {number}", bom=number == 1)
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} "
                                f"at column {exc.colno})") from None
    return rows


def _decode(raw: bytes, path: Path, where: str, bom: bool = True) -> str:
    """UTF-8 text (utf-8-sig tolerates the byte-order mark some editors write), or a DataError
    naming the place: a binary file or another encoding gets a message, not a traceback."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start}); "
                        f"is it a binary file, or in another encoding?") from None


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(_decode(path.read_bytes(), path, "the file"))
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
        try:
            with pa.memory_map(str(file), "r") as source:
                return ipc.open_file(source).read_all()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{file}: not a readable Arrow file ({exc})") from None


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


def _load_saved_dataset(folder: Path, cfg: DataConfig) -> Split:
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
                     test_dir: Path) -> Split:
    """Held-out comes from the test split; train is the whole train split, shuffled."""
    size, note = cfg.eval_size, ""
    if size == 0:  # auto: the whole test split, up to the usual size
        size = min(DEFAULT_EVAL_SIZE, len(test_all))
        if size < DEFAULT_EVAL_SIZE:
            note = f"data.eval_size=0 (auto) took the whole test split of {size} rows"
    if not test_all or len(test_all) < size:
        raise DataError(f"{test_dir}: the test split has {len(test_all)} examples, fewer than "
                        f"data.eval_size={size}; lower data.eval_size")
    held_order = _permutation(len(test_all), derive_seed(cfg.seed, "held_out"))
    held_out = [test_all[i] for i in held_order[:size]]
    train = [train_all[i] for i in _permutation(len(train_all), cfg.seed)]
    return Split(_cap(_drop_overlap(train, held_out), cfg.train_size), held_out, note)

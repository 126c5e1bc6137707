"""Tests for opo.data: file and built-in sources, error messages, prompts, the sampler."""

from __future__ import annotations

import json
import sys

import pytest

from opo.config import DataConfig, PromptConfig
from opo.data import DataError, PromptSampler, derive_seed, format_prompt, load_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n, start=0):
    return [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]


def cfg_for(path, **kw):
    return DataConfig(source=str(path), eval_size=kw.pop("eval_size", 3), seed=kw.pop("seed", 7),
                      train_size=kw.pop("train_size", 0), **kw)


# --------------------------------------------------------------------------- jsonl

def test_jsonl_loads_and_splits(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    train, held = load_examples(cfg_for(path))
    assert len(held) == 3 and len(train) == 7
    all_q = {ex["question"] for ex in train + held}
    assert all_q == {r["question"] for r in rows(10)}
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in held}
    for ex in train + held:
        assert set(ex) == {"question", "answer", "meta"}
        assert isinstance(ex["answer"], str)
        json.dumps(ex)  # examples go into logs and checkpoints as they are
    assert load_examples(cfg_for(path)) == (train, held)  # deterministic
    assert load_examples(cfg_for(path, seed=8)) != (train, held)


def test_jsonl_train_size_caps_training_set(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    train, held = load_examples(cfg_for(path, train_size=4))
    assert len(train) == 4 and len(held) == 3


def test_custom_fields_and_numeric_answers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}", "solution": i, "extra": [i]}
                                             for i in range(5)] + [{"problem": "f", "solution": 2.5},
                                                                   {"problem": "g", "solution": 4.0}])
    train, held = load_examples(cfg_for(path, eval_size=2, question_field="problem",
                                        answer_field="solution"))
    by_q = {ex["question"]: ex for ex in train + held}
    assert by_q["p3"]["answer"] == "3"
    assert by_q["f"]["answer"] == "2.5"
    assert by_q["g"]["answer"] == "4"  # integral floats (e.g. upcast int columns) stay integers
    assert by_q["p3"]["meta"]["fields"] == {"extra": [3]}


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n\n" + "\n".join(json.dumps(r) for r in rows(4, 1))
                    + "\n\n")
    train, held = load_examples(cfg_for(path, eval_size=1))
    assert len(train) + len(held) == 5


# --------------------------------------------------------------------------- bad files

def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n" + json.dumps(rows(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl.*line 3"):
        load_examples(cfg_for(path))


def test_missing_field_names_field_line_and_present_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(1) + [{"question": "q", "label": "1"}])
    with pytest.raises(DataError) as err:
        load_examples(cfg_for(path))
    msg = str(err.value)
    assert "d.jsonl" in msg and "line 2" in msg and "'answer'" in msg and "'label'" in msg


def test_non_object_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(1) + [[1, 2]])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2.*object"):
        load_examples(cfg_for(path))


def test_non_string_question_names_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(2) + [{"question": ["x"], "answer": "1"}])
    with pytest.raises(DataError, match=r"line 3.*'question'.*string or number"):
        load_examples(cfg_for(path))


@pytest.mark.parametrize("value", [None, True, {"a": 1}])
def test_other_bad_answer_types(tmp_path, value):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": value}])
    with pytest.raises(DataError, match=r"line 1.*'answer'"):
        load_examples(cfg_for(path))


def test_empty_question(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(2) + [{"question": "  ", "answer": "1"}])
    with pytest.raises(DataError, match=r"line 3.*'question'.*empty"):
        load_examples(cfg_for(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl.*no rows"):
        load_examples(cfg_for(path))


def test_too_few_rows_for_eval_size_says_how_many(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(DataError, match=r"has 3 examples.*eval_size=3"):
        load_examples(cfg_for(path, eval_size=3))


def test_nothing_left_for_training_after_dedup(tmp_path):
    # Every row has the same question, so the held-out copy removes them all from train.
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "same", "answer": "1"}] * 4)
    with pytest.raises(DataError, match="no training examples"):
        load_examples(cfg_for(path, eval_size=1))


def test_missing_path_lists_builtin_sources(tmp_path):
    with pytest.raises(DataError) as err:
        load_examples(cfg_for(tmp_path / "nope.jsonl"))
    msg = str(err.value)
    assert "nope.jsonl" in msg
    for name in ("toy_addition", "reasoning_gym", "champ"):
        assert name in msg


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(cfg_for(path))


# --------------------------------------------------------------------------- json, parquet, datasets

def test_json_list_and_data_wrapper(tmp_path):
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(rows(6)))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows(6)}))
    assert load_examples(cfg_for(plain))[1][0]["question"] == \
        load_examples(cfg_for(wrapped))[1][0]["question"]
    assert sum(map(len, load_examples(cfg_for(plain)))) == 6


def test_json_bad_row_names_row_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows(2) + [{"question": "q"}]))
    with pytest.raises(DataError, match=r"d\.json: row 2.*'answer'"):
        load_examples(cfg_for(path))


def test_json_wrong_top_level(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="JSON list"):
        load_examples(cfg_for(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    table = pa.table({"question": [f"q{i}" for i in range(8)], "answer": list(range(8))})
    pq.write_table(table, tmp_path / "d.parquet")
    train, held = load_examples(cfg_for(tmp_path / "d.parquet"))
    assert len(train) == 5 and len(held) == 3
    assert {ex["question"]: ex["answer"] for ex in train + held}["q5"] == "5"


def test_parquet_null_names_row(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a", None, "c"], "answer": ["1", "2", "3"]}),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row 1.*'question'"):
        load_examples(cfg_for(tmp_path / "d.parquet", eval_size=1))


def save_like_datasets(pa, folder, records, shards=1):
    """Write `records` the way `datasets.Dataset.save_to_disk` lays a folder out:
    data-0000i-of-0000n.arrow shards in the Arrow IPC stream format, state.json listing
    them, and dataset_info.json."""
    folder.mkdir(parents=True)
    names = []
    per_shard = -(-len(records) // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        table = pa.Table.from_pylist(records[i * per_shard:(i + 1) * per_shard])
        with pa.OSFile(str(folder / name), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append(name)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "test",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_datasets_folder(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    save_like_datasets(pa, tmp_path / "ds", rows(10), shards=2)
    train, held = load_examples(cfg_for(tmp_path / "ds"))
    assert len(train) == 7 and len(held) == 3
    assert {ex["question"] for ex in train + held} == {r["question"] for r in rows(10)}


def test_datasets_dict_with_test_split(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    root = tmp_path / "dd"
    save_like_datasets(pa, root / "train", rows(10))
    save_like_datasets(pa, root / "test", rows(5, start=100))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    train, held = load_examples(cfg_for(root))
    assert len(train) == 10 and len(held) == 3
    assert {ex["question"] for ex in held} <= {r["question"] for r in rows(5, start=100)}
    with pytest.raises(DataError, match=r"test split has 5 examples"):
        load_examples(cfg_for(root, eval_size=6))


def test_datasets_dict_without_test_split_splits_train(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    root = tmp_path / "dd"
    save_like_datasets(pa, root / "train", rows(10))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    train, held = load_examples(cfg_for(root))
    assert len(train) == 7 and len(held) == 3


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_examples(cfg_for(tmp_path / "junk"))


# --------------------------------------------------------------------------- reasoning-gym

def gym_cfg(**kw):
    return DataConfig(source="reasoning_gym", task=kw.pop("task", "chain_sum"),
                      train_size=kw.pop("train_size", 50), eval_size=kw.pop("eval_size", 20),
                      seed=kw.pop("seed", 3), **kw)


def test_reasoning_gym_chain_sum():
    pytest.importorskip("reasoning_gym")
    train, held = load_examples(gym_cfg())
    assert len(held) == 20 and 0 < len(train) <= 50
    assert not {e["question"] for e in train} & {e["question"] for e in held}
    again = load_examples(gym_cfg())
    assert [e["question"] for e in again[0]] == [e["question"] for e in train]
    assert [e["question"] for e in again[1]] == [e["question"] for e in held]
    ex = held[0]
    assert ex["meta"]["rg_task"] == "chain_sum"
    assert ex["meta"]["rg_entry"]["question"] == ex["question"]
    assert ex["meta"]["rg_entry"]["answer"] == ex["answer"]
    assert json.loads(json.dumps(ex["meta"])) == ex["meta"]


def test_reasoning_gym_task_config_and_errors():
    pytest.importorskip("reasoning_gym")
    train, _ = load_examples(gym_cfg(task_config={"min_terms": 2, "max_terms": 2,
                                                  "min_digits": 1, "max_digits": 1}))
    assert all(e["meta"]["rg_entry"]["metadata"]["num_terms"] == 2 for e in train)
    with pytest.raises(DataError, match=r"chain_su.*chain_sum"):
        load_examples(gym_cfg(task="chain_su"))
    with pytest.raises(DataError, match=r"not valid.*min_terms"):
        load_examples(gym_cfg(task_config={"no_such_field": 1}))


def test_reasoning_gym_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install reasoning-gym"):
        load_examples(gym_cfg())


# --------------------------------------------------------------------------- champ

def test_champ_split():
    pytest.importorskip("champ_dataset")
    cfg = DataConfig(source="champ", train_size=0, eval_size=50, seed=1)
    train, held = load_examples(cfg)
    assert len(held) == 50 and len(train) == 220
    assert not {e["question"] for e in train} & {e["question"] for e in held}
    assert load_examples(cfg) == (train, held)


# --------------------------------------------------------------------------- toy addition

def test_toy_addition_real_module():
    cfg = DataConfig(source="toy_addition", train_size=200, eval_size=30, seed=5)
    train, held = load_examples(cfg)
    assert len(held) == 30 and train
    assert not {e["question"] for e in train} & {e["question"] for e in held}
    assert load_examples(cfg) == (train, held)
    with pytest.raises(DataError, match="task_config"):
        load_examples(DataConfig(source="toy_addition", task_config={"digits": 3}))


def test_toy_addition_branch_drops_overlap(monkeypatch):
    # A stand-in generator whose train and held-out outputs share questions.
    def fake(n, seed, **kw):
        return [{"question": f"{i}+{kw['k']}", "answer": str(i + kw["k"]), "meta": {"seed": seed}}
                for i in range(n)]
    from opo.tasks import addition

    monkeypatch.setattr(addition, "make_addition_examples", fake)
    cfg = DataConfig(source="toy_addition", train_size=10, eval_size=4, seed=5,
                     task_config={"k": 1})
    train, held = load_examples(cfg)
    assert [e["question"] for e in held] == ["0+1", "1+1", "2+1", "3+1"]
    assert [e["question"] for e in train] == [f"{i}+1" for i in range(4, 10)]
    assert held[0]["meta"]["seed"] == derive_seed(5, "held_out") != 5


# --------------------------------------------------------------------------- sampler

def test_sampler_covers_each_index_once_per_epoch():
    sampler = PromptSampler(7, seed=0)
    drawn = sampler.next_batch(7 * 3)
    epochs = [drawn[i:i + 7] for i in range(0, 21, 7)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(7))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # epochs are reshuffled
    assert sampler.state_dict() == {"epoch": 3, "position": 0}


def test_sampler_is_deterministic_and_independent_of_batching():
    a = PromptSampler(10, seed=4)
    b = PromptSampler(10, seed=4)
    whole = a.next_batch(35)
    pieces = sum((b.next_batch(k) for k in (3, 7, 0, 11, 4, 10)), [])
    assert whole == pieces
    assert PromptSampler(10, seed=5).next_batch(35) != whole


def test_sampler_ignores_global_rng():
    import random

    import numpy as np
    import torch

    first = PromptSampler(20, seed=1).next_batch(30)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert PromptSampler(20, seed=1).next_batch(30) == first


def test_sampler_resume_matches_uninterrupted_run():
    uninterrupted = PromptSampler(9, seed=2)
    expected = [uninterrupted.next_batch(4) for _ in range(10)]

    first = PromptSampler(9, seed=2)
    got = [first.next_batch(4) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = PromptSampler(9, seed=2)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(4) for _ in range(5)]
    assert got == expected


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError):
        PromptSampler(0, seed=0)
    with pytest.raises(ValueError):
        PromptSampler(3, seed=0).load_state_dict({"epoch": 0, "position": 4})


# --------------------------------------------------------------------------- prompts

class StubTokenizer:
    """Records the messages and renders them in a simple ChatML-like layout."""

    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.messages = messages
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + "<assistant>"


class NoTemplateTokenizer:
    chat_template = None


def test_plain_format():
    cfg = PromptConfig(template="plain", instruction="Answer with a number.")
    assert format_prompt(None, "2+2?", cfg) == "2+2?\nAnswer with a number."
    assert format_prompt(None, "2+2?", PromptConfig(template="plain")) == "2+2?"
    custom = PromptConfig(template="plain", plain_format="Q: {question}{instruction}\nA:")
    assert format_prompt(None, "1+1?", custom) == "Q: 1+1?\nA:"
    with pytest.raises(DataError, match="plain_format"):
        format_prompt(None, "x", PromptConfig(template="plain", plain_format="{answer}"))


def test_chat_template_with_system_and_instruction():
    tok = StubTokenizer()
    cfg = PromptConfig(template="chat", system_prompt="Be brief.", instruction="Box it.")
    text = format_prompt(tok, "2+2?", cfg)
    assert tok.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "2+2?\n\nBox it."}]
    assert text == "<system>Be brief.</system><user>2+2?\n\nBox it.</user><assistant>"


def test_auto_picks_chat_only_when_template_exists():
    tok = StubTokenizer()
    format_prompt(tok, "q", PromptConfig(template="auto"))
    assert tok.messages == [{"role": "user", "content": "q"}]
    assert format_prompt(NoTemplateTokenizer(), "q", PromptConfig(template="auto")) == "q"


def test_chat_without_template_is_an_error():
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(NoTemplateTokenizer(), "q", PromptConfig(template="chat"))


# --------------------------------------------------------------------------- held-out size, defaults

@pytest.mark.parametrize("n_rows, eval_size, held, capped", [
    (300, 0, 30, True),     # auto: 10% of a small file, so 270 rows stay for training
    (5000, 0, 200, False),  # auto: the usual 200 once a file is large enough
    (12, 0, 1, True),       # at least one held-out problem
    (300, 50, 50, False),   # an explicit size is used as given
])
def test_auto_held_out_size_caps_small_files_and_says_so(tmp_path, n_rows, eval_size, held, capped):
    from opo.data import load_split

    path = write_jsonl(tmp_path / "d.jsonl", rows(n_rows))
    split = load_split(cfg_for(path, eval_size=eval_size))
    assert len(split.held_out) == held and len(split.train) == n_rows - held
    assert bool(split.note) == capped
    summary = split.summary()
    assert f"{n_rows - held} training and {held} held-out" in summary
    if capped:
        assert "10%" in summary and f"{n_rows} rows" in summary and "data.eval_size" in summary


def test_auto_held_out_size_for_generated_sources_and_test_splits(tmp_path):
    from opo.data import load_split

    split = load_split(DataConfig(source="toy_addition", train_size=50))
    assert len(split.held_out) == 200 and split.note == ""
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    root = tmp_path / "dd"
    save_like_datasets(pa, root / "train", rows(10))
    save_like_datasets(pa, root / "test", rows(5, start=100))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    split = load_split(cfg_for(root, eval_size=0))
    assert len(split.held_out) == 5 and len(split.train) == 10
    assert "whole test split of 5 rows" in split.note


def test_each_source_carries_its_natural_reward():
    from opo.data import source_defaults

    assert source_defaults("toy_addition").reward == "exact_match"
    assert source_defaults("reasoning_gym").reward == "reasoning_gym"
    assert source_defaults("champ").reward == "math_verify"
    assert source_defaults("data/my_maths.jsonl").reward == "math_verify"
    assert "boxed" in source_defaults("champ").instruction
    assert source_defaults("champ").max_new_tokens >= 256
    assert source_defaults("toy_addition").plain_max_new_tokens == 32


def test_a_registered_loader_may_return_a_plain_pair(monkeypatch):
    from opo.data import SOURCES, load_split

    monkeypatch.setitem(SOURCES, "pairs", lambda cfg: ([{"question": "a", "answer": "1", "meta": {}}], []))
    split = load_split(DataConfig(source="pairs"))
    assert len(split.train) == 1 and split.held_out == [] and split.note == ""

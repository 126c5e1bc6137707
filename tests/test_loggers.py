"""trainer.loggers: TensorBoard and W&B receive exactly the rows of metrics.jsonl.

Each logger is checked by reading back what the real package wrote (TensorBoard event files
through TensorBoard's own reader; the W&B offline run file record by record), never a mock."""

import glob
import json
import shutil
import struct
import sys
import time

import pytest

from opo.cli import main
from opo.config import ConfigError, load_config
from opo.loggers import scalars
from opo.trainer import train

from conftest import micro_overrides


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _series(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


def test_scalars_flattens_numbers_and_drops_text():
    row = {"step": 3, "loss": 0.5, "tokens": 12, "ok": True, "note": "x", "ids": [1, 2],
           "eval": {"pass@1": 0.25, "model": "m"}}
    assert scalars(row) == {"loss": 0.5, "tokens": 12.0, "ok": 1.0, "eval/pass@1": 0.25}


def test_unknown_duplicate_or_missing_loggers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.loggers.*tensorboard and/or wandb"):
        load_config("tiny", ["trainer.loggers=[mlflow]"])
    with pytest.raises(ConfigError, match="trainer.loggers.*once"):
        load_config("tiny", ["trainer.loggers=[wandb,wandb]"])
    assert load_config("tiny", ["trainer.loggers=tensorboard"]).trainer.loggers == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"trainer.loggers: 'wandb' needs the wandb package.*opo\[wandb\]"):
        load_config("tiny", ["trainer.loggers=[wandb]"])


def test_missing_logger_package_fails_before_anything_is_written(micro_model_dir, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run), "trainer.loggers=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert "trainer.loggers" in err and "pip install 'opo[wandb]'" in err and "Traceback" not in err
    assert not run.exists()


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same_curves(logged, rows, keys):
    for key in keys:
        expected = _series(rows, key)
        got = logged[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key  # float32


def test_tensorboard_holds_the_metrics_rows_and_survives_a_resume(micro_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed "
                                              "(pip install 'opo[tensorboard]')")
    run = tmp_path / "run"
    overrides = micro_overrides(micro_model_dir, run, **{"trainer.loggers": "[tensorboard]",
                                                         "checkpoint.every": 2, "checkpoint.keep": 3})
    train(load_config("tiny", overrides), log=lambda *a: None)
    rows = _rows(run)
    logged = _tensorboard_scalars(run / "tensorboard")
    keys = ["reward_mean", "loss", "grad_norm", "entropy", "kl_to_init", "eval_accuracy", "seconds"]
    _assert_same_curves(logged, rows, keys)
    assert [s for s, _ in logged["eval_accuracy"]] == [0, 2, 4]

    # Lose the last checkpoint, as if killed between steps 2 and 4: steps 3-4 are trained
    # again, and TensorBoard must still show one point per step, the rewritten ones.
    shutil.rmtree(run / "checkpoints" / "step_4")
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    resumed_rows = _rows(run)
    assert [r["step"] for r in resumed_rows] == [0, 1, 2, 3, 4]
    _assert_same_curves(_tensorboard_scalars(run / "tensorboard"), resumed_rows, keys)


def _wandb_history(run_file):
    """The history rows of a W&B run file: a LevelDB-style log of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(run_file, "rb").read()
    assert raw[:4] == b":W&B"
    block, pos, part, history = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        part += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of a split one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
    return history


def test_wandb_offline_run_holds_the_metrics_rows(micro_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install 'opo[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(load_config("tiny", micro_overrides(micro_model_dir, run, **{"trainer.loggers": "[wandb]",
                                                                       "trainer.wandb_project": "opo-test"})),
          log=lambda *a: None)
    run_id = (run / "wandb_id").read_text().strip()
    files = glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1, "one offline W&B run, named by the id kept in the run folder"
    rows = _rows(run)
    # W&B's service process writes the run file; on a busy machine its last records can land
    # a moment after `finish()` has returned (seen twice in full-suite runs: no history rows
    # yet). Read again for up to 30 s before comparing.
    deadline = time.monotonic() + 30
    history = _wandb_history(files[0])
    while len(history) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        history = _wandb_history(files[0])
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, row in zip(history, rows):
        expected = scalars(row)
        assert {k: h[k] for k in expected} == pytest.approx(expected, rel=1e-12)


def test_wandb_that_cannot_start_is_a_clear_error(micro_model_dir, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb", reason="the wandb package is not installed (pip install 'opo[wandb]')")

    def refuse(**kwargs):  # what W&B does online without a login, reduced to its exception
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    run = tmp_path / "run"
    args = micro_overrides(micro_model_dir, run, **{"trainer.loggers": "[wandb]", "trainer.wandb_mode": "online"})
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "W&B could not start (trainer.wandb_mode=online)" in err and "api_key" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()  # nothing trained, and the folder can be used again
    monkeypatch.undo()  # the real wandb.init again
    assert main(["train", *args[:-1], "trainer.wandb_mode=offline"]) == 0


def test_tensorboard_shows_each_steps_samples_as_a_table(micro_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 2, "trainer.log_samples": 2, "trainer.loggers": "[tensorboard]"}))
    train(cfg, log=lambda *a: None)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [1, 2]
    records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    for event in events:
        table = event.tensor_proto.string_val[0].decode()
        mine = [r for r in records if r["step"] == event.step]
        assert table.count("\n") == 1 + len(mine)  # header, rule, one line per sample
        assert all(f"| {r['step']} |" in table and str(r["advantage"]) in table for r in mine)

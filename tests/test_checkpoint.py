"""Atomic checkpoints, exact resume after SIGKILL, signals, and resume errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opo import checkpoint as ckpt
from opo.cli import main
from opo.config import load_config
from opo.trainer import is_timing_field, train

from conftest import micro_overrides


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not is_timing_field(k)} for r in rows]


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opo.cli", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_resume_matches_an_uninterrupted_run(micro_model_dir, tmp_path):
    extra = {"trainer.steps": 10, "checkpoint.every": 2, "checkpoint.keep": 2, "trainer.eval_every": 3}
    straight = tmp_path / "straight"
    assert main(["train", *micro_overrides(micro_model_dir, straight, **extra)]) == 0

    killed = tmp_path / "killed"
    proc = _run_cli(micro_overrides(micro_model_dir, killed, **extra))
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_4").exists():  # kill somewhere after step 4
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()

    resumed = _run_cli(["--resume", str(killed)])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed" in out
    assert _rows(killed) == _rows(straight)  # bitwise: floats compare exactly
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for _, p in ckpt.list_checkpoints(killed)] == ["step_8", "step_10"]


def test_sigterm_saves_and_exits_cleanly(micro_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = _run_cli(micro_overrides(micro_model_dir, run, **{"trainer.steps": 400}))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert f"opo train --resume {run}" in out
    step = ckpt.list_checkpoints(run)[-1][0]
    assert 1 <= step < 400 and len(_rows(run)) == step + 1  # plus the step-0 evaluation row


# How a full disk shows: safetensors raises OSError; torch.save's zip writer a RuntimeError
# (this message is the one it gave when the disk filled up during a save on 2026-12-06).
FULL_DISK = {"weights": ("save_model", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
             "optimizer": ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                      "113310912 vs 113310800"), "is the disk full?")}


@pytest.mark.parametrize("where", sorted(FULL_DISK))
def test_disk_full_keeps_the_previous_checkpoint(micro_model_dir, tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run, **{"checkpoint.every": 1,
                                                                         "trainer.steps": 3}))
    name, error, expected = FULL_DISK[where]
    target = ckpt if name == "save_model" else ckpt.torch
    name = name.split(".")[-1]
    real_save = getattr(target, name)
    calls = {"n": 0}

    def full_disk(obj, path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real_save(obj, path, **kwargs)

    monkeypatch.setattr(target, name, full_disk)
    with pytest.raises(ckpt.CheckpointError) as err:
        train(cfg, log=lambda *a: None)
    message = str(err.value)
    assert "step 2" in message and expected in message
    assert "step_1 is intact" in message
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_1"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    from opo.models import load_policy

    policy = load_policy(str(micro_model_dir), device="cpu")[0]
    state, _ = ckpt.load_checkpoint(run / "checkpoints" / "step_1", model=policy,
                                    optimizer=torch.optim.AdamW(policy.parameters()))
    assert state["step"] == 1  # the survivor is complete and loadable


def test_resume_errors_are_clear(micro_model_dir, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 2})]) == 0
    step = run / "checkpoints" / "step_2"
    (step / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["train", "--resume", str(run)]) == 2
    assert "corrupt" in capsys.readouterr().err

    (step / "optimizer.pt").unlink()
    assert main(["train", "--resume", str(run)]) == 2
    assert "missing optimizer.pt" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["train", "--resume", str(empty)]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_every_checkpoint_loads_as_a_model(micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 3,
                                                                    "checkpoint.every": 1})]) == 0
    step = run / "checkpoints" / "step_2"
    loaded = AutoModelForCausalLM.from_pretrained(step)
    weights = load_file(str(step / "model.safetensors"))
    for name, tensor in loaded.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name
    assert AutoTokenizer.from_pretrained(step)("12+3=")["input_ids"]


def test_time_based_checkpoints(micro_model_dir, tmp_path):
    """checkpoint.every=0 with a (tiny) every_minutes saves after every step."""
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 3, "checkpoint.every": 0, "checkpoint.every_minutes": 1e-9,
        "checkpoint.keep": 5})]) == 0
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_1", "step_2", "step_3"]


def test_tiny_preset_checkpoints_by_default():
    cfg = load_config("tiny")
    assert cfg.checkpoint.every > 0 and cfg.checkpoint.every_minutes > 0


def test_resume_with_fewer_steps_is_a_clear_error(micro_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 3})]) == 0
    assert main(["train", "--resume", str(run), "trainer.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "step 3" in err and "trainer.steps=2" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run), "trainer.steps=3"]) == 0  # nothing left: finishes


def test_a_checkpoint_of_another_model_is_reported_as_a_mismatch(micro_model_dir, tmp_path):
    from opo.tasks import addition as toy

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 1})]) == 0
    other = toy.build_model(toy.build_tokenizer(), hidden=32, layers=2)
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.load_checkpoint(run / "checkpoints" / "step_1", model=other,
                             optimizer=torch.optim.AdamW(other.parameters()))


def test_replace_folder_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    final, new = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if self == new:
            raise OSError("crash between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(OSError):
        ckpt.replace_folder(new, final)
    assert (tmp_path / "final.old" / "w").read_text() == "old"  # never deleted
    monkeypatch.setattr(Path, "rename", real_rename)
    ckpt.replace_folder(new, final)
    assert (final / "w").read_text() == "new" and not (tmp_path / "final.old").exists()


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(micro_model_dir, tmp_path):
    root = tmp_path / "checkpoints"
    dead = root / ".step_3.tmp999999999"  # no such process
    alive = root / f".step_5.tmp{os.getppid()}"  # a live process (this test's parent) may still write
    dead.mkdir(parents=True)
    alive.mkdir()
    from opo.models import load_policy

    model, tok = load_policy(str(micro_model_dir), device="cpu")
    ckpt.save_checkpoint(tmp_path, 4, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                         state={"step": 4}, tensors={}, keep=2, tokenizer=tok)
    assert not dead.exists() and alive.exists()
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_4"]


def test_two_identical_runs_at_the_same_time_are_bitwise_equal(tmp_path):
    """One seed, two processes sharing the machine, 2 threads each: identical rows and weights.
    (Before torch's deterministic CPU kernels were switched on, the shared-prompt backward
    made such runs drift apart within a few steps.)"""
    runs = [tmp_path / "a", tmp_path / "b"]
    # The built-in tiny model with its preset's batch (16 x 8): big enough for 2-thread kernels.
    procs = [_run_cli([f"run.dir={run}", "trainer.steps=8", "checkpoint.every=0", "trainer.threads=2",
                       "trainer.eval_every=0", "data.eval_size=8", "trainer.progress=false"]) for run in runs]
    for proc in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-2000:]
    assert _rows(runs[0]) == _rows(runs[1])
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

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
from opo.trainer import TIMING_FIELDS, train

from conftest import micro_overrides


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


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
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert f"opo train --resume {run}" in out
    step = ckpt.list_checkpoints(run)[-1][0]
    assert 1 <= step < 400 and len(_rows(run)) == step


def test_disk_full_keeps_the_previous_checkpoint(micro_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run, **{"checkpoint.every": 1,
                                                                         "trainer.steps": 3}))
    real_save = ckpt.save_model
    calls = {"n": 0}

    def full_disk(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, path)

    monkeypatch.setattr(ckpt, "save_model", full_disk)
    with pytest.raises(ckpt.CheckpointError) as err:
        train(cfg, log=lambda *a: None)
    message = str(err.value)
    assert "step 2" in message and "No space left on device" in message
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

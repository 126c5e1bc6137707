"""Every user mistake in the reward, data and eval settings is a message and exit code 2,
never a traceback, and it comes before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opo.cli import main

CASES = [
    # (argv, words the message must contain)
    (["train", "reward.kind=math_verfy"], ["reward.kind", "did you mean math_verify"]),
    (["train", "reward.kind=no_such_reward_module:score"],
     ["no_such_reward_module", "current directory", "sys.path", "PYTHONPATH"]),
    (["train", "reward.kind=json:no_such_function"], ["reward.kind", "no attribute"]),
    (["train", "reward.kind=justaname"], ["reward.kind", "module:function"]),
    (["train", "reward.answer_format=box"], ["reward.answer_format", "'boxed'"]),
    (["train", "data.source=chmp"], ["data.source", "did you mean champ"]),
    (["train", "data.source=reasoning_gym", "data.task=chain_summ"], ["data.task", "did you mean chain_sum"]),
    (["train", "eval.batch_size=-1"], ["eval.batch_size", ">= 0"]),
    (["config", "tiny", "reward.kind=exact_mach"], ["did you mean exact_match"]),
    (["eval", "--reward", "math_verfy"], ["did you mean math_verify"]),
    (["eval", "--reward", "no_such_reward_module:score"], ["no_such_reward_module", "current directory"]),
    (["eval", "--task-config", "{min_terms: 2}"], ["--task-config", "not valid JSON"]),
    (["eval", "--task-config", "[1, 2]"], ["--task-config", "JSON object"]),
    (["eval", "--task", "chain_summ"], ["did you mean chain_sum"]),
    (["eval", "--task", "chmp"], ["did you mean task champ"]),
    (["eval", "--data", "no/such/file.jsonl"], ["no/such/file.jsonl", "existing path"]),
    (["eval", "--k", "1,four"], ["--k", "1,four"]),
    (["eval", "--n", "0"], ["eval.samples"]),
    (["eval", "--limit", "-3"], ["--limit"]),
    (["eval", "--top-p", "1.5"], ["eval.top_p"]),
    (["eval", "--task", "chain_sum", "--data", "x.jsonl"], ["--task or --data"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_errors_exit_2_with_a_message(argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative paths and module look-ups start from an empty folder
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("opo: error: ")
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_a_reward_module_in_the_current_directory_is_found(tmp_path, monkeypatch, capsys):
    from opo.rewards import RewardScorer

    (tmp_path / "cwd_reward_mod.py").write_text(
        "def score(prompt, response, example):\n    return float(response == example['answer'])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert main(["config", "tiny", "reward.kind=cwd_reward_mod:score"]) == 0
    assert "cwd_reward_mod:score" in capsys.readouterr().out
    # The workers see the module too: they start with the parent's sys.path.
    with RewardScorer(kind="cwd_reward_mod:score", isolate="always", workers=1) as scorer:
        result = scorer.score(["p", "p"], ["7", "8"], [{"answer": "7"}] * 2)
    assert result.rewards == [1.0, 0.0] and result.errors == 0


def _console_script() -> Path | None:
    script = Path(sys.executable).parent / "opo"
    return script if script.exists() else None


@pytest.mark.skipif(_console_script() is None, reason="the `opo` console script is not installed")
def test_the_console_script_reports_errors_and_finds_modules_in_cwd(tmp_path):
    """As a user runs it: the real `opo` script, whose sys.path does not include the cwd."""
    (tmp_path / "script_reward_mod.py").write_text("def score(p, r, e):\n    return 1.0\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv):
        return subprocess.run([str(_console_script()), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    ok = run("config", "tiny", "reward.kind=script_reward_mod:score")
    assert ok.returncode == 0, ok.stderr
    bad = run("train", "reward.kind=math_verfy")
    assert bad.returncode == 2 and "did you mean math_verify" in bad.stderr
    assert "Traceback" not in bad.stderr
    json_bad = run("eval", "--task-config", "{oops")
    assert json_bad.returncode == 2 and "not valid JSON" in json_bad.stderr
    assert "Traceback" not in json_bad.stderr


def _broken_files(tmp_path: Path, micro_model_dir: Path) -> dict[str, Path]:
    """Files that are not what their names say: each must give a message naming it."""
    import shutil

    model = tmp_path / "truncated_model"
    shutil.copytree(micro_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])  # cut inside the header
    binary = tmp_path / "garbage.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 8 + b"\n" + bytes(range(256)))
    fake_parquet = tmp_path / "not.parquet"
    fake_parquet.write_text('{"question": "1+1", "answer": "2"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return {"model": model, "jsonl": binary, "parquet": fake_parquet, "file": a_file}


@pytest.mark.parametrize("case, words", [
    ("model", ["truncated_model", "could not load the model", "corrupt"]),
    ("jsonl", ["garbage.jsonl", "line 1", "not UTF-8 text"]),
    ("parquet", ["not.parquet", "not a readable parquet file"]),
    ("file", ["a_file", "is a file, not a folder", "run.dir"]),
])
def test_broken_files_exit_2_with_a_message_naming_the_path(case, words, micro_model_dir, tmp_path, capsys):
    from conftest import micro_overrides

    broken = _broken_files(tmp_path, micro_model_dir)
    extra = {"model": {"model.path": broken["model"]}, "jsonl": {"data.source": broken["jsonl"]},
             "parquet": {"data.source": broken["parquet"]}, "file": {"run.dir": broken["file"]}}[case]
    overrides = micro_overrides(micro_model_dir, tmp_path / "run", **extra)
    code = main(["train", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("opo: error: ") and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_a_second_train_on_a_live_run_folder_is_refused_naming_the_process(micro_model_dir, tmp_path):
    """Two `opo train` on one run.dir: the second refuses while the first lives; once the first
    is killed, its stale lock does not block a resume."""
    import signal
    import time

    from conftest import micro_overrides

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "opo", "train",
                              *micro_overrides(micro_model_dir, run, **{"trainer.steps": 100000,
                                                                         "checkpoint.every": 1})],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "step_1").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0][-2000:]
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "opo", "train", "--resume", str(run)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by a running opo process (pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        fresh = subprocess.run([sys.executable, "-m", "opo", "train",
                                *micro_overrides(micro_model_dir, run, **{"trainer.steps": 3})],
                               capture_output=True, text=True, timeout=120)
        assert fresh.returncode == 2 and "in use by a running opo process" in fresh.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    from opo import checkpoint as ckpt

    step = ckpt.list_checkpoints(run)[-1][0]
    assert (run / ".lock").exists()  # the killed run's lock file stays behind, its lock does not
    resumed = subprocess.run([sys.executable, "-m", "opo", "train", "--resume", str(run),
                              f"trainer.steps={step + 1}"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout


def test_a_failed_set_up_gives_the_run_folder_back_at_once(micro_model_dir, tmp_path):
    """The exception (and so its traceback and frames) is still alive here, as in a notebook;
    a retry on the same run.dir must not find the folder held by this very process."""
    from conftest import micro_overrides

    from opo.config import load_config
    from opo.models import ModelError
    from opo.trainer import train

    run = tmp_path / "run"
    broken = load_config("tiny", micro_overrides(micro_model_dir, run, **{"model.path": tmp_path / "nowhere"}))
    with pytest.raises(ModelError) as failed:
        train(broken, log=lambda *a: None)
    fixed = load_config("tiny", micro_overrides(micro_model_dir, run, **{"trainer.steps": 1}))
    assert train(fixed, log=lambda *a: None)["steps"] == 1
    assert failed.value is not None  # kept alive until here on purpose

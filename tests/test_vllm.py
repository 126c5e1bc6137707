"""The vLLM engine: lazy import, honest errors, and (on a CUDA machine with vLLM) an on-policy run."""

import json
import subprocess
import sys

import pytest

from opo.config import load_config
from opo.rollout import make_engine
from opo.rollout.vllm import VLLMUnavailable, unavailable_reason

from conftest import micro_overrides

REASON = unavailable_reason()


def test_opo_trains_without_importing_vllm():
    code = ("import sys, opo.trainer, opo.rollout, opo.cli; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(REASON is None, reason="vLLM can run here; the refusal is for machines where it cannot")
def test_vllm_engine_refuses_clearly_where_it_cannot_run(micro_policy):
    model, tok = micro_policy
    with pytest.raises(VLLMUnavailable, match="rollout.engine=vllm: (vllm is not installed|no CUDA GPU)") as err:
        make_engine("vllm", model, tok, [tok.eos_token_id])
    assert "opo[vllm]" in str(err.value) or "CPU-only" in str(err.value)


def test_vllm_config_is_validated():
    from opo.config import ConfigError

    cfg = load_config("tiny", ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.3"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.gpu_memory_utilization == 0.3
    with pytest.raises(ConfigError, match="rollout.vllm.gpu_memory_utilization"):
        load_config("tiny", ["rollout.vllm.gpu_memory_utilization=1.5"])


@pytest.mark.skipif(REASON is not None, reason=f"vLLM engine not run: {REASON}")
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_vllm_trains_on_policy(micro_model_dir, tmp_path, dtype):
    """Weights pushed after each step, versions match, vLLM's log-probs agree with the trainer's."""
    from opo.trainer import train

    run = tmp_path / "run"
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run, **{
        "rollout.engine": "vllm", "model.dtype": dtype, "model.device": "cuda", "trainer.steps": 3,
        "rollout.temperature": 0.8, "rollout.vllm.gpu_memory_utilization": 0.2,
        "rollout.vllm.enforce_eager": True, "rollout.vllm.max_model_len": 64}))
    train(cfg, log=print)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["logp_mismatch_max"] is not None for r in rows)

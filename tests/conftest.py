"""Shared fixtures: tiny models built in the test session, never downloaded."""

import pytest
import torch

from opo.tasks import addition as toy


def save_toy_model(out, hidden: int, layers: int):
    """A random Llama with the toy character tokenizer (4 heads of hidden/4), saved as a HF folder."""
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, hidden=hidden, layers=layers, seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """A ~30k-parameter random Llama with the toy character tokenizer, saved as a HF folder."""
    return save_toy_model(tmp_path_factory.mktemp("micro_model"), hidden=32, layers=1)


@pytest.fixture
def micro_policy(micro_model_dir):
    from opo.models import load_policy

    torch.manual_seed(0)
    return load_policy(str(micro_model_dir), device="cpu")


def micro_overrides(model_dir, run_dir, **extra) -> list[str]:
    """Overrides that make `opo train` take a couple of seconds on the micro model."""
    base = {
        "model.path": str(model_dir), "run.dir": str(run_dir), "trainer.steps": 4,
        "trainer.eval_every": 2, "trainer.progress": False, "trainer.threads": 1,
        "data.train_size": 300, "data.eval_size": 16, "rollout.prompts_per_step": 4,
        "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 12, "metrics.kl_probe_size": 8,
        "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]

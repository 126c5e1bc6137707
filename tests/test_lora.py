"""LoRA through peft: only the adapters train, both engines sample through them, saving and resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opo import lora
from opo.cli import main
from opo.config import load_config
from opo.trainer import load_run_config, train

from conftest import micro_overrides

pytestmark = pytest.mark.skipif(not lora.available(), reason="peft is not installed: pip install 'opo[lora]'")

EVEN = {"reward.kind": "reward_fns:even_length", "reward.isolate": "never"}  # non-zero advantages
LORA = {**EVEN, "model.lora.r": 4, "model.lora.alpha": 8, "checkpoint.every": 1, "optim.lr": 1e-2}


@pytest.fixture(autouse=True)
def _reward_fns_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_lora_r4_trains_the_adapters_only_and_saves_merged(micro_model_dir, tmp_path, engine):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        **LORA, "rollout.engine": engine, "trainer.steps": 2})]) == 0
    rows = _rows(run)
    assert all(r["logp_mismatch_max"] < 1e-3 for r in rows)  # the engine samples through the adapters
    assert rows[-1]["policy_version"] == 2

    step = run / "checkpoints" / "step_2"
    adapters = load_file(str(step / "model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)  # trainable weights only
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in adapters.items())  # B left zero
    assert (step / "adapter" / "adapter_config.json").exists() and not (step / "config.json").exists()

    base = load_file(str(Path(micro_model_dir) / "model.safetensors"))
    merged = load_file(str(run / "final" / "model.safetensors"))
    assert set(merged) <= set(base) and len(merged) >= len(base) - 1  # (tied embeddings: one name)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, weight in merged.items():
        if name.endswith(".weight") and any(t in name for t in targets):
            assert not torch.equal(weight, base[name]), name  # adapters merged in
        else:
            assert torch.equal(weight, base[name]), name      # base weights untouched
    assert AutoModelForCausalLM.from_pretrained(run / "final") is not None


def test_lora_resume_is_exact_and_adapter_folder_loads_with_peft(micro_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet = {"log": lambda *a: None}
    extra = {**LORA, "model.lora.merge_on_save": False, "trainer.eval_every": 0}
    train(load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "straight",
                                              **{**extra, "trainer.steps": 3})), **quiet)
    train(load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "split",
                                              **{**extra, "trainer.steps": 2})), **quiet)
    train(load_run_config(tmp_path / "split", ["trainer.steps=3"]), resume=True, **quiet)
    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optim = torch.load(tmp_path / "split" / "checkpoints" / "step_3" / "optimizer.pt", weights_only=True)
    assert len(optim["state"]) == len(load_file(str(tmp_path / "split" / "checkpoints" / "step_3" /
                                                    "model.safetensors")))  # adapters' moments only

    base = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "straight" / "final")
    trained = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(trained) == len(a)
    assert all(torch.equal(trained[k.replace(".weight", ".default.weight")], v) for k, v in a.items())


def test_unknown_lora_target_is_a_clear_error(micro_model_dir, tmp_path, capsys):
    code = main(["train", *micro_overrides(micro_model_dir, tmp_path / "run", **{
        "model.lora.r": 4, "model.lora.target_modules": "[no_such_proj]"})])
    err = capsys.readouterr().err
    assert code == 2 and "model.lora.target_modules" in err and "q_proj" in err and "Traceback" not in err

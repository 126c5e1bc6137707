"""The trainer end to end on a micro model: files, metrics, update direction, refusals."""

import json

import pytest
import torch

from opo import trainer as trainer_mod
from opo.cli import main
from opo.config import load_config
from opo.sequences import pack, score
from opo.trainer import TrainingError, policy_update, train

from conftest import micro_overrides

REQUIRED = {"step", "reward_mean", "accuracy", "entropy", "kl_to_init", "response_length_mean",
            "repetition_rate", "grad_norm", "adv_mean", "adv_std", "zero_variance_groups",
            "tokens", "seconds"}


def test_cli_train_writes_the_run_folder(micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert REQUIRED <= row.keys()
        assert row["kl_to_init"] >= 0 and 0 <= row["zero_variance_groups"] <= 1
        assert row["tokens"] > 0 and row["policy_version"] == row["step"]
    assert "eval_accuracy" in rows[1] and "eval_accuracy" in rows[3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["estimator"] == "opo"
    assert summary["final_accuracy"] == rows[-1]["eval_accuracy"]
    assert {"initial_accuracy", "wall_seconds"} <= summary.keys()
    cfg = load_config(run / "config.yaml")
    assert cfg.trainer.steps == 4 and cfg.model.path == str(micro_model_dir)
    assert AutoModelForCausalLM.from_pretrained(run / "final") is not None
    assert (run / "checkpoints" / "step_4" / "model.safetensors").exists()


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "opo_batch"])
def test_other_estimators_and_off_policy_run(micro_model_dir, tmp_path, estimator):
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / estimator, **{
        "algo.estimator": estimator, "trainer.steps": 2, "algo.updates_per_batch": 2,
        "algo.micro_batch_size": 3}))
    summary = train(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / estimator / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and rows[-1]["policy_version"] == 4  # 2 updates per batch


def test_one_update_moves_logprobs_with_the_advantage_sign(micro_policy):
    model, tok = micro_policy
    cfg = load_config("tiny", ["optim.lr=1e-2"])
    packed = pack([[5, 6, 7], [5, 6, 7]], [[8, 9, 1], [10, 11, 1]], tok.pad_token_id)
    adv = torch.tensor([1.0, -1.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    with torch.no_grad():
        before = (score(model, packed)[0] * packed.response_mask).sum(1)
    stats = policy_update(model, optimizer, packed, adv, cfg)
    with torch.no_grad():
        after = (score(model, packed)[0] * packed.response_mask).sum(1)
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["bad_updates"] == 0 and stats["grad_norm"] > 0


def test_on_policy_refuses_stale_responses(micro_model_dir, tmp_path, monkeypatch):
    real = trainer_mod.make_engine

    def stale_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        engine.sync_weights = lambda model, version: None  # never learns the new version
        return engine

    monkeypatch.setattr(trainer_mod, "make_engine", stale_engine)
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run"))
    with pytest.raises(TrainingError, match="refuses responses from policy version 0"):
        train(cfg, log=lambda *a: None)


def _nan_loss_on(steps_to_poison):
    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] in steps_to_poison else loss), stats
    return poisoned


def test_nan_step_is_skipped_and_counted(micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "policy_loss", _nan_loss_on({2}))
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run"))
    summary = train(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["skipped_steps"] == 1
    assert [r["policy_version"] for r in rows] == [1, 1, 2, 3]  # step 2 changed nothing
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]


def test_repeated_nan_steps_abort_with_a_clear_message(micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "policy_loss", _nan_loss_on(set(range(1, 100))))
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run", **{"trainer.max_bad_steps": 3}))
    with pytest.raises(TrainingError, match="3 consecutive steps had a NaN/inf loss"):
        train(cfg, log=lambda *a: None)


def test_reward_failures_are_contained_and_counted(micro_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # workers inherit sys.path
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run", **{
        "reward.kind": "reward_fns:always_raises", "trainer.steps": 2}))
    summary = train(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2
    assert all(r["reward_errors"] == 16 and r["reward_mean"] == 0.0 for r in rows)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(micro_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 1})]) == 0
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run))
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, log=lambda *a: None)

"""The trainer end to end on a micro model: files, metrics, update direction, refusals."""

import json

import pytest
import torch

from opo import run as run_mod
from opo import update as update_mod
from opo.cli import main
from opo.config import load_config
from opo.precision import mismatch_limit
from opo.sequences import Dist, pack, score
from opo.trainer import TrainingError, train
from opo.update import policy_update

from conftest import micro_overrides

REQUIRED = {"step", "reward_mean", "accuracy", "entropy", "kl_to_init", "response_length_mean",
            "repetition_rate", "grad_norm", "adv_mean", "adv_std", "zero_variance_groups",
            "tokens", "seconds", "logp_mismatch_max", "logp_mismatch_mean", "ratio_max", "clip_frac",
            "time_generate", "time_forward", "time_backward", "time_optimizer"}


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_the_run_folder(micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run)]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["eval_accuracy"] == json.loads((run / "summary.json").read_text())["initial_accuracy"]
    rows = rows[1:]
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


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "opo_batch", "opo_exact",
                                       "opo_proxy"])
def test_other_estimators_and_off_policy_run(micro_model_dir, tmp_path, estimator):
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / estimator, **{
        "algo.estimator": estimator, "trainer.steps": 2, "algo.updates_per_batch": 2,
        "algo.micro_batch_size": 3}))
    summary = train(cfg, log=lambda *a: None)
    rows = _rows(tmp_path / estimator)[1:]
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


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_an_entropy_bonus_raises_the_entropy(micro_policy, top_p):
    """With zero advantages only the bonus moves the weights: up the entropy, and not at all
    without it (the entropy the loss sees must carry a gradient, not only a value)."""
    model, tok = micro_policy
    packed = pack([[5, 6, 7], [5, 6, 7]], [[8, 9, 1], [10, 11, 1]], tok.pad_token_id)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for coef in (0.0, 0.5):
        model.load_state_dict(start)
        cfg = load_config("tiny", ["optim.lr=1e-2", f"algo.entropy_coef={coef}", f"rollout.top_p={top_p}",
                                   "optim.weight_decay=0"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
        mean_entropy = lambda: score(model, packed, Dist(top_p=top_p), with_entropy=True)[1][packed.response_mask.bool()].mean()
        with torch.no_grad():
            before = mean_entropy()
        stats = policy_update(model, optimizer, packed, torch.zeros(2), cfg)
        with torch.no_grad():
            results[coef] = (mean_entropy() - before, stats["grad_norm"])
    assert results[0.0] == (0.0, 0.0)
    assert results[0.5][0] > 0 and results[0.5][1] > 0


def test_on_policy_refuses_stale_responses(micro_model_dir, tmp_path, monkeypatch):
    real = run_mod.engine_from_config

    def stale_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        engine.sync_weights = lambda model, version: None  # never learns the new version
        return engine

    monkeypatch.setattr(run_mod, "engine_from_config", stale_engine)
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run"))
    with pytest.raises(TrainingError, match="refuses responses from policy version 0"):
        train(cfg, log=lambda *a: None)


def _nan_loss_on(steps_to_poison):
    real = update_mod.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] in steps_to_poison else loss), stats
    return poisoned


def test_nan_step_is_skipped_and_counted(micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(update_mod, "policy_loss", _nan_loss_on({2}))
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run"))
    summary = train(cfg, log=lambda *a: None)
    rows = _rows(tmp_path / "run")[1:]
    assert summary["skipped_steps"] == 1
    assert [r["policy_version"] for r in rows] == [1, 1, 2, 3]  # step 2 changed nothing
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]


def test_repeated_nan_steps_abort_with_a_clear_message(micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(update_mod, "policy_loss", _nan_loss_on(set(range(1, 100))))
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run", **{"trainer.max_bad_steps": 3}))
    with pytest.raises(TrainingError, match="3 consecutive steps had a NaN/inf loss"):
        train(cfg, log=lambda *a: None)


def test_reward_failures_are_contained_and_counted(micro_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # workers inherit sys.path
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run", **{
        "reward.kind": "reward_fns:always_raises", "trainer.steps": 2}))
    summary = train(cfg, log=lambda *a: None)
    rows = _rows(tmp_path / "run")[1:]
    assert summary["steps"] == 2
    assert all(r["reward_errors"] == 16 and r["reward_mean"] == 0.0 for r in rows)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(micro_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"trainer.steps": 1})]) == 0
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run))
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, log=lambda *a: None)


# ---------------------------------------------------------------- on-policy integrity

def _train_rows(micro_model_dir, run, **extra):
    cfg = load_config("tiny", micro_overrides(micro_model_dir, run, **extra))
    train(cfg, log=lambda *a: None)
    return _rows(run)[1:]


@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("sampling", [{"rollout.temperature": 0.7},
                                      {"rollout.temperature": 1.1, "rollout.top_p": 0.9},
                                      {"rollout.top_k": 5, "rollout.temperature": 0.8}])
def test_trainer_scores_under_the_sampling_distribution(micro_model_dir, tmp_path, engine, sampling):
    rows = _train_rows(micro_model_dir, tmp_path / "run", **{"trainer.steps": 3, "rollout.engine": engine,
                                                             "algo.micro_batch_size": 5, **sampling})
    limit = mismatch_limit(load_config("tiny"))
    assert all(0 <= r["logp_mismatch_max"] < limit for r in rows)
    assert all(r["logp_mismatch_mean"] <= r["logp_mismatch_max"] for r in rows)
    assert all(r["ratio_max"] == 1.0 for r in rows)  # exact on-policy: the ratio is exactly 1


def _skew_the_sampler(monkeypatch):
    """Engines whose reported log-probs are 5% off, as if they sampled at another temperature."""
    real = run_mod.engine_from_config

    def skewed_engine(*args, **kwargs):
        engine = real(*args, **kwargs)
        generate = engine.generate

        def skewed(prompt_ids, params):
            batch = generate(prompt_ids, params)
            batch.logprobs = [[x * 1.05 for x in row] for row in batch.logprobs]
            return batch
        engine.generate = skewed
        return engine

    monkeypatch.setattr(run_mod, "engine_from_config", skewed_engine)


def test_a_lying_sampler_stops_the_run_before_any_update(micro_model_dir, tmp_path, monkeypatch):
    """If the sampled distribution is not the one scored, the run refuses to train on it."""
    _skew_the_sampler(monkeypatch)
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run"))
    with pytest.raises(TrainingError, match="max_logp_mismatch"):
        train(cfg, log=lambda *a: None)
    assert _rows(tmp_path / "run")[1:] == []  # no step was logged, no weights changed


def test_the_mean_kl_check_stops_a_lying_sampler_the_maximum_lets_through(micro_model_dir, tmp_path, monkeypatch):
    """With the per-token maximum off (as a loose low-precision limit would be), the mean KL
    check alone still refuses the skewed sampler before any update."""
    _skew_the_sampler(monkeypatch)
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run") + [
        "algo.max_logp_mismatch=0", "algo.max_mismatch_kl=1e-4"])
    with pytest.raises(TrainingError, match="max_mismatch_kl=0.0001"):
        train(cfg, log=lambda *a: None)
    assert _rows(tmp_path / "run")[1:] == []


def test_a_checkpoint_with_shipped_sampling_defaults_trains_on_policy(micro_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "shipped"
    shutil.copytree(micro_model_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(repetition_penalty=5.0, top_k=3, min_new_tokens=4, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    for engine in ("fast", "hf"):
        rows = _train_rows(folder, tmp_path / engine, **{"trainer.steps": 2, "rollout.engine": engine})
        assert all(r["logp_mismatch_max"] < 1e-3 for r in rows), engine


def test_clip_frac_is_a_fraction_and_lr_is_this_steps_rate(micro_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = _train_rows(micro_model_dir, tmp_path / "run", **{
        "reward.kind": "reward_fns:even_length", "reward.isolate": "never",
        "algo.updates_per_batch": 4, "algo.micro_batch_size": 2, "algo.clip_eps": 0.01,
        "optim.lr": 0.05, "optim.warmup_steps": 3, "trainer.steps": 4})
    assert all(0 <= r["clip_frac"] <= 1 for r in rows)
    assert any(r["clip_frac"] > 0 for r in rows)  # a tiny clip range at a large lr does clip
    assert [r["lr"] for r in rows] == pytest.approx([0.05 / 3, 0.05 * 2 / 3, 0.05, 0.05])


def test_token_budget_micro_batches_give_the_same_update(micro_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    reward = {"reward.kind": "reward_fns:even_length", "reward.isolate": "never", "trainer.steps": 2}
    whole = _train_rows(micro_model_dir, tmp_path / "whole", **reward)
    split = _train_rows(micro_model_dir, tmp_path / "split", **{
        **reward, "algo.max_tokens_per_micro_batch": 40, "algo.logprob_chunk_size": 7})
    assert any(r["grad_norm"] > 0 for r in whole)
    for a, b in zip(whole, split):
        assert a["reward_mean"] == b["reward_mean"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_no_signal_warning_fires_once(micro_model_dir, tmp_path):
    """The random micro model never answers right: every group's rewards are all 0."""
    messages = []
    cfg = load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "run", **{
        "trainer.steps": 5, "trainer.warn_no_signal_steps": 3}))
    train(cfg, log=messages.append)
    rows = _rows(tmp_path / "run")[1:]
    assert all(r["zero_variance_groups"] == 1.0 for r in rows)
    warnings = [m for m in messages if "nothing was learned" in m]
    assert len(warnings) == 1 and "3 steps in a row" in warnings[0]


def test_off_policy_takes_exactly_u_steps_when_rows_do_not_divide(micro_model_dir, tmp_path):
    """6 rows and 4 updates: four mini-batches (2, 2, 1, 1 rows), four optimiser steps."""
    rows = _train_rows(micro_model_dir, tmp_path / "run", **{
        "trainer.steps": 1, "rollout.prompts_per_step": 3, "rollout.samples_per_prompt": 2,
        "algo.updates_per_batch": 4})
    assert rows[0]["policy_version"] == 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_1" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in state["state"].values()} == {4}  # AdamW really stepped 4 times


def test_samples_jsonl_holds_the_logged_responses_and_survives_a_resume(micro_model_dir, tmp_path):
    from opo.cli import main

    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 3, "trainer.log_samples": 3, "checkpoint.every": 2})]) == 0
    records = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for r in records:
        assert set(r) == {"step", "prompt", "response", "reward", "answer_read", "gold", "advantage",
                          "length", "finish_reason", "sampler_logprob_sum"}
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["length"] <= 12
        assert r["sampler_logprob_sum"] <= 0 and r["prompt"] and isinstance(r["advantage"], float)
        assert rows[r["step"]]["reward_mean"] is not None
    assert len({(r["step"], r["prompt"]) for r in records}) > 3  # spread over prompts, not one group
    # Resume from step 2: step 3 is trained again, and its samples are not written twice.
    import shutil

    from opo import checkpoint as ckpt

    shutil.rmtree(run / "final")
    for step, path in ckpt.list_checkpoints(run):
        if step == 3:
            shutil.rmtree(path)
    assert main(["train", "--resume", str(run)]) == 0
    again = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert again == records  # the replayed step 3 wrote the same samples, once


@pytest.mark.parametrize("mode", ["none", "token-tis", "sequence-mask"])
def test_rollout_correction_metrics_in_every_row(micro_model_dir, tmp_path, mode):
    rows = _train_rows(micro_model_dir, tmp_path / "run", **{"trainer.steps": 2, "algo.rollout_correction": mode,
                                                             "algo.correction_cap": 1.5})
    for r in rows:
        # fp32: sampler and trainer agree to ~1e-5, so ρ ≈ 1 everywhere and nothing is corrected.
        assert 0 <= r["mismatch_kl"] < 1e-6
        assert r["is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and r["is_weight_max"] <= 1.5
        assert r["is_corrected_share"] == 0.0

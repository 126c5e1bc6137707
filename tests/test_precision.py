"""Mixed precision: fp32 master weights, autocast everywhere the policy runs, fp16 scaling."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opo import run as run_mod
from opo import trainer as trainer_mod
from opo.cli import main
from opo.config import ConfigError, load_config
from opo.models import load_policy
from opo.precision import AUTO_MISMATCH, AUTO_MISMATCH_KL, Precision, mismatch_kl_limit, mismatch_limit
from opo.sequences import pack
from opo.trainer import is_timing_field, train
from opo.update import policy_update

from conftest import micro_overrides

EVEN = {"reward.kind": "reward_fns:even_length", "reward.isolate": "never"}  # non-zero advantages


@pytest.fixture(autouse=True)
def _reward_fns_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _one_update(model, tok, cfg, lr):
    packed = pack([[5, 6, 7], [5, 6, 7], [4, 5]], [[8, 9, 1], [10, 11, 12, 1], [6, 1]], tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    stats = policy_update(model, optimizer, packed, torch.tensor([1.0, -1.0, 0.5]), cfg)
    assert stats["bad_updates"] == 0 and stats["grad_norm"] > 0
    return stats


def test_an_update_of_relative_size_1e6_lands_on_fp32_master_weights(micro_model_dir):
    """AdamW's first step moves each weight by ~lr. At lr = 1e-6 * median|w| that is a relative
    change of ~1e-6: it lands on fp32 master weights (bf16 compute), and rounds away on bf16
    parameters, whose spacing is ~|w|/128."""
    cfg = load_config("tiny", ["model.dtype=bfloat16"])
    name = "model.layers.0.mlp.up_proj.weight"
    model, tok = load_policy(str(micro_model_dir), Precision("bfloat16").param_dtype, device="cpu")
    before = dict(model.named_parameters())[name].detach().clone()
    assert before.dtype == torch.float32
    lr = 1e-6 * float(before.abs().median())
    _one_update(model, tok, cfg, lr)
    after = dict(model.named_parameters())[name].detach()
    rel = ((after - before).abs() / before.abs().clamp_min(1e-12))
    moved = after != before
    assert float(moved.float().mean()) > 0.9
    assert 3e-7 < float(rel[moved].median()) < 3e-6

    pure_cfg = load_config("tiny", ["model.dtype=bfloat16", "model.pure_low_precision=true"])
    pure, tok = load_policy(str(micro_model_dir), "bfloat16", device="cpu")
    before = dict(pure.named_parameters())[name].detach().clone()
    assert before.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="pure_low_precision"):
        _one_update(pure, tok, pure_cfg, lr)
    after = dict(pure.named_parameters())[name].detach()
    assert float((after != before).float().mean()) < 0.01  # the update is lost


def test_bf16_run_writes_fp32_master_weights_in_its_checkpoints(micro_model_dir, tmp_path):
    """Done-when of the issue: `opo train model.dtype=bfloat16 trainer.steps=2 checkpoint.every=1`."""
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        **EVEN, "model.dtype": "bfloat16", "trainer.steps": 2, "checkpoint.every": 1})]) == 0
    base = load_file(str(Path(micro_model_dir) / "model.safetensors"))
    for step in ("step_1", "step_2"):
        folder = run / "checkpoints" / step
        weights = load_file(str(folder / "model.safetensors"))
        assert len(weights) >= len(base) - 1  # (save_model keeps one name of tied embeddings)
        assert {w.dtype for w in weights.values()} == {torch.float32}
        optim = torch.load(folder / "optimizer.pt", weights_only=True)
        moments = [t for s in optim["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
        assert moments and {t.dtype for t in moments} == {torch.float32}
    assert any(not torch.equal(weights[k], base[k]) for k in base.keys() & weights.keys())  # it trained
    assert {w.dtype for w in load_file(str(run / "final" / "model.safetensors")).values()} == {torch.float32}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(r["logp_mismatch_max"] <= AUTO_MISMATCH["bfloat16"] for r in rows)
    assert all(0 <= r["mismatch_kl"] <= AUTO_MISMATCH_KL["bfloat16"] for r in rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_resume_is_exact(micro_model_dir, tmp_path, dtype):
    extra = {**EVEN, "model.dtype": dtype, "checkpoint.every": 1, "trainer.eval_every": 0}
    quiet = {"log": lambda *a: None}
    train(load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "straight",
                                              **{**extra, "trainer.steps": 3})), **quiet)
    train(load_config("tiny", micro_overrides(micro_model_dir, tmp_path / "split",
                                              **{**extra, "trainer.steps": 2})), **quiet)
    cfg = trainer_mod.load_run_config(tmp_path / "split", ["trainer.steps=3"])
    train(cfg, resume=True, **quiet)

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not is_timing_field(k)} for x in lines]
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [r.get("grad_norm") for r in a[1:]] == [r.get("grad_norm") for r in b[1:]]
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if dtype == "float16":
        state = json.loads((tmp_path / "split" / "checkpoints" / "step_3" / "trainer_state.json").read_text())
        assert state["grad_scaler"]["scale"] > 0 and state["grad_scaler"]["_growth_tracker"] == 3


def test_every_policy_forward_runs_under_the_same_autocast(micro_model_dir, tmp_path, monkeypatch):
    """Sampling, the loss forward, the KL probe and evaluation all compute in bf16 with
    fp32 parameters; in float32 everything stays fp32."""
    seen = {"bfloat16": set(), "float32": set()}
    real = run_mod.load_policy

    for dtype in seen:
        def hooked(*args, _dtype=dtype, **kwargs):
            model, tok = real(*args, **kwargs)
            proj = model.model.layers[0].self_attn.q_proj
            proj.register_forward_hook(lambda mod, inp, out: seen[_dtype].add((out.dtype, mod.weight.dtype)))
            return model, tok
        monkeypatch.setattr(run_mod, "load_policy", hooked)
        train(load_config("tiny", micro_overrides(micro_model_dir, tmp_path / dtype, **{
            "model.dtype": dtype, "trainer.steps": 1})), log=lambda *a: None)
    assert seen["bfloat16"] == {(torch.bfloat16, torch.float32)}
    assert seen["float32"] == {(torch.float32, torch.float32)}


def test_float16_overflow_skips_the_step_and_lowers_the_scale(micro_model_dir, monkeypatch):
    from opo import update as update_mod

    real = update_mod.policy_loss
    monkeypatch.setattr(update_mod, "policy_loss", lambda *a, **k: (lambda l, s: (l * 1e38, s))(*real(*a, **k)))
    cfg = load_config("tiny", ["model.dtype=float16"])
    model, tok = load_policy(str(micro_model_dir), "float32", device="cpu")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    precision = Precision("float16", "cpu")
    scale = precision.scaler.get_scale()
    packed = pack([[5, 6, 7], [5, 6, 7]], [[8, 9, 1], [10, 11, 1]], tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = policy_update(model, optimizer, packed, torch.tensor([1.0, -1.0]), cfg, precision=precision)
    assert stats["bad_updates"] == 1
    assert precision.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mismatch_limit_follows_the_dtype_unless_given():
    assert mismatch_limit(load_config("tiny")) == AUTO_MISMATCH["float32"] == 1e-3
    assert mismatch_limit(load_config("tiny", ["model.dtype=bfloat16"])) == AUTO_MISMATCH["bfloat16"]
    assert mismatch_limit(load_config("tiny", ["model.dtype=bfloat16", "algo.max_logp_mismatch=0.2"])) == 0.2
    with pytest.raises(ConfigError, match="model.pure_low_precision"):
        load_config("tiny", ["model.pure_low_precision=true"])  # float32 has nothing to be pure about
    with pytest.raises(ConfigError, match="algo.max_logp_mismatch"):
        load_config("tiny", ["algo.max_logp_mismatch=sometimes"])
    assert mismatch_kl_limit(load_config("tiny", ["model.dtype=bfloat16"])) == AUTO_MISMATCH_KL["bfloat16"]
    assert mismatch_kl_limit(load_config("tiny", ["algo.max_mismatch_kl=0"])) == 0.0
    with pytest.raises(ConfigError, match="algo.max_mismatch_kl"):
        load_config("tiny", ["algo.max_mismatch_kl=-1"])


def test_fsdp_policy_matches_the_config():
    pytest.importorskip("torch.distributed.fsdp", reason="this torch build has no FSDP")
    assert Precision("float32").fsdp_policy() is None
    policy = Precision("bfloat16").fsdp_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_the_gpu_recipe_loads_with_mixed_precision_vllm_and_bounded_micro_batches(tmp_path):
    data = tmp_path / "math_train.jsonl"  # the recipe names the user's own file; the config checks it exists
    data.write_text('{"question": "1+1?", "answer": "2"}\n' * 600)
    cfg = load_config("r1-distill-qwen-7b", [f"data.source={data}"])
    assert cfg.model.dtype == "bfloat16" and not cfg.model.pure_low_precision
    assert cfg.rollout.engine == "vllm" and cfg.trainer.parallel == "fsdp"
    assert cfg.algo.max_tokens_per_micro_batch > 0 and 0 < cfg.algo.logprob_chunk_size <= 4096
    assert cfg.model.gradient_checkpointing

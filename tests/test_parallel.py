"""Data parallelism on CPU: gloo, 2 processes.

- One DDP step and one FSDP2 step equal a single-process step on the same global batch
  with the same responses (policy_update driven directly, the batch split by whole prompt
  groups, with a token budget that gives the two ranks different micro-batch plans).
- Ranks reach the same verdicts (NaN/inf skip, log-prob mismatch) even when only one
  rank's data triggers them; batch-level estimators see the global batch.
- FSDP2 checkpoint state is gathered in the single-process layout and loads back; FSDP2
  generation on one rank alone (inside `parallel.gathered`) equals an unsharded copy's.
- `torchrun ... -m opo train` writes exactly one run folder; under FSDP2 `--resume`
  replays the steps after the checkpoint exactly, and a DDP run continues in one process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from opo import parallel
from opo.advantages import compute_advantages
from opo.config import ConfigError, load_config
from opo.sequences import pack
from opo.update import OffPolicyError, policy_update

from conftest import micro_overrides

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

LR = 1e-3
BUDGET = 40  # algo.max_tokens_per_micro_batch: several micro-batches, and unequally many per rank


def _batch():
    """4 prompts x 4 responses of varied lengths, and an advantage per response."""
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for _ in range(4):
        prompt = torch.randint(3, 17, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(4):
            prompts.append(prompt)
            responses.append(torch.randint(3, 17, (int(torch.randint(1, 12, (1,), generator=g)),),
                                           generator=g).tolist())
    return prompts, responses, torch.randn(len(responses), generator=g)


SEQ_MEAN_AGGS = ("seq-mean-token-mean", "seq-mean-token-sum")
DISTILL = ["algo.teacher=tiny", "algo.distill_coef=0.5"]  # the shipped tiny model shares the tokenizer


def _cfg(*overrides):
    return load_config("tiny", [f"optim.lr={LR}", f"algo.max_tokens_per_micro_batch={BUDGET}", *overrides])


def _step(world, kind, model_dir, prompts, responses, adv, *, sampler_shift=0.0, overrides=(), on_model=None):
    """One policy_update on this rank's rows; returns (stats, full weights or None, policy, optimizer).
    `on_model(model)` runs after wrapping, before the update (to attach probes). With
    algo.teacher in `overrides` the teacher is loaded as opo.run does (sharded under fsdp)."""
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.run import fused_adamw, load_teacher

    cfg = _cfg(*overrides)
    model, tok = load_policy(str(model_dir), device="cpu")
    precision = Precision.from_config(cfg.model, "cpu")
    policy = parallel.wrap(model, world, kind, precision.fsdp_policy())  # as opo.run does
    if on_model:
        on_model(model)
    params = list(policy.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, fused=fused_adamw(params))  # as opo.run builds it
    packed = pack(prompts, responses, tok.pad_token_id)
    if sampler_shift:  # a sampler whose log-probs disagree with the trainer's by sampler_shift
        packed.values["sampler_logp"] = torch.full(packed.response_mask.shape, -sampler_shift)
    teacher = load_teacher(cfg, tok, precision, world, lambda *a: None) if cfg.algo.teacher else None
    stats = policy_update(policy, optimizer, packed, adv, cfg, world=world, precision=precision, teacher=teacher)
    weights = parallel.full_weights(world, policy)
    if weights is None:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return stats, weights, policy, optimizer


def _generate_alone(world, policy, model_dir, weights) -> dict:
    """Rank 0 alone samples greedily from the FSDP2-sharded model, inside `gathered`; the
    tokens must equal those of an unsharded copy holding the same weights."""
    from opo.models import eos_ids, load_policy
    from opo.rollout import SamplingParams, make_engine

    prompts, _, _ = _batch()
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    same = {}
    for kind in ("fast", "hf"):
        plain, tok = load_policy(str(model_dir), device="cpu")
        engine = make_engine(kind, policy.lm, tok, eos_ids(plain, tok))
        with parallel.gathered(policy):
            sharded = engine.generate(prompts[::4], params).response_ids if world.is_main else None
        if world.is_main:
            plain.load_state_dict(weights, strict=False)
            same[kind] = sharded == make_engine(kind, plain, tok, eos_ids(plain, tok)).generate(
                prompts[::4], params).response_ids
        world.broadcast_json(None)  # both ranks come out of the phase and meet again
    return same


def _fp16_overflow_on_rank_1(world) -> dict:
    """float16's gradient scaler where each rank sees only its own gradients (as under FSDP2,
    where each holds a shard): rank 1's overflow must skip the step on both ranks and leave
    both with the same, lowered scale."""
    from opo.precision import Precision

    precision = Precision("float16", "cpu")
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    before = precision.scaler.get_scale()
    for poison in (False, True):  # one good step (the scaler's growth tracker moves), then the overflow
        x = torch.full((4,), float("inf") if poison and world.rank == 1 else 1.0)
        precision.backward((weight * x).sum())
        precision.unscale_(optimizer)
        finite = bool(torch.isfinite(weight.grad).all())
        if world.any(not finite):
            precision.skip()
        else:
            precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return {"before": before, "after": precision.scaler.get_scale(),
            "tracker": int(precision.scaler._growth_tracker.item()), "weight": weight.detach().clone()}


def _worker(rank, size, port, model_dir, out_dir):
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout, so that a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world = parallel.init("cpu")
    prompts, responses, adv = _batch()
    mine = slice(*(len(prompts) // size * k for k in (rank, rank + 1)))  # whole groups: 8 rows each
    out = {"plan": len(pack(prompts[mine], responses[mine], 0).micro_batches(0, BUDGET))}
    for kind in ("ddp", "fsdp"):
        stats, weights, policy, optimizer = _step(world, kind, model_dir, prompts[mine], responses[mine], adv[mine])
        out[kind] = {"stats": stats, "weights": weights}
        if kind == "fsdp":  # the optimiser state in torch's layout, and loaded back into the shards
            state = parallel.optimizer_state(world, policy, optimizer)
            out["fsdp"]["optimizer"] = state
            fresh = torch.optim.AdamW(policy.parameters(), lr=LR)
            parallel.load_optimizer_state(world, policy, fresh, lambda: state)
            out["fsdp"]["reloaded"] = parallel.optimizer_state(world, policy, fresh)
            out["fsdp"]["generated_alike"] = _generate_alone(world, policy, model_dir, weights)
    # On-policy distillation: the teacher replicated under ddp, sharded under fsdp.
    for kind in ("ddp", "fsdp"):
        stats, weights, _, _ = _step(world, kind, model_dir, prompts[mine], responses[mine], adv[mine],
                                     overrides=DISTILL + [f"trainer.parallel={kind}"])
        out[f"distill_{kind}"] = {"stats": stats, "weights": weights}
    # The per-sequence loss aggregations divide by the global number of responses.
    for agg in SEQ_MEAN_AGGS:
        stats, weights, _, _ = _step(world, "ddp", model_dir, prompts[mine], responses[mine], adv[mine],
                                     overrides=[f"algo.loss_agg={agg}"])
        out[agg] = {"stats": stats, "weights": weights}
    # FSDP2 in bf16: what the decoder layers compute with, and what the shards hold.
    seen = set()

    def probe(model):
        lin = model.model.layers[0].mlp.down_proj
        lin.register_forward_pre_hook(lambda mod, args: seen.add(str(mod.weight.dtype)))

    _, _, policy, _ = _step(world, "fsdp", model_dir, prompts[mine], responses[mine], adv[mine],
                            overrides=["model.dtype=bfloat16"], on_model=probe)
    out["fsdp_bf16"] = {"compute": sorted(seen), "stored": sorted({str(p.dtype) for p in policy.parameters()})}
    out["fp16_skip"] = _fp16_overflow_on_rank_1(world)
    # A NaN advantage on rank 1 only: both ranks must skip the step.
    nan_adv = adv[mine].clone()
    if rank == 1:
        nan_adv[0] = float("nan")
    stats, weights, _, _ = _step(world, "ddp", model_dir, prompts[mine], responses[mine], nan_adv)
    out["nan"] = {"bad_updates": stats["bad_updates"], "weights": weights}
    # A sampler that disagrees on rank 1 only: both ranks must refuse the update.
    try:
        _step(world, "ddp", model_dir, prompts[mine], responses[mine], adv[mine],
              sampler_shift=1.0 if rank == 1 else 0.0)
        out["mismatch"] = "accepted"
    except OffPolicyError:
        out["mismatch"] = "refused"
    # Batch-level advantages on the gathered global batch.
    r = torch.tensor([float(len(x) % 3) for x in responses])[mine]
    lengths = torch.tensor([float(len(x)) for x in responses])[mine]
    groups = torch.arange(len(prompts)).div(4, rounding_mode="floor")[mine]
    full = world.gather(r, lengths, groups)
    out["advantages"] = world.local_part(compute_advantages("reinforce_pp", *full))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(micro_model_dir, tmp_path_factory):
    """What each of 2 gloo ranks computed (see _worker), and the single-process reference."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(micro_model_dir), str(out)), nprocs=2)
    prompts, responses, adv = _batch()
    stats, weights, model, optimizer = _step(parallel.SINGLE, "ddp", micro_model_dir, prompts, responses, adv)
    single = {"stats": stats, "weights": weights, "optimizer": optimizer.state_dict()}
    stats, weights, _, _ = _step(parallel.SINGLE, "ddp", micro_model_dir, prompts, responses, adv, overrides=DISTILL)
    single["distill"] = {"stats": stats, "weights": weights}
    for agg in SEQ_MEAN_AGGS:
        stats, weights, _, _ = _step(parallel.SINGLE, "ddp", micro_model_dir, prompts, responses, adv,
                                     overrides=[f"algo.loss_agg={agg}"])
        single[agg] = {"stats": stats, "weights": weights}
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], single


def _assert_same_step(multi, single, initial):
    moved = max(float((single["weights"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # the step did change the weights, so equality below means something
    for name, tensor in multi["weights"].items():
        torch.testing.assert_close(tensor, single["weights"][name], rtol=1e-5, atol=1e-6, msg=name)
    for key in ("loss", "grad_norm", "entropy"):
        assert multi["stats"][key] == pytest.approx(single["stats"][key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def initial_weights(micro_model_dir):
    from safetensors.torch import load_file

    return load_file(str(micro_model_dir / "model.safetensors"))


def test_the_two_ranks_cut_different_numbers_of_micro_batches(two_ranks):
    ranks, _ = two_ranks
    assert ranks[0]["plan"] != ranks[1]["plan"]  # so the equal-count planning is exercised


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_data_parallel_step_equals_the_single_process_step(two_ranks, initial_weights, kind):
    ranks, single = two_ranks
    _assert_same_step(ranks[0][kind], single, initial_weights)
    assert ranks[1][kind]["stats"] == ranks[0][kind]["stats"]  # every rank logs the same figures


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distillation_step_equals_the_single_process_step(two_ranks, initial_weights, kind):
    ranks, single = two_ranks
    multi = ranks[0][f"distill_{kind}"]
    _assert_same_step(multi, single["distill"], initial_weights)
    assert multi["stats"]["teacher_kl"] == pytest.approx(single["distill"]["stats"]["teacher_kl"], rel=1e-5)
    assert single["distill"]["stats"]["teacher_kl"] > 0.1  # the teacher really differs from the student
    # ... and it changed the step: the weights differ from those of the reward-only step.
    assert max(float((single["distill"]["weights"][k] - single["weights"][k]).abs().max())
               for k in initial_weights) > 1e-4


@pytest.mark.parametrize("agg", SEQ_MEAN_AGGS)
def test_per_sequence_loss_aggregations_equal_the_single_process_step(two_ranks, initial_weights, agg):
    ranks, single = two_ranks
    _assert_same_step(ranks[0][agg], single[agg], initial_weights)
    assert ranks[1][agg]["stats"] == ranks[0][agg]["stats"]


def test_fsdp2_computes_in_bf16_and_keeps_fp32_master_weights(two_ranks):
    ranks, _ = two_ranks
    for rank in ranks:
        assert rank["fsdp_bf16"] == {"compute": ["torch.bfloat16"], "stored": ["torch.float32"]}


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank_with_equal_scales(two_ranks):
    ranks, _ = two_ranks
    a, b = (r["fp16_skip"] for r in ranks)
    assert a["after"] == b["after"] == a["before"] * 0.5  # backed off once, on both ranks
    assert a["tracker"] == b["tracker"] == 0               # the overflow reset the growth count
    assert torch.equal(a["weight"], b["weight"])            # only the good step was applied


def test_fsdp2_optimizer_state_is_gathered_in_the_single_process_layout(two_ranks):
    ranks, single = two_ranks
    gathered, reference = ranks[0]["fsdp"]["optimizer"], single["optimizer"]
    assert gathered["param_groups"][0]["params"] == reference["param_groups"][0]["params"]
    assert gathered["state"].keys() == reference["state"].keys()
    for i, state in reference["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(gathered["state"][i][key], state[key], rtol=1e-4, atol=1e-9)
    reloaded = ranks[0]["fsdp"]["reloaded"]
    for i, state in gathered["state"].items():
        for key, value in state.items():
            assert torch.equal(reloaded["state"][i][key], value), (i, key)
    assert ranks[1]["fsdp"]["optimizer"] == {}  # only rank 0 holds the gathered copy


def test_fsdp2_generation_runs_on_the_gathered_weights_on_one_rank_alone(two_ranks):
    ranks, _ = two_ranks
    assert ranks[0]["fsdp"]["generated_alike"] == {"fast": True, "hf": True}


def test_ranks_skip_a_nan_step_together(two_ranks, initial_weights):
    ranks, _ = two_ranks
    assert [r["nan"]["bad_updates"] for r in ranks] == [1, 1]
    for name, tensor in initial_weights.items():
        assert torch.equal(ranks[0]["nan"]["weights"][name], tensor), name


def test_ranks_refuse_an_off_policy_update_together(two_ranks):
    ranks, _ = two_ranks
    assert [r["mismatch"] for r in ranks] == ["refused", "refused"]


def test_batch_level_estimators_see_the_global_batch(two_ranks):
    ranks, _ = two_ranks
    prompts, responses, _ = _batch()
    r = torch.tensor([float(len(x) % 3) for x in responses])
    lengths = torch.tensor([float(len(x)) for x in responses])
    groups = torch.arange(len(prompts)).div(4, rounding_mode="floor")
    expected = compute_advantages("reinforce_pp", r, lengths, groups)
    assert torch.equal(torch.cat([ranks[0]["advantages"], ranks[1]["advantages"]]), expected)


# ---------------------------------------------------------------------- pure helpers

def test_a_world_of_one_returns_its_inputs():
    world = parallel.SINGLE
    assert world.sum(3) == 3.0 and world.sum(1, 2) == (1.0, 2.0) and world.max(4) == 4.0
    assert world.any(False) is False and world.any(True, False) == (True, False)
    t = torch.arange(3)
    assert world.gather(t)[0] is t and world.local_part(t) is t
    assert world.share([1, 2, 3]) == [1, 2, 3] and world.split([1, 2]) == [1, 2]
    assert world.same_count([[0], [1, 2]]) == [[0], [1, 2]]
    assert world.broadcast_json({"a": 1}) == {"a": 1} and world.all_gather_json(5) == [5]


def test_whole_prompts_are_shared_and_splits_cover_everything():
    ranks = [parallel.World(rank=r, size=3) for r in range(3)]
    assert [w.share(list(range(6))) for w in ranks] == [[0, 1], [2, 3], [4, 5]]
    assert [w.split(list(range(7))) for w in ranks] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [w.split([0]) for w in ranks] == [[0], [], []]


def test_settings_that_do_not_fit_the_world_are_config_errors():
    world = parallel.World(rank=0, size=3)
    with pytest.raises(ConfigError, match="rollout.prompts_per_step"):
        parallel.check_config(world, load_config("tiny", ["rollout.prompts_per_step=4"]))
    with pytest.raises(ConfigError, match="algo.updates_per_batch"):
        parallel.check_config(world, load_config("tiny", ["rollout.prompts_per_step=3",
                                                          "rollout.samples_per_prompt=2",
                                                          "algo.updates_per_batch=3"]))
    with pytest.raises(ConfigError, match="trainer.parallel"):
        parallel.wrap(torch.nn.Linear(1, 1), world, "zero3")


def test_a_pinned_gpu_under_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="model.device"):
        parallel.init("cuda:1")


# ---------------------------------------------------------------------- torchrun end to end

def _torchrun(args: list[str], cwd: Path) -> str:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "opo", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.startswith("time_") or "seconds" in k)} for r in rows]


def _torchrun_run(micro_model_dir, cwd: Path, kind: str) -> tuple[Path, str]:
    """Two steps of the micro model under torchrun with 2 processes, checkpointing each step,
    in the default (timestamped) run folder under cwd/runs."""
    overrides = micro_overrides(micro_model_dir, "", **{
        "trainer.steps": 2, "trainer.eval_every": 1, "checkpoint.every": 1, "checkpoint.keep": 2,
        "trainer.parallel": kind, "metrics.kl_probe_size": 4, "data.eval_size": 6,
        "algo.max_tokens_per_micro_batch": 40, "reward.kind": "reward_fns:even_length",
        "reward.isolate": "never"})
    out = _torchrun([o for o in overrides if not o.startswith("run.dir=")], cwd=cwd)
    (run,) = (cwd / "runs").iterdir()  # exactly one run folder, though each rank computed a name
    assert out.count("data: ") == 1  # rank 0 alone reports
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["grad_norm"] > 0
    state = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng_other_ranks"]) == 1
    return run, out


@pytest.mark.slow
def test_torchrun_fsdp2_run_resumes_exactly(micro_model_dir, tmp_path):
    from safetensors.torch import load_file

    from opo import checkpoint as ckpt
    from opo.models import load_policy

    run, _ = _torchrun_run(micro_model_dir, tmp_path, "fsdp")
    single, _ = load_policy(str(micro_model_dir), device="cpu")  # FSDP2's checkpoint loads in one process
    ckpt.load_checkpoint(run / "checkpoints" / "step_2", model=single,
                         optimizer=torch.optim.AdamW(single.parameters()))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(single.state_dict()[k], v) for k, v in final.items())
    # Back to step 1 (as if killed after its checkpoint), then resume: step 2 must replay exactly.
    replay = tmp_path / "replay"
    shutil.copytree(run, replay)
    shutil.rmtree(replay / "checkpoints" / "step_2")
    shutil.rmtree(replay / "final")
    (replay / "summary.json").unlink()
    out = _torchrun(["--resume", str(replay)], cwd=tmp_path)
    assert "resumed" in out and "at step 1" in out
    assert _rows(replay) == _rows(run)
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(replay / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_ddp_run_continues_in_one_process(micro_model_dir, tmp_path, capsys):
    from opo.cli import main

    run, _ = _torchrun_run(micro_model_dir, tmp_path, "ddp")
    assert main(["train", "--resume", str(run), "trainer.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "written by 2 process(es)" in out
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3]


def _launch(args: list[str], cwd: Path, *, restarts: int = 0, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "opo", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_failed_checkpoint_write_on_rank_0_stops_every_rank_with_its_message(micro_model_dir, tmp_path):
    import time

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint folder should be")
    overrides = micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 3, "checkpoint.every": 1, "trainer.eval_every": 0, "reward.kind": "reward_fns:even_length",
        "reward.isolate": "never", "trainer.collective_timeout_minutes": 5})
    started = time.monotonic()
    proc = _launch(overrides, tmp_path, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("opo: error: could not write the checkpoint for step 1") == 2, out[-3000:]  # both ranks
    assert time.monotonic() - started < 120  # not left waiting for the 5-minute collective timeout


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_is_killed_and_ends_with_the_uninterrupted_weights(micro_model_dir, tmp_path):
    from safetensors.torch import load_file

    def overrides(run):
        return micro_overrides(micro_model_dir, run, **{
            "trainer.steps": 4, "checkpoint.every": 2, "trainer.eval_every": 0, "data.eval_size": 6,
            "metrics.kl_probe_size": 4, "reward.kind": "reward_fns:even_length_rank1_dies",
            "reward.isolate": "never"})

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _launch(overrides(straight), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 1 SIGKILLs itself in step 3, once step 2's checkpoint exists; torchrun restarts both.
    proc = _launch(overrides(killed), tmp_path, restarts=1,
                   env={"OPO_TEST_DIE_AFTER": str(killed / "checkpoints" / "step_2")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun restart 1: resuming" in out and "resumed" in out, out[-3000:]
    assert _rows(killed) == _rows(straight)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

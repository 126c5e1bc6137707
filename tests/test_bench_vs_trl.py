"""The pure helpers of benchmarks/bench_vs_trl.py (the benchmark itself is never a test)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: its sibling modules import
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "benchmarks" / "bench_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_vs_trl", None)
    sys.path.remove(str(ROOT / "benchmarks"))


def test_parse_choices_aliases_order_and_errors(bench):
    assert bench.parse_choices("bf16, float32,fp32", bench.DTYPE_ALIASES, "--dtypes") == ["bf16", "fp32"]
    assert bench.parse_choices("tiny,smollm2", list(bench.WORKLOADS), "--models") == ["tiny", "smollm2"]
    with pytest.raises(ValueError, match="'fp16' is not allowed"):
        bench.parse_choices("fp32,fp16", bench.DTYPE_ALIASES, "--dtypes")
    with pytest.raises(ValueError, match="at least one"):
        bench.parse_choices(" , ", list(bench.WORKLOADS), "--models")


def test_argument_parsing_defaults_and_checks(bench):
    args = bench.build_parser().parse_args([])
    bench.check_args(args)
    assert args.model_list == ["smollm2", "tiny"] and args.dtype_list is None  # auto
    assert args.steps >= 4 and args.warmup == 1 and args.only == "both"
    args = bench.build_parser().parse_args(["--models", "tiny", "--dtypes", "fp32", "--steps", "2",
                                            "--opo-set", "algo.micro_batch_size=8", "--opo-set", "a.b=1"])
    bench.check_args(args)
    assert args.model_list == ["tiny"] and args.dtype_list == ["fp32"] and args.steps == 2
    assert args.opo_set == ["algo.micro_batch_size=8", "a.b=1"]
    for bad in (["--steps", "0"], ["--threads", "-1"], ["--models", "llama"]):
        with pytest.raises(ValueError):
            bench.check_args(bench.build_parser().parse_args(bad))
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only", "vllm"])


def test_timed_slice_skips_warmup_and_tail(bench):
    # 1 warm-up, 4 timed, 1 tail step (opo evaluates at its last step)
    steps = [50.0, 10.0, 12.0, 11.0, 13.0, 30.0]
    assert bench.timed_slice(steps, 1, 4) == [10.0, 12.0, 11.0, 13.0]
    assert bench.median(bench.timed_slice(steps, 1, 4)) == 11.5
    with pytest.raises(ValueError, match="at least 6 steps"):
        bench.timed_slice(steps[:4], 2, 4)


def test_median_ratio_and_the_last_line(bench):
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        bench.median([])
    assert bench.ratio(39.1, 31.5) == pytest.approx(1.2413, abs=1e-4)
    assert bench.ratio(1.0, 0.0) is None and bench.ratio(None, 2.0) is None
    assert bench.ratio_line(39.1 / 31.5, 11.7 / 8.5) == "speedup_vs_trl: 1.24 peak_rss_ratio: 1.38"
    assert bench.ratio_line(3.0, 0.995) == "speedup_vs_trl: 3.00 peak_rss_ratio: 0.99"


def test_flop_and_ceiling_arithmetic(bench):
    n = 134_515_008  # SmolLM2-135M
    # 4 prompts x 8 samples: 32 x 40 prompt tokens + 32 x 33 response tokens = 2336 trained tokens
    assert bench.training_flops(n, 2336) == pytest.approx(6 * n * 2336)
    assert bench.training_flops(n, 2336) / 1e12 == pytest.approx(1.885, abs=1e-3)
    assert bench.generation_flops(n, 1280, 1056) == pytest.approx(2 * n * 2336)
    # 538 MB of fp32 weights at 10 GB/s: 18.6 decode steps/s, x 32 rows
    assert bench.bandwidth_ceiling_tokens_per_s(10.0, 4 * n, 32) == pytest.approx(32 * 10e9 / (4 * n))
    assert bench.bandwidth_ceiling_tokens_per_s(10.0, 4 * n, 32) == pytest.approx(594.7, abs=0.1)
    assert bench.compute_ceiling_tokens_per_s(100.0, n) == pytest.approx(100e9 / (2 * n))


def test_classify_phase(bench):
    assert bench.classify_phase("time_generate") == "generation"
    assert bench.classify_phase("time_rollout") == "generation"
    assert bench.classify_phase("time_reward") == "reward"
    assert bench.classify_phase("time_backward") == "training"
    assert bench.classify_phase("time_optimizer") == "training"
    assert bench.classify_phase("time_logprob_forward") == "training"
    assert bench.classify_phase("time_kl_probe") == "other"
    assert bench.classify_phase("eval_seconds") == "other"
    assert bench.classify_phase("time_metrics") == "other"


def test_trl_phases_do_not_overlap(bench):
    # TRL's records for two steps: (name, 1-based step, seconds); the logps timer sits inside
    # compute_loss and must not be counted twice.
    records = [("_prepare_inputs", 1, 6.0), ("transformers.generate", 1, 5.0), ("_calculate_rewards", 1, 0.5),
               ("compute_loss", 1, 2.0), ("_get_per_token_logps_and_entropies", 1, 1.9),
               ("_prepare_inputs", 2, 7.0), ("transformers.generate", 2, 6.0), ("_calculate_rewards", 2, 0.25),
               ("compute_loss", 2, 3.0)]
    phases = bench.trl_phase_series([12.0, 14.0], records)
    kinds = {name: kind for name, (_, kind) in phases.items()}
    assert sorted(kinds.values()) == ["generation", "other", "reward", "training", "training"]
    total = [sum(series[i] for series, _ in phases.values()) for i in range(2)]
    assert total == pytest.approx([12.0, 14.0])  # the phases add up to the step, nothing twice
    backward = next(s for name, (s, _) in phases.items() if name.startswith("backward"))
    assert backward == pytest.approx([4.0, 4.0])
    assert bench.trl_phase_series([1.0], [("transformers.generate", 1, 0.5)]) == {}


def test_summarise_opo_rows(bench):
    rows = [{"seconds": s, "response_length_mean": length, "time_generate": g, "time_backward": b}
            for s, length, g, b in [(30, 20, 20, 9), (10, 30, 6, 3), (12, 34, 7, 4), (11, 32, 6.5, 3.5),
                                    (13, 36, 8, 4), (40, 30, 7, 4)]]
    out = bench.summarise({"side": "opo", "rows": rows}, warmup=1, timed=4,
                          prompt_tokens_per_step=[1280] * 6, sequences_per_step=32)
    assert out["median_s"] == 11.5
    assert out["mean_length"] == pytest.approx(33.0)
    assert out["generated_tokens"] == pytest.approx(33.0 * 32)
    assert out["gen_tokens_per_s"] == pytest.approx(33.0 * 32 * 4 / 46)
    assert out["phases"]["time_generate"] == {"seconds": 6.75, "kind": "generation"}
    assert out["phases"]["time_backward"] == {"seconds": 3.75, "kind": "training"}


def test_auto_dtypes(bench):
    slow = {"fp32_peak": 40.0, "bf16_peak": 0.6}
    fast = {"fp32_peak": 350.0, "bf16_peak": 2000.0}
    assert bench.auto_dtypes(slow, "avx2")[0] == ["fp32"]
    assert bench.auto_dtypes(fast, "avx2, avx512f, amx_bf16")[0] == ["fp32", "bf16"]
    assert bench.auto_dtypes(None, "avx2, avx512f, avx512_bf16")[0] == ["fp32", "bf16"]
    assert "skipped" in bench.auto_dtypes(None, "avx2")[1]


def test_opo_config_matches_the_workload(bench, tmp_path):
    from opo.config import from_dict

    problems = tmp_path / "p.jsonl"  # the config checks that a data file exists
    problems.write_text('{"question": "1+1=", "answer": "2"}\n')
    spec = {"model_key": "tiny", "out_dir": "/tmp/x", "model_dir": "/m", "dtype": "bf16", "problems": str(problems),
            "seed": 3, "template": "plain", "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 64,
            "lr": 1e-6, "total_steps": 6, "threads": 2}
    data = bench.opo_config(spec)
    cfg = from_dict(json.loads(json.dumps(data)))  # every key must exist in opo's config
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.max_new_tokens == 64 and cfg.optim.lr == 1e-6
    assert cfg.algo.updates_per_batch == 1 and cfg.algo.kl_coef == 0 and cfg.metrics.kl_probe_size == 0
    assert cfg.trainer.eval_every == 0 and cfg.rollout.top_p == 1.0 and cfg.rollout.temperature == 1.0
    assert cfg.reward.kind == "exact_match" and cfg.prompt.instruction == ""


def test_planned_prompt_order_is_what_opo_draws(bench, tmp_path):
    """The order handed to TRL is the one opo's split and sampler give for the same file."""
    from opo.config import DataConfig
    from opo.data import PromptSampler, load_examples

    wl = bench.WORKLOADS["tiny"]
    path, order = bench.prepare_prompts(wl, total_steps=3, prompts_per_step=4, seed=7, folder=tmp_path)
    assert len(order) == 12
    train, held_out = load_examples(DataConfig(source=str(path), train_size=0, eval_size=bench.EVAL_SIZE, seed=7))
    sampler = PromptSampler(len(train), 7)
    drawn = [train[i]["question"] for _ in range(3) for i in sampler.next_batch(4)]
    assert [ex["question"] for ex in order] == drawn
    assert not {ex["question"] for ex in order} & {ex["question"] for ex in held_out}


def test_prompt_ids_agree_for_plain_prompts(bench):
    from opo.tasks.addition import build_tokenizer

    tok = build_tokenizer()
    questions = ["12+34=", "905+118="]
    assert bench.prompt_token_ids(tok, questions, "plain") == bench.trl_prompt_token_ids(tok, questions, "plain")


def test_missing_trl_is_reported_with_the_install_line(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert bench.main(["--models", "tiny", "--dtypes", "fp32"]) == 3
    err = capsys.readouterr().err
    assert 'pip install -e ".[bench]"' in err and "--only opo" in err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_launcher_keeps_this_process_peak_out_of_the_child(bench):
    """A child's ru_maxrss must not include the memory peak of the process that started it."""
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 300 MB resident here
    launcher = bench.Launcher()
    try:
        done = launcher.run([sys.executable, "-c", "pass"], Path(os.devnull), dict(os.environ))
    finally:
        launcher.close()
        del ballast
    assert done["exit"] == 0
    assert done["maxrss_kb"] * 1024 < 100 * 2**20  # an empty interpreter, not 300 MB
    assert done["launcher_vmhwm_kb"] * 1024 < 100 * 2**20


def test_executed_flops_count_shared_prompts_once_and_trl_recomputation(bench):
    summary = {"prompt_tokens": 800.0, "generated_tokens": 200.0}
    n = 1000
    # opo passes each of the 100 distinct prompt tokens once for its 8 responses.
    assert bench.executed_training_flops("opo", n, summary, 8, True) == 6 * n * (100 + 200)
    # TRL runs every row's prompt, and gradient checkpointing adds a forward (8 N per token).
    assert bench.executed_training_flops("trl", n, summary, 8, True) == 8 * n * 1000
    assert bench.executed_training_flops("trl", n, summary, 8, False) == 6 * n * 1000


def _pair(dtype, seed, trl, opo):
    """A pair record as run_pair returns it; trl / opo: (median s, tokens a timed step, mean
    response, peak RSS GiB) or None for a side that did not run."""
    results = {}
    for side, figures in (("trl", trl), ("opo", opo)):
        if figures is None:
            results[side] = {"error": "did not run"}
            continue
        med, tokens, length, rss = figures
        results[side] = {"peak_rss_bytes": rss * 2**30,
                         "summary": {"median_s": med, "step_seconds": [med] * 4, "generated_tokens": tokens,
                                     "gen_tokens_per_s": tokens / med, "mean_length": length}}
    return {"model": "smollm2", "dtype": dtype, "seed": seed, "results": results}


def test_summary_gives_each_dtype_and_bf16_against_fp32(bench, capsys):
    pairs = [_pair("fp32", 0, (38.36, 900.0, 30.0, 8.0), (12.66, 982.4, 30.7, 5.36)),
             _pair("bf16", 0, (22.86, 900.0, 30.0, 6.0), (8.76, 1184.0, 37.0, 5.04))]
    rows = bench.print_dtype_summary(pairs)
    out = capsys.readouterr().out
    assert "smollm2 fp32: speed-up vs TRL per step 3.03x, per generated token 3.31x, peak RSS opo/TRL 0.67" in out
    assert "smollm2 bf16: speed-up vs TRL per step 2.61x" in out
    assert ("opo bf16 against opo fp32: per step 12.66 / 8.76 s = 1.45x; per generated token "
            "135.2 / 77.6 tokens/s = 1.74x (mean response 37.0 tokens in bf16, 30.7 in fp32)") in out
    assert "seed" not in out  # one seed: no per-seed lines
    assert rows[("smollm2", "fp32")]["speedup"] == pytest.approx(38.36 / 12.66)


def test_seeds_are_parsed_and_pooled(bench, capsys):
    args = bench.build_parser().parse_args(["--seeds", "0, 2,1"])
    bench.check_args(args)
    assert args.seed_list == [0, 2, 1]
    args = bench.build_parser().parse_args(["--seed", "5"])
    bench.check_args(args)
    assert args.seed_list == [5]
    for bad in ("1,1", "a", "-1", "1,,2"):
        with pytest.raises(ValueError, match="--seeds"):
            bench.check_args(bench.build_parser().parse_args(["--seeds", bad]))
    # Two seeds: one with short responses (fast steps), one with long ones.
    pairs = [_pair("fp32", 0, (40.0, 800.0, 25.0, 8.0), (10.0, 800.0, 25.0, 5.0)),
             _pair("bf16", 0, (24.0, 800.0, 25.0, 6.0), (6.0, 800.0, 25.0, 4.2)),
             _pair("fp32", 1, (50.0, 1200.0, 37.5, 8.0), (14.0, 1200.0, 37.5, 5.6)),
             _pair("bf16", 1, (30.0, 1200.0, 37.5, 6.0), (10.0, 1200.0, 37.5, 4.2))]
    rows = bench.print_dtype_summary(pairs)
    out = capsys.readouterr().out
    fp32 = rows[("smollm2", "fp32")]
    assert fp32["seeds"] == [0, 1]
    assert fp32["speedup"] == pytest.approx(45.0 / 12.0)  # mean medians: TRL 45, opo 12
    # tokens/s over all timed steps: opo 8000 tokens in 96 s, TRL 8000 in 360 s
    assert fp32["token_speedup"] == pytest.approx((8000 / 96) / (8000 / 360))
    assert fp32["rss_ratio"] == pytest.approx(0.7)  # the larger of 5/8 and 5.6/8
    assert "smollm2 fp32 (seed 0): speed-up vs TRL per step 4.00x" in out
    assert "smollm2 fp32 (seed 1): speed-up vs TRL per step 3.57x" in out
    assert "smollm2 fp32 (seeds 0,1 pooled): speed-up vs TRL per step 3.75x" in out
    assert "opo bf16 against opo fp32 (seed 0): per step 10.00 / 6.00 s = 1.67x" in out
    assert "opo bf16 against opo fp32 (seeds 0,1 pooled): per step 12.00 / 8.00 s = 1.50x" in out
    # A side missing for one seed: no pooled ratio for that dtype.
    pairs[3]["results"]["trl"] = {"error": "did not run"}
    assert bench.pool(pairs)[("smollm2", "bf16")]["speedup"] is None
    assert bench.pool(pairs)[("smollm2", "fp32")]["speedup"] == pytest.approx(45.0 / 12.0)

"""Rollout engines side by side: generation speed, and a whole training step with each.

    python benchmarks/bench_engines.py [--engines fast,hf,vllm] [--batches 32,64] [--dtypes float32]
                                       [--new-tokens 64] [--repeats 3] [--train-steps 4]

`fast-unfused` is the `fast` engine with rollout.fused_decode=false (transformers' forward
at every decode step), to see what the fused step buys.

`generate`: for each engine, dtype and batch size (sequences: batch/8 prompts x 8 samples),
the same SmolLM2 prompts (the smollm2 preset's chain_sum questions, chat template), one
warm-up call and then `--repeats` timed calls; it prints generated tokens per second (the
median call) and the mean response length. `train`: `opo train smollm2` for
`--train-steps` steps with each engine and dtype, evaluation and the KL probe off; it
prints the median seconds per step after the first, the generate phase's share, and the
largest per-step sampler/trainer log-prob mismatch.

Every engine runs in a process of its own (vLLM builds one engine per process), one after
the other, so run it on an otherwise quiet machine: timings taken beside other work on
the same cores are not comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

MODEL = "smollm2-135m-instruct"
K = 8
# Engine names this script takes beyond rollout.engine's own: name -> (engine, extra overrides).
VARIANTS = {"fast-unfused": ("fast", ["rollout.fused_decode=false"])}


def engine_overrides(name: str) -> list[str]:
    engine, extra = VARIANTS.get(name, (name, []))
    return [f"rollout.engine={engine}", *extra]


def child_generate(spec: dict) -> dict:
    """One engine, one dtype: tokens/s at each batch size on the same prompts."""
    import torch

    from opo.config import load_config
    from opo.data import encode_prompts, load_split
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.rollout import SamplingParams, engine_from_config

    torch.set_num_threads(spec["threads"])
    cfg = load_config("smollm2", [*engine_overrides(spec["engine"]), f"model.dtype={spec['dtype']}",
                                  "rollout.vllm.enforce_eager=true"])
    precision = Precision.from_config(cfg.model, torch.device("cpu"))
    model, tok = load_policy(cfg.model.path, precision.param_dtype, "cpu")
    engine = engine_from_config(cfg, model, tok, log=lambda *a: None)
    questions = [ex["question"] for ex in load_split(cfg.data).train]
    out = {}
    for batch in spec["batches"]:
        prompts = encode_prompts(tok, questions[:batch // K], cfg.prompt)[1]
        params = SamplingParams(n=K, temperature=1.0, max_new_tokens=spec["new_tokens"])
        rates, lengths = [], []
        for call in range(1 + spec["repeats"]):
            torch.manual_seed(call)
            t0 = time.perf_counter()
            with precision.autocast():  # as the trainer calls an engine
                result = engine.generate(prompts, params)
            seconds = time.perf_counter() - t0
            if call:  # the first call warms caches and kernels
                rates.append(sum(result.lengths) / seconds)
                lengths.append(statistics.mean(result.lengths))
        out[str(batch)] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_range": [min(rates), max(rates)],
                           "mean_length": statistics.mean(lengths)}
    return out


def child_train(spec: dict) -> dict:
    """`opo train smollm2` with one engine and dtype; per-step figures from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "opo.cli", "train", "smollm2", f"run.dir={run}",
               *engine_overrides(spec["engine"]), f"model.dtype={spec['dtype']}",
               f"trainer.steps={spec['steps']}", "trainer.eval_every=0", "metrics.kl_probe_size=0",
               "checkpoint.every=0", "trainer.progress=false", f"trainer.threads={spec['threads']}",
               "rollout.vllm.enforce_eager=true", "algo.max_logp_mismatch=0", "algo.max_mismatch_kl=0"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "seconds" in r and "reward_mean" in r][1:]  # the first step warms up
    return {"seconds_per_step": statistics.median(r["seconds"] for r in steps),
            "generate_share": statistics.mean(r["time_generate"] / r["seconds"] for r in steps),
            "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
            "mismatch_max": max(r["logp_mismatch_max"] for r in steps),
            "mismatch_mean": statistics.mean(r["logp_mismatch_mean"] for r in steps)}


def run_child(kind: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stdout + proc.stderr)[-1500:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="fast,hf,vllm")
    parser.add_argument("--batches", default="32,64", help="sequences per generate call")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=4, help="0 skips the training runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        result = (child_generate if kind == "generate" else child_train)(json.loads(spec))
        print("RESULT " + json.dumps(result))
        return
    engines, dtypes = args.engines.split(","), args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {cpu_name()}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}; model {MODEL}")
    print(f"\ngenerate: {K} samples per prompt, T=1, at most {args.new_tokens} new tokens, "
          f"median of {args.repeats} calls after a warm-up")
    print("| engine | dtype | batch | tokens/s | range | mean response length |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for engine in engines:
            result = run_child("generate", {"engine": engine, "dtype": dtype, "batches": batches,
                                            "new_tokens": args.new_tokens, "repeats": args.repeats,
                                            "threads": args.threads})
            for batch in batches:
                r = result.get(str(batch))
                if r is None:
                    print(f"| {engine} | {dtype} | {batch} | failed: {result.get('error', '')[-300:]!r} | | |")
                    continue
                lo, hi = r["tokens_per_s_range"]
                print(f"| {engine} | {dtype} | {batch} | {r['tokens_per_s']:.0f} | {lo:.0f}-{hi:.0f} | "
                      f"{r['mean_length']:.1f} |")
    if not args.train_steps:
        return
    print(f"\ntrain: opo train smollm2 (8 prompts x 8, <= 32 tokens), {args.train_steps} steps, "
          f"median s/step after the first")
    print("| engine | dtype | s/step | generate share | tokens/step | mismatch max | mismatch mean |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for engine in engines:
            r = run_child("train", {"engine": engine, "dtype": dtype, "steps": args.train_steps,
                                    "threads": args.threads})
            if "error" in r:
                print(f"| {engine} | {dtype} | failed: {r['error'][-300:]!r} | | | | |")
                continue
            print(f"| {engine} | {dtype} | {r['seconds_per_step']:.2f} | {r['generate_share']:.0%} | "
                  f"{r['tokens_per_step']:.0f} | {r['mismatch_max']:.2g} | {r['mismatch_mean']:.2g} |")


if __name__ == "__main__":
    main()

"""Which per-step statistic tells low-precision noise from a real change of distribution?

    python benchmarks/bench_onpolicy_check.py [--preset tiny] [--steps 5] [--seeds 1]
                                              [--cases fp32,bf16,...] [--kv-cache-gb 0.1]

Each case runs `opo train` on the preset for a few steps with the mismatch check off
and prints, over steps 2.., the largest `logp_mismatch_max`, the mean `logp_mismatch_mean` and
the mean `mismatch_kl` (k3 estimate of KL(sampler || trainer) per token); with several
seeds (`trainer.seed`), the lowest and highest of each over the seeds. Cases:
  fp32, bf16, fp16          the fast engine, exactly as configured (noise only)
  fp32-temp, bf16-temp      the trainer scores at 1.05x the sampling temperature (a real change)
  vllm-fp32, vllm-bf16      vLLM with its weight push after every step
  vllm-fp32-stale, vllm-bf16-stale   the push skipped: vLLM keeps sampling the step-0 weights
Each case is a process of its own (vLLM builds one engine per process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "fp32": ("float32", "fast", ""),
    "bf16": ("bfloat16", "fast", ""),
    "fp16": ("float16", "fast", ""),
    "fp32-temp": ("float32", "fast", "import opo.update as u; from opo.sequences import Dist; "
                  "u.sampling_dist = lambda cfg: Dist(cfg.rollout.temperature * 1.05, cfg.rollout.top_p, "
                  "cfg.rollout.top_k); "),
    "bf16-temp": ("bfloat16", "fast", "import opo.update as u; from opo.sequences import Dist; "
                  "u.sampling_dist = lambda cfg: Dist(cfg.rollout.temperature * 1.05, cfg.rollout.top_p, "
                  "cfg.rollout.top_k); "),
    "vllm-fp32": ("float32", "vllm", ""),
    "vllm-bf16": ("bfloat16", "vllm", ""),
    "vllm-fp32-stale": ("float32", "vllm", "from opo.rollout.vllm import VLLMEngine; VLLMEngine.sync_weights = "
                        "lambda self, model, version: setattr(self, 'policy_version', version); "),
    "vllm-bf16-stale": ("bfloat16", "vllm", "from opo.rollout.vllm import VLLMEngine; VLLMEngine.sync_weights = "
                        "lambda self, model, version: setattr(self, 'policy_version', version); "),
}


def run_case(name: str, steps: int, preset: str = "tiny", seed: int = 0, kv_cache_gb: float = 0.1) -> dict:
    dtype, engine, patch = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = ["train", preset, f"run.dir={run}", f"trainer.seed={seed}", f"model.dtype={dtype}", f"rollout.engine={engine}",
                f"trainer.steps={steps}", "trainer.eval_every=0", "data.eval_size=8", "checkpoint.every=0",
                "trainer.progress=false", "algo.max_logp_mismatch=0", "algo.max_mismatch_kl=0", "rollout.vllm.enforce_eager=true",
                f"rollout.vllm.kv_cache_gb={kv_cache_gb}"]
        code = patch + "import sys; from opo.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stdout + proc.stderr)[-800:]}
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in x]
    later = rows[1:]  # step 1 samples the weights it is scored with, stale or not
    return {"max": max(r["logp_mismatch_max"] for r in later),
            "mean": statistics.mean(r["logp_mismatch_mean"] for r in later),
            "kl": statistics.mean(r["mismatch_kl"] for r in later)}


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if lo == hi or len(values) == 1 else f"{lo:.3g} - {hi:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1, help="trainer.seed 0..N-1 for every case")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--kv-cache-gb", type=float, default=0.1,
                        help="rollout.vllm.kv_cache_gb (SmolLM2 needs 1: its 8k context must fit)")
    args = parser.parse_args()
    print(f"{args.preset} preset, {args.steps} steps per case, statistics over steps 2-{args.steps}, "
          f"seeds 0-{args.seeds - 1} (lowest - highest over seeds)")
    print("| case | logp_mismatch_max (largest) | logp_mismatch_mean (mean) | mismatch_kl (mean) |")
    print("|---|---|---|---|")
    for name in args.cases.split(","):
        results = [run_case(name, args.steps, args.preset, seed, args.kv_cache_gb) for seed in range(args.seeds)]
        failed = [r for r in results if "error" in r]
        if failed:
            print(f"| {name} | failed: {failed[0]['error'][-200:]!r} | | |", flush=True)
        else:
            print(f"| {name} | {_span([r['max'] for r in results])} | {_span([r['mean'] for r in results])} "
                  f"| {_span([r['kl'] for r in results])} |", flush=True)


if __name__ == "__main__":
    main()

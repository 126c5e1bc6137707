"""Where a fast-engine rollout of SmolLM2 spends its time.

    python benchmarks/bench_rollout.py [--dtypes float32,bfloat16] [--repeats 5]

One `generate` call of the `fast` engine on 4 of the smollm2 preset's prompts x 8 samples,
T = 1, 64 new tokens, with the stop tokens switched off so that every row runs all 64
steps (the work is then the same on every call and on every version of the code). Timers
around the engine's parts split each call into: building the fused decoder (weights cast
and packed), the prompt pass, the 63 decode steps, the 64 draws, and the rest (cache
set-up, reassembly). Prints the median over `--repeats` calls after one warm-up call.

To compare two versions of the code, run it twice with PYTHONPATH pointing at each
checkout (e.g. a `git worktree`), back to back on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from machine import kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)


def main() -> None:
    import opo.rollout.fast as fast
    import opo.rollout.fused as fused
    from opo.config import load_config
    from opo.data import encode_prompts, load_split
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.rollout import SamplingParams, engine_from_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = kernel_bench_args(parser, repeats=5)
    spent: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, part: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # an older checkout without this part
            return

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                spent[part] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    timed(fused.FusedDecoder, "__init__", "build")
    timed(fused.FusedDecoder, "prefill", "prompt pass")
    timed(fast.FastEngine, "_forward", "prompt pass")  # transformers' forward (unfused engines)
    timed(fused.FusedDecoder, "step", "decode steps")
    timed(fast, "sample", "draws")

    print("| dtype | call s | build | prompt pass | decode steps (ms each) | draws (ms each) | rest |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        cfg = load_config("smollm2", [f"model.dtype={dtype}"])
        precision = Precision.from_config(cfg.model, torch.device("cpu"))
        model, tok = load_policy(cfg.model.path, precision.param_dtype, "cpu")
        engine = engine_from_config(cfg, model, tok, log=lambda *a: None)
        engine.eos_ids = [-1]  # no token stops a row: every call makes all 64 steps
        questions = [ex["question"] for ex in load_split(cfg.data).train]
        prompts = encode_prompts(tok, questions[:4], cfg.prompt)[1]
        params = SamplingParams(n=8, temperature=1.0, max_new_tokens=64)
        calls = []
        for call in range(1 + args.repeats):
            spent.clear()
            torch.manual_seed(call)
            start = time.perf_counter()
            with precision.autocast():  # as the trainer calls an engine
                engine.generate(prompts, params)
            total = time.perf_counter() - start
            if call:  # the first call warms caches and kernels
                calls.append({"call": total, **spent, "rest": total - sum(spent.values())})
        med = {k: statistics.median(c.get(k, 0.0) for c in calls) for k in calls[0]}
        print(f"| {dtype} | {med['call']:.2f} | {med.get('build', 0):.3f} | {med.get('prompt pass', 0):.3f} "
              f"| {med.get('decode steps', 0):.2f} ({med.get('decode steps', 0) / 63 * 1e3:.1f}) "
              f"| {med.get('draws', 0):.3f} ({med.get('draws', 0) / 64 * 1e3:.2f}) | {med['rest']:.3f} |")


if __name__ == "__main__":
    main()

"""Scoring plus backward of one SmolLM2 rollout batch at several length-bucket costs.

    python benchmarks/bench_buckets.py [--overheads 32,64,96,160] [--repeats 3]

`opo.sequences.length_buckets` splits a micro-batch's responses into buckets of similar
length, trading padding against one more decoder pass per bucket; its `overhead` is the
cost of a pass counted in padded tokens (opo uses 96 under bf16/fp16 autocast, 32 in
float32). This scores a fixed batch shaped like `bench_vs_trl`'s (4 prompts of 60 tokens x 8
responses of 5 to 64 tokens, random token ids) with log-probs and entropy, back-propagates
their sum, and prints seconds per call (best and median of `--repeats`)
for each overhead, in float32 and under bf16 autocast. Every overhead is run once per dtype
before any is timed: the first calls of a dtype are slower whichever overhead they use.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from machine import kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)

LENGTHS = [5, 9, 12, 14, 17, 18, 20, 22, 23, 25, 26, 27, 28, 29, 30, 31,
           32, 33, 34, 35, 36, 38, 40, 42, 44, 46, 50, 55, 60, 64, 64, 64]


def main() -> None:
    import opo.sequences as sequences
    from opo.models import load_policy
    from opo.sequences import Dist, pack, score

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overheads", default="32,64,96,160")
    args = kernel_bench_args(parser, repeats=3)
    model, _ = load_policy("smollm2-135m-instruct", device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for i in range(4):
        prompt = torch.randint(100, 1000, (60,), generator=g).tolist()
        for k in range(8):
            prompts.append(prompt)
            responses.append(torch.randint(100, 1000, (LENGTHS[i * 8 + k],), generator=g).tolist())
    packed = pack(prompts, responses, 0)
    planner = sequences.length_buckets
    print("| dtype | overhead | buckets | s (best / median) |")
    print("|---|---|---|---|")
    overheads = [int(x) for x in args.overheads.split(",")]

    def timed(bf16: bool, overhead: int) -> float:
        sequences.length_buckets = lambda lengths, _ignored=0: planner(lengths, overhead)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp, _ = score(model, packed, Dist(), with_entropy=True)
        logp.sum().backward()
        return time.perf_counter() - start

    try:
        for bf16 in (False, True):
            for overhead in overheads:  # warm-up: the first calls of a dtype run slower, whatever the overhead
                timed(bf16, overhead)
            for overhead in overheads:
                times = [timed(bf16, overhead) for _ in range(args.repeats)]
                print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {overhead} "
                      f"| {len(planner(packed.response_lengths(), overhead))} "
                      f"| {min(times):.2f} / {statistics.median(times):.2f} |")
    finally:
        sequences.length_buckets = planner


if __name__ == "__main__":
    main()

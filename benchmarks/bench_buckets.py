"""Scoring plus backward of one SmolLM2 rollout batch: packed responses against length buckets.

    python benchmarks/bench_buckets.py [--overheads 32,64,96,160] [--repeats 3]

`opo.sequences` scores a micro-batch's responses either as one packed batch (`opo.packing`,
Llama-family decoders on a CPU; only attention is cut into length buckets) or as one
decoder pass per length bucket (every other model). `opo.sequences.length_buckets` plans
the buckets, trading padding against one more pass (or attention block); its `overhead`
is the cost of one in padded tokens (opo uses `opo.packing.BUCKET_OVERHEAD` for packed
responses; 96 under bf16/fp16 autocast and 32 in float32 for bucketed passes). This
scores a fixed batch shaped like `bench_vs_trl`'s (4 prompts of 60 tokens x 8 responses of
5 to 64 tokens, random token ids) with log-probs and entropy, back-propagates their sum,
and prints seconds per call (best and median of `--repeats`) for each path and overhead, in
float32 and under bf16 autocast. Every setting of a dtype runs once before any is timed
(the first calls of a dtype are slower whichever setting they use), then the settings take
turns, `--repeats` rounds.
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
    import opo.packing as packing
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
    planner, can_pack = sequences.length_buckets, packing.unsupported_reason
    print("| dtype | responses | overhead | buckets | s (best / median) |")
    print("|---|---|---|---|---|")
    overheads = [int(x) for x in args.overheads.split(",")]

    def timed(bf16: bool, path: str, overhead: int) -> float:
        sequences.length_buckets = lambda lengths, _ignored=0: planner(lengths, overhead)
        # The bucketed passes are what a model opo.packing does not take gets.
        packing.unsupported_reason = (lambda _model: "timing the bucketed passes") if path == "buckets" else can_pack
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp, _ = score(model, packed, Dist(), with_entropy=True)
        logp.sum().backward()
        return time.perf_counter() - start

    assert can_pack(model) is None, can_pack(model)
    settings = [(path, overhead) for path in ("packed", "buckets") for overhead in overheads]
    try:
        for bf16 in (False, True):
            for path, overhead in settings:  # warm-up: the first calls of a dtype run slower, whatever the setting
                timed(bf16, path, overhead)
            # Round robin, so that the machine's drift over the run touches every setting alike.
            times = {setting: [] for setting in settings}
            for _ in range(args.repeats):
                for path, overhead in settings:
                    times[path, overhead].append(timed(bf16, path, overhead))
            for (path, overhead), runs in times.items():
                print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {path} | {overhead} "
                      f"| {len(planner(packed.response_lengths(), overhead))} "
                      f"| {min(runs):.2f} / {statistics.median(runs):.2f} |")
    finally:
        sequences.length_buckets = planner
        packing.unsupported_reason = can_pack


if __name__ == "__main__":
    main()

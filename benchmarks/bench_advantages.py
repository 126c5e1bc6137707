"""Time the vectorised `opo` estimator against a per-sample Python loop (verl's style).

    python benchmarks/bench_advantages.py [--responses 4096] [--group 8] [--repeats 20]

Prints milliseconds per call for both, and checks that they agree.
"""

import argparse
import time

import torch

from opo.advantages import compute_advantages


def loop_reference(rewards, lengths, group_ids):
    """One Python pass per sample, as reference implementations do."""
    sums, weights, counts = {}, {}, {}
    for r, l, g in zip(rewards.tolist(), lengths.tolist(), group_ids.tolist()):
        sums[g] = sums.get(g, 0.0) + l * r
        weights[g] = weights.get(g, 0.0) + l
        counts[g] = counts.get(g, 0) + 1
    out = []
    for r, g in zip(rewards.tolist(), group_ids.tolist()):
        out.append(r - (sums[g] / weights[g] if counts[g] > 1 else 0.0))
    return torch.tensor(out)


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - start) / repeats * 1e3, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=4096)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (args.responses,), generator=g).float()
    lengths = torch.randint(1, 1024, (args.responses,), generator=g).float()
    groups = torch.arange(args.responses) // args.group
    ms_vec, a = timed(lambda: compute_advantages("opo", rewards, lengths, groups), args.repeats)
    ms_loop, b = timed(lambda: loop_reference(rewards, lengths, groups), args.repeats)
    assert torch.allclose(a, b, atol=1e-5)
    print(f"responses={args.responses} group={args.group} threads={torch.get_num_threads()}")
    print(f"vectorised opo: {ms_vec:.3f} ms/call")
    print(f"python loop:    {ms_loop:.3f} ms/call")
    print(f"speed-up:       {ms_loop / ms_vec:.1f}x")


if __name__ == "__main__":
    main()

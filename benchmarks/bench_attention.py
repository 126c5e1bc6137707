"""SDPA forward and backward on a CPU, bf16 against float32 inputs, at SmolLM2's shapes.

    python benchmarks/bench_attention.py [--repeats 10]

A SmolLM2-135M layer attends with 9 query heads over 3 key/value heads of 64 dimensions.
During scoring, a length bucket of `rows` responses of `tokens` tokens attends to its own
tokens and to the shared prompt of `prompt` tokens, with a boolean mask. This times
`F.scaled_dot_product_attention` (enable_gqa, which picks the flash kernel on a CPU) on
such inputs in bf16, and on the same values in float32 as `opo.attention` runs them in a
bf16 training step (the casts included), and prints milliseconds per call, best of
`--repeats`, for the forward and for the backward.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

SHAPES = [(9, 29, 63), (4, 60, 63), (32, 20, 63), (11, 17, 63)]  # (rows, tokens, prompt)


def time_call(rows: int, tokens: int, prompt: int, as_float32: bool, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 9, tokens, 64, generator=g).bfloat16().requires_grad_()
    k = torch.randn(rows, 3, prompt + tokens, 64, generator=g).bfloat16().requires_grad_()
    v = torch.randn(rows, 3, prompt + tokens, 64, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(rows, 1, tokens, prompt + tokens, dtype=torch.bool).tril(prompt)
    best_f = best_b = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        args = (q.float(), k.float(), v.float()) if as_float32 else (q, k, v)
        out = F.scaled_dot_product_attention(*args, attn_mask=mask, enable_gqa=True).to(torch.bfloat16)
        mid = time.perf_counter()
        out.float().sum().backward()
        end = time.perf_counter()
        q.grad = k.grad = v.grad = None
        best_f, best_b = min(best_f, mid - start), min(best_b, end - mid)
    return best_f * 1e3, best_b * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}")
    print("| rows x tokens, prompt | bf16 fwd ms | bf16 bwd ms | float32 fwd ms | float32 bwd ms | bf16 / float32 (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for rows, tokens, prompt in SHAPES:
        bf_f, bf_b = time_call(rows, tokens, prompt, False, args.repeats)
        fp_f, fp_b = time_call(rows, tokens, prompt, True, args.repeats)
        print(f"| {rows} x {tokens}, {prompt} | {bf_f:.2f} | {bf_b:.2f} | {fp_f:.2f} | {fp_b:.2f} "
              f"| {(bf_f + bf_b) / (fp_f + fp_b):.2f}x |")


if __name__ == "__main__":
    main()

"""SDPA forward and backward on a CPU, bf16 against float32 inputs, at SmolLM2's shapes.

    python benchmarks/bench_attention.py [--repeats 10]

A SmolLM2-135M layer attends with 9 query heads over 3 key/value heads of 64 dimensions.
During scoring, a length bucket of `rows` responses of `tokens` tokens attends to its own
tokens and to the shared prompt of `prompt` tokens, with a boolean mask. This times
`F.scaled_dot_product_attention` (enable_gqa, which picks the flash kernel on a CPU) three
ways: on bf16 inputs, on the same values in float32 (casts included), and as
`opo.attention` runs it in a bf16 training step (the bf16 flash forward; the float32 flash
backward, given that forward's output and log-sum-exp). It prints milliseconds per call,
best of `--repeats`, for the forward and for the backward.

A second table times one decode step's attention (one new token per row over a cache of
`positions`), as the fused decode step calls it (opo/rollout/fused.py: each key/value
head's three query heads passed as its three query rows) and as `enable_gqa` with one query
row per head would, in bf16 and float32: microseconds per call, best of `--repeats` batches
of 50 calls.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from machine import call_times_ms, kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)

SHAPES = [(9, 29, 63), (4, 60, 63), (32, 20, 63), (11, 17, 63)]  # (rows, tokens, prompt)


def time_call(rows: int, tokens: int, prompt: int, way: str, repeats: int) -> tuple[float, float]:
    from opo.attention import float_backward_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 9, tokens, 64, generator=g).bfloat16().requires_grad_()
    k = torch.randn(rows, 3, prompt + tokens, 64, generator=g).bfloat16().requires_grad_()
    v = torch.randn(rows, 3, prompt + tokens, 64, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(rows, 1, tokens, prompt + tokens, dtype=torch.bool).tril(prompt)
    best_f = best_b = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        if way == "opo":
            out = float_backward_sdpa(torch.bfloat16, q, k, v, mask)
        else:
            args = (q.float(), k.float(), v.float()) if way == "float32" else (q, k, v)
            out = F.scaled_dot_product_attention(*args, attn_mask=mask, enable_gqa=True).to(torch.bfloat16)
        mid = time.perf_counter()
        out.float().sum().backward()
        end = time.perf_counter()
        q.grad = k.grad = v.grad = None
        best_f, best_b = min(best_f, mid - start), min(best_b, end - mid)
    return best_f * 1e3, best_b * 1e3


def time_decode(rows: int, positions: int, dtype, grouped: bool, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 9, 1, 64, generator=g).to(dtype)
    k = torch.randn(rows, 3, positions, 64, generator=g).to(dtype)
    v = torch.randn(rows, 3, positions, 64, generator=g).to(dtype)
    mask = torch.ones(rows, 1, 1, positions, dtype=torch.bool)
    mask[: rows // 4, :, :, : positions // 4] = False  # some left padding
    if grouped:
        call = lambda: F.scaled_dot_product_attention(q.reshape(rows, 3, 3, 64), k, v, attn_mask=mask)
    else:
        call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return min(call_times_ms(lambda: [call() for _ in range(50)], repeats)) / 50 * 1e3  # us per call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = kernel_bench_args(parser, repeats=10)
    print("| rows x tokens, prompt | bf16 fwd / bwd ms | float32 fwd / bwd ms | opo.attention fwd / bwd ms "
          "| bf16 / opo.attention (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for rows, tokens, prompt in SHAPES:
        (bf_f, bf_b), (fp_f, fp_b), (op_f, op_b) = (time_call(rows, tokens, prompt, way, args.repeats)
                                                    for way in ("bf16", "float32", "opo"))
        print(f"| {rows} x {tokens}, {prompt} | {bf_f:.2f} / {bf_b:.2f} | {fp_f:.2f} / {fp_b:.2f} "
              f"| {op_f:.2f} / {op_b:.2f} | {(bf_f + bf_b) / (op_f + op_b):.2f}x |")
    print()
    print("| decode: rows, positions | dtype | enable_gqa us | grouped rows us | ratio |")
    print("|---|---|---|---|---|")
    for rows, positions in ((32, 124), (8, 124)):
        for dtype in (torch.bfloat16, torch.float32):
            gqa, grouped = (time_decode(rows, positions, dtype, way, args.repeats) for way in (False, True))
            print(f"| {rows}, {positions} | {str(dtype).removeprefix('torch.')} | {gqa:.0f} | {grouped:.0f} "
                  f"| {gqa / grouped:.2f}x |")


if __name__ == "__main__":
    main()

"""The products of one decode step, plain against oneDNN-packed weights.

    python benchmarks/bench_decode.py [--rows 32,20,8] [--repeats 5]

One SmolLM2-135M decode step multiplies the step's rows by every weight of the model once:
per layer q/k/v fused (576 -> 960), o (576 -> 576), gate/up fused (576 -> 3072) and down
(1536 -> 576), 30 layers, then the output layer (576 -> 49152). Random weights of those
shapes (538 MB in fp32, 269 MB in bf16, so they stream from memory as in a real step) are
multiplied with `F.linear` and with the packed weights the fused decode step uses
(`opo/rollout/fused.py`, packed for 32 rows), at each row count. It prints milliseconds per
step (best of `--repeats`) and the ratio.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from machine import call_times_ms, kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (out, in)


def best_ms(fn, repeats: int) -> float:
    return min(call_times_ms(fn, repeats))


def main() -> None:
    from opo.rollout.fused import _Linear, _onednn_packs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32,20,8")
    args = kernel_bench_args(parser, repeats=5)
    print("| dtype | rows | plain ms/step | packed ms/step | plain / packed |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        if not _onednn_packs(dtype):
            print(f"| {dtype} | | | not packed on this CPU/build | |")
            continue
        linears = [_Linear(torch.randn(n, k), None, dtype, rows_hint=32) for n, k in SHAPES]
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = {k: torch.randn(rows, k).to(dtype) for k in (576, 1536)}
            plain = best_ms(lambda: [F.linear(inputs[m.weight.shape[1]], m.weight) for m in linears], args.repeats)
            packed = best_ms(lambda: [m(inputs[m.weight.shape[1]]) for m in linears], args.repeats)
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {plain:.1f} | {packed:.1f} | {plain / packed:.2f}x |")


if __name__ == "__main__":
    main()

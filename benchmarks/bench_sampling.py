"""One draw from SmolLM2-sized logits: `opo.sampling.sample` against a flat inverse CDF.

    python benchmarks/bench_sampling.py [--rows 32,8] [--repeats 50]

At every decode step the fast engine draws one token per row from logits [rows, 49152]
(SmolLM2's vocabulary) and returns its log-probability. `sample` finds the token in two
levels (sums of blocks of 256 probabilities, then one block's cumulative sum). The flat
version here is what it replaced: the probabilities' float64 cumulative sum over the whole
vocabulary and one search in it. Both are timed on the same random logits, bf16 (what the
fused decoder's output layer gives under bf16 autocast) and float32, T = 1, no top-k/top-p.
It prints milliseconds per draw (median of `--repeats`) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from machine import call_times_ms, kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)

VOCAB = 49152


def flat_draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat inverse-CDF draw (opo's sampler before the two-level one), T = 1."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    cdf = torch.exp(z - lse).double().cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64) * cdf[..., -1:]
    last = torch.searchsorted(cdf, cdf[..., -1:].contiguous(), right=False)
    tokens = torch.minimum(torch.searchsorted(cdf, u, right=True), last).squeeze(-1)
    return tokens, (z.gather(-1, tokens.unsqueeze(-1)) - lse).squeeze(-1)


def median_ms(fn, repeats: int) -> float:
    return statistics.median(call_times_ms(fn, repeats, warmup=5))


def main() -> None:
    from opo.sampling import sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32,8")
    args = kernel_bench_args(parser, repeats=50)
    print("| logits | rows | flat ms | two-level ms | flat / two-level |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (int(r) for r in args.rows.split(",")):
            logits = (torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
            flat = median_ms(lambda: flat_draw(logits), args.repeats)
            two = median_ms(lambda: sample(logits, 1.0), args.repeats)
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {flat:.2f} | {two:.2f} | {flat / two:.2f}x |")


if __name__ == "__main__":
    main()

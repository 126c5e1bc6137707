"""The output layer of a training step, plain logits against tiles (opo/output_layer.py).

    python benchmarks/bench_output_layer.py [--tokens 1000,4000] [--repeats 5]

Scores `--tokens` response tokens through SmolLM2-135M's output layer (hidden 576,
vocabulary 49152, random weights) the two ways `opo.sequences.score` can: the plain path
(the whole [tokens, vocabulary] logits, cast to float32, logsumexp and entropy, autograd's
backward) and `opo.output_layer.head_scores` (tiles only, recomputed in backward). Each
call computes log-probs and entropy, and a backward pass of a weighted sum of the log-probs
reaches the hidden states and the weight, as in a training step. fp32, and bf16 autocast
(fp32 weights, as opo trains). Prints seconds per call (best and median of `--repeats`), the
ratio, and the largest differences between the two.

The first call of each way is a warm-up, so this measures the steady state; in a real step
the plain path's 200 MB tensors also pay for fresh pages more often than here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from machine import kernel_bench_args  # noqa: E402  (benchmarks/machine.py, beside this script)

HIDDEN, VOCAB = 576, 49152


def plain(h, w, t):
    from opo import sampling

    return sampling.target_logprobs_and_entropy(torch.nn.functional.linear(h, w), t)


def tiled(h, w, t):
    from opo.output_layer import head_scores

    return head_scores(h, w, t, with_entropy=True)


def run_once(fn, h, w, t, coef, bf16: bool):
    h.grad = w.grad = None
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp, ent = fn(h, w, t)
    (logp * coef).sum().backward()
    return time.perf_counter() - start, logp.detach(), ent, h.grad, w.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1000,4000")
    args = kernel_bench_args(parser, repeats=5)
    print("| dtype | tokens | plain s (best / median) | tiled s (best / median) | plain / tiled (best) "
          "| max abs diff logp | rel diff grad weight |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).requires_grad_()
    for bf16 in (False, True):
        for n in (int(x) for x in args.tokens.split(",")):
            h = torch.randn(n, HIDDEN, generator=g).requires_grad_()
            t = torch.randint(0, VOCAB, (n,), generator=g)
            coef = torch.randn(n, generator=g) / n
            times, outs = {}, {}
            for name, fn in (("plain", plain), ("tiled", tiled)):
                run_once(fn, h, w, t, coef, bf16)  # warm-up
                runs = [run_once(fn, h, w, t, coef, bf16) for _ in range(args.repeats)]
                times[name] = [r[0] for r in runs]
                outs[name] = runs[-1][1:]
            (lp_a, _, _, gw_a), (lp_b, _, _, gw_b) = outs["plain"], outs["tiled"]
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {n} | {best['plain']:.3f} / {med['plain']:.3f} "
                  f"| {best['tiled']:.3f} / {med['tiled']:.3f} | {best['plain'] / best['tiled']:.2f}x "
                  f"| {(lp_a - lp_b).abs().max().item():.1e} | {((gw_a - gw_b).norm() / gw_a.norm()).item():.1e} |")


if __name__ == "__main__":
    main()

"""How far the fast engine's log-probs are from the trainer's, on fixed SmolLM2 rollouts.

    python benchmarks/bench_mismatch.py [--dtype bfloat16] [--rollouts 5] [--tokens 48]

Rollout r samples 8 responses to each of the smollm2 preset's prompts 4r..4r+3 (T = 1, at
most `--tokens` new tokens, torch seed r) with the `fast` engine, then scores the same
tokens with `opo.sequences.score` (the trainer's forward, no gradient) under the same
precision. It prints, over all response tokens of all rollouts, the mean and the largest
|log π_sampler − log π_trainer|: what a training step logs as `logp_mismatch_mean` and
`logp_mismatch_max`, here on the initial weights and without training.

Changes to the sampler or the trainer show up here first: run it once per checkout
(PYTHONPATH=<checkout>) on the same machine. The samples can differ between two versions
of the code (a different rounding can change a draw), so compare means over several
rollouts, not single tokens.
"""

from __future__ import annotations

import argparse

import torch

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)


def main() -> None:
    from opo.config import load_config
    from opo.data import encode_prompts, load_split
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.rollout import SamplingParams, engine_from_config
    from opo.sequences import Dist, pack, score

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rollouts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("smollm2", [f"model.dtype={args.dtype}"])
    precision = Precision.from_config(cfg.model, torch.device("cpu"))
    model, tok = load_policy(cfg.model.path, precision.param_dtype, "cpu")
    engine = engine_from_config(cfg, model, tok, log=lambda *a: None)
    questions = [ex["question"] for ex in load_split(cfg.data).train]
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=args.tokens)
    gaps = []
    for r in range(args.rollouts):
        prompts = encode_prompts(tok, questions[4 * r:4 * r + 4], cfg.prompt)[1]
        torch.manual_seed(r)
        with torch.no_grad(), precision.autocast():  # as the trainer samples and scores
            batch = engine.generate(prompts, params)
            packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
            trainer, _ = score(model, packed, Dist())
        real = packed.response_mask.bool()
        gaps.append((trainer[real] - packed.spread(batch.logprobs)[real]).abs())
    gap = torch.cat(gaps)
    print(f"machine: {cpu_name()}, {args.threads} threads; torch {torch.__version__}; SmolLM2, {args.dtype}, "
          f"{args.rollouts} rollouts of 4 x 8, <= {args.tokens} tokens")
    print(f"tokens {gap.numel()}  mean |log pi_sampler - log pi_trainer| {gap.mean().item():.4f}  "
          f"max {gap.max().item():.3f}")


if __name__ == "__main__":
    main()

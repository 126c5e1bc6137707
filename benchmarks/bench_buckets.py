"""Scoring plus backward of one SmolLM2 rollout batch: packed responses against length buckets.

    python benchmarks/bench_buckets.py [--overheads 32,64,96,160] [--repeats 3] [--sampled 0]

`opo.sequences` scores a micro-batch's responses either as one packed batch (`opo.packing`,
Llama-family decoders on a CPU; only attention is cut into length buckets) or as one
decoder pass per length bucket (every other model). `opo.sequences.length_buckets` plans
the buckets, trading padding against one more pass (or attention block); its `overhead`
is the cost of one in padded tokens (opo uses `opo.packing.BUCKET_OVERHEAD` for packed
responses; 96 under bf16/fp16 autocast and 32 in float32 for bucketed passes). This
scores a fixed batch shaped like `bench_vs_trl`'s (4 prompts of 60 tokens x 8 responses of
5 to 64 tokens, random token ids) with log-probs and entropy, back-propagates their sum,
and prints seconds per call (best and median of `--repeats`) for each path and overhead, in
float32 and under bf16 autocast. `--sampled N` adds N batches the fast engine samples from
SmolLM2 itself (4 of the smollm2 preset's prompts x 8, at most 64 tokens, under each dtype;
torch seed = the batch's number), scored the same ways. Every setting of a dtype runs once
before any is timed (the first calls of a dtype are slower whichever setting they use),
then the settings take turns, `--repeats` rounds.
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
    from opo.sequences import pack

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overheads", default="32,64,96,160")
    parser.add_argument("--sampled", type=int, default=0, help="also time this many sampled batches")
    args = kernel_bench_args(parser, repeats=3)
    model, tok = load_policy("smollm2-135m-instruct", device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for i in range(4):
        prompt = torch.randint(100, 1000, (60,), generator=g).tolist()
        for k in range(8):
            prompts.append(prompt)
            responses.append(torch.randint(100, 1000, (LENGTHS[i * 8 + k],), generator=g).tolist())
    batches = [("random ids", pack(prompts, responses, 0))]
    planner, can_pack = sequences.length_buckets, packing.unsupported_reason
    overheads = [int(x) for x in args.overheads.split(",")]
    try:
        for bf16 in (False, True):
            sampled = _sampled_batches(model, tok, args.sampled, bf16)
            print(f"\n{'bf16 autocast' if bf16 else 'fp32'}")
            print("| batch | mean / longest response | responses | overhead | buckets | s (best / median) |")
            print("|---|---|---|---|---|---|")
            for name, packed in batches + sampled:
                _time_batch(model, packed, name, bf16, overheads, args.repeats, planner, can_pack)
    finally:
        sequences.length_buckets = planner
        packing.unsupported_reason = can_pack


def _sampled_batches(model, tok, count: int, bf16: bool) -> list:
    """`count` rollout batches of the smollm2 preset's first prompts, sampled by the fast engine."""
    from opo.config import load_config
    from opo.data import encode_prompts, load_split
    from opo.rollout import SamplingParams, engine_from_config
    from opo.sequences import pack

    if not count:
        return []
    cfg = load_config("smollm2")
    engine = engine_from_config(cfg, model, tok, log=lambda *a: None)
    questions = [ex["question"] for ex in load_split(cfg.data).train]
    out = []
    for r in range(count):
        prompts = encode_prompts(tok, questions[4 * r:4 * r + 4], cfg.prompt)[1]
        torch.manual_seed(r)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            batch = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=64))
        out.append((f"sampled {r}", pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)))
    return out


def _time_batch(model, packed, name, bf16, overheads, repeats, planner, can_pack) -> None:
    import opo.packing as packing
    import opo.sequences as sequences
    from opo.sequences import Dist, score

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
    for path, overhead in settings:  # warm-up: the first calls of a dtype run slower, whatever the setting
        timed(bf16, path, overhead)
    # Round robin, so that the machine's drift over the run touches every setting alike.
    times = {setting: [] for setting in settings}
    for _ in range(repeats):
        for path, overhead in settings:
            times[path, overhead].append(timed(bf16, path, overhead))
    lengths = packed.response_lengths()
    for (path, overhead), runs in times.items():
        print(f"| {name} | {sum(lengths) / len(lengths):.1f} / {max(lengths)} | {path} | {overhead} "
              f"| {len(planner(lengths, overhead))} | {min(runs):.2f} / {statistics.median(runs):.2f} |")


if __name__ == "__main__":
    main()

"""Mixed precision on this machine: speed of a forward+backward, and the sampler/trainer
log-prob mismatch of short training runs, fp32 against bf16 autocast.

    python benchmarks/bench_precision.py speed    [--model smollm2-135m-instruct] [--rows 8] [--tokens 128]
    python benchmarks/bench_precision.py mismatch [--preset tiny] [--steps 5] [key=value ...]

`speed` times one forward+backward of the policy loss path (`opo.sequences.score`, as
the trainer runs it) on random token rows, alternating fp32 and bf16 repeat by repeat so
that both see the same background load; it prints the median and the range.
`mismatch` runs `opo train` for a few steps per dtype and prints logp_mismatch_max and
logp_mismatch_mean of every step (the check is switched off so a run always finishes),
plus the held-out accuracy at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)


def speed(args) -> None:
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.sequences import pack, score

    torch.set_num_threads(args.threads)
    model, tok = load_policy(args.model, "float32", "cpu")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (16,), generator=gen).tolist() for _ in range(args.rows)]
    responses = [torch.randint(0, vocab, (args.tokens - 16,), generator=gen).tolist() for _ in range(args.rows)]
    packed = pack(prompts, responses, tok.pad_token_id)
    modes = {"float32": Precision("float32", "cpu"), "bfloat16 autocast": Precision("bfloat16", "cpu")}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for rep in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, prec in modes.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with prec.autocast():
                logp, _ = score(model, packed, chunk_tokens=4096)
                loss = -(logp * packed.response_mask).sum() / packed.response_mask.sum()
            loss.backward()
            if rep:
                times[name].append(time.perf_counter() - t0)
    print(f"# {args.model}: forward+backward of {args.rows} rows x {args.tokens} tokens, "
          f"{args.threads} threads, {cpu_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {args.repeats} alternating repeats after one warm-up")
    print("| compute | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")


def mismatch(args) -> None:
    from opo.config import load_config
    from opo.trainer import train

    print(f"# {args.preset}: {args.steps} steps per dtype, {cpu_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; overrides: {' '.join(args.overrides) or '-'}")
    print("| dtype | step | logp_mismatch_max | logp_mismatch_mean | reward_mean |")
    print("|---|---|---|---|---|")
    summaries = {}
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(args.preset, [
                f"run.dir={tmp}/run", f"model.dtype={dtype}", f"trainer.steps={args.steps}",
                "trainer.progress=false", f"trainer.threads={args.threads}", "algo.max_logp_mismatch=0", "algo.max_mismatch_kl=0",
                "checkpoint.every=0", "checkpoint.every_minutes=0", f"trainer.eval_every={args.steps}",
                *args.overrides])
            summaries[dtype] = train(cfg, log=lambda *a: None)
            rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        for r in rows[1:]:
            print(f"| {dtype} | {r['step']} | {r['logp_mismatch_max']:.3g} | {r['logp_mismatch_mean']:.3g} "
                  f"| {r['reward_mean']:.3f} |")
    print()
    for dtype, s in summaries.items():
        print(f"{dtype}: held-out accuracy {s['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f}, "
              f"{s['wall_seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("mismatch")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    speed(args) if args.cmd == "speed" else mismatch(args)


if __name__ == "__main__":
    main()

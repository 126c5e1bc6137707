"""Peak memory of one training step (forward + backward + AdamW step), per configuration.

    python benchmarks/bench_memory.py                       # tiny and smollm2, chunked vs unchunked
    python benchmarks/bench_memory.py --presets smollm2 --rows 16 --tokens 256 --chunks 0,512 \
        --extra model.dtype=bfloat16

Each configuration runs in a fresh child process, so one's allocations cannot hide
another's; the parent reads the child's peak resident set size from os.wait4's rusage
(ru_maxrss). The child also reports its peak right after loading the model and before the
step, so the table separates what the step itself adds. The batch is `rows` responses of
`tokens` random tokens after a 16-token prompt, scored through `opo.update.policy_update`
exactly as the trainer does (one optimiser step, AdamW state created by that step).

`algo.logprob_chunk_size=0` sends every response token through the output layer at once,
so [N, vocabulary] fp32 logits (and their gradient) exist; a chunk size C bounds that to
[C, vocabulary], each chunk recomputed in the backward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)


def _child(spec: dict) -> None:
    import torch

    from opo.config import load_config
    from opo.models import load_policy
    from opo.precision import Precision
    from opo.sequences import pack
    from opo.update import policy_update

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = load_config(spec["preset"], spec["overrides"])
    precision = Precision.from_config(cfg.model, "cpu")
    model, tok = load_policy(cfg.model.path, precision.param_dtype, "cpu", cfg.model.cache_dir)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    rows, tokens = spec["rows"], spec["tokens"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (16,), generator=gen).tolist() for _ in range(rows)]
    responses = [torch.randint(3, vocab, (tokens,), generator=gen).tolist() for _ in range(rows)]
    packed = pack(prompts, responses, tok.pad_token_id)
    advantages = torch.randn(rows, generator=gen)
    with torch.no_grad():  # weights may be memory-mapped: read them all so they count as loaded
        sum(float(p.sum()) for p in model.parameters())
    loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stats = policy_update(model, optimizer, packed, advantages, cfg, precision=precision)
    seconds = time.perf_counter() - t0
    print(json.dumps({"loaded_kb": loaded_kb, "seconds": seconds, "grad_norm": stats["grad_norm"],
                      "params": sum(p.numel() for p in model.parameters()), "vocab": vocab}))


def _measure(spec: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": f"child exited with {proc.returncode}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_kb"] = usage.ru_maxrss  # Linux reports kilobytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--presets", default="tiny,smollm2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="response tokens per row")
    parser.add_argument("--chunks", default="0,512", help="algo.logprob_chunk_size values to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    import torch

    print(f"# one training step, {args.rows} rows x (16 prompt + {args.tokens} response) tokens; "
          f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"extra overrides: {' '.join(args.extra) or '-'}")
    print("| preset | params | vocab | logprob_chunk_size | peak RSS after load (MB) | peak RSS of the step (MB) "
          "| added by the step (MB) | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for chunk in [int(c) for c in args.chunks.split(",")]:
            spec = {"preset": preset, "rows": args.rows, "tokens": args.tokens, "threads": args.threads,
                    "overrides": [f"algo.logprob_chunk_size={chunk}", "algo.micro_batch_size=0",
                                  "algo.max_tokens_per_micro_batch=0", *args.extra]}
            r = _measure(spec)
            if "error" in r:
                print(f"| {preset} | | | {chunk} | {r['error']} | | | |", flush=True)
                continue
            loaded, peak = r["loaded_kb"] / 1024, r["peak_kb"] / 1024
            print(f"| {preset} | {r['params'] / 1e6:.1f}M | {r['vocab']} | {chunk or 'off (0)'} | {loaded:.0f} "
                  f"| {peak:.0f} | {peak - loaded:.0f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

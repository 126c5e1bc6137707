"""How much does each reward baseline reduce the variance of the policy gradient?

For a fixed policy and a fixed set of prompts we draw, for each prompt, M independent
groups of K responses, compute every response's gradient g_i = ∇_θ logπ(y_i|x)
*exactly* (one backward pass per response), and form the per-group estimator

    ĝ = (1/K) Σ_i (r_i − b_i) g_i

under several baselines b. Its variance is the trace of its covariance over the M
groups of the same prompt (the spread a baseline can remove; how the true gradient
varies from prompt to prompt is not noise), averaged over prompts. The baselines:

    none    b = 0
    mean    the group's mean reward                              (Dr. GRPO, RLOO)
    opo     Σ l r / Σ l, l = response length                     (OPO)
    exact   Σ w r / Σ w, w = ‖g‖², the true squared gradient norm (opo_exact)
    proxy   Σ w r / Σ w, w = Σ_t ‖∂logπ(y_t)/∂z_t‖² from logits  (opo_proxy)

Each weighted baseline is measured twice. *In-group*, the sample's own reward is part
of its baseline, as the trainer's estimators do it; that makes the estimate slightly
biased (for the mean baseline it is exactly (K−1)/K times the leave-one-out one, so
its variance is ((K−1)/K)² times smaller for that reason alone). *Leave-one-out*,
b_i uses only the other K−1 responses, so it is independent of y_i and the estimate
is unbiased. Ratios compare like with like: in-group against the in-group mean,
leave-one-out against the leave-one-out mean (RLOO).

The pure maths (`group_baselines`, `group_estimates`, `trace_covariance`,
`TraceCovariance`) has no model in it and is tested on synthetic data; the
`measure_variance` driver samples, scores and takes the gradients.

`describe_scratchpad_model` (``python -m opo.variance scratchpad``) is the scratchpad
task's own analysis: accuracy by answer format and the within-group length spread.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from opo.data import derive_seed, encode_prompts
from opo.gradnorm import per_response_grads
from opo.models import eos_ids, load_policy
from opo.rewards import exact_match
from opo.rollout import SamplingParams, make_engine
from opo.sequences import Dist, pack
from opo.tasks import scratchpad

BASELINES = ("none", "mean", "opo", "exact", "proxy")
WEIGHTED = ("mean", "opo", "exact", "proxy")
# (variant name, baseline, leave-one-out)
VARIANTS = [("none", "none", False)] + [(b, b, False) for b in WEIGHTED] + \
           [(f"{b}_loo", b, True) for b in WEIGHTED]

BASELINE_HANDLING = (
    "in-group variants (mean, opo, exact, proxy) include each response in its own group's "
    "baseline, exactly as the trainer's estimators do, which biases the estimate by O(1/K); "
    "*_loo variants compute each response's baseline from the other K-1 responses only "
    "(unbiased; mean_loo is RLOO). var_ratio_X_vs_mean compares in-group with the in-group "
    "mean; var_ratio_X_loo_vs_mean_loo compares leave-one-out with RLOO. 'none' uses b = 0.")


# --------------------------------------------------------------------------- pure maths

def group_baselines(rewards: Tensor, weights: Tensor | None, leave_one_out: bool = False) -> Tensor:
    """Baselines [G, K] for rewards [G, K] of G groups of K responses.

    weights [G, K] (>= 0): b = Σ w r / Σ w over the group (in-group), or over the
    group without response i (leave_one_out). weights None means no baseline (zeros).
    Where the weights to average sum to 0, the plain mean of the same responses is
    used; a response with nobody to average over (K = 1) gets baseline 0.
    """
    r = rewards.double()
    if weights is None:
        return torch.zeros_like(r)
    w = weights.double()
    k = r.shape[-1]
    w_sum, wr_sum, r_sum = w.sum(-1, keepdim=True), (w * r).sum(-1, keepdim=True), r.sum(-1, keepdim=True)
    if not leave_one_out:
        plain = r_sum / k
        b = torch.where(w_sum > 0, wr_sum / w_sum.clamp_min(1e-300), plain).expand_as(r)
        return b if k > 1 else torch.zeros_like(r)
    if k == 1:
        return torch.zeros_like(r)
    w_o, wr_o = w_sum - w, wr_sum - w * r
    plain = (r_sum - r) / (k - 1)
    return torch.where(w_o > 0, wr_o / w_o.clamp_min(1e-300), plain)


def group_estimates(grads: Tensor, rewards: Tensor, baselines: Tensor) -> Tensor:
    """Per-group policy-gradient estimates (1/K) Σ_i (r_i − b_i) g_i:
    grads [G, K, D], rewards [G, K], baselines [G, K] -> [G, D] (grads' dtype)."""
    coef = (rewards.double() - baselines.double()) / rewards.shape[-1]
    return torch.einsum("gk,gkd->gd", coef.to(grads.dtype), grads)


def trace_covariance(samples: Tensor) -> float:
    """Unbiased trace of the covariance of samples [M, D] (M >= 2): Σ_m ‖x_m − x̄‖² / (M − 1)."""
    if samples.shape[0] < 2:
        raise ValueError("the trace of a covariance needs at least two samples")
    x = samples.double()
    return float((x - x.mean(0)).pow(2).sum() / (x.shape[0] - 1))


class TraceCovariance:
    """Streaming (Welford) trace of the covariance and the mean of vectors [D], so M
    estimates never have to be held at once. Agrees with ``trace_covariance``."""

    def __init__(self, dim: int, dtype=torch.float64, device="cpu"):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.m2 = 0.0

    def update(self, x: Tensor) -> None:
        x = x.to(self.mean.dtype)
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += float((delta * (x - self.mean)).sum())

    @property
    def value(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else float("nan")


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    return pearson(ranks(x), ranks(y))


def within_group_pearson(x, y, groups) -> float:
    """Pearson correlation after subtracting each group's own mean from x and y."""
    x, y, groups = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    xc, yc = x.copy(), y.copy()
    for g in np.unique(groups):
        sel = groups == g
        xc[sel] -= x[sel].mean()
        yc[sel] -= y[sel].mean()
    return pearson(xc, yc)


def length_spread(lengths: list[list[int]]) -> dict:
    """Within-group spread of response lengths; ``lengths`` holds one list per group:
    the mean over groups of the (population) std, the mean and median over groups of
    max/min, the share of groups whose longest response is at least twice the shortest,
    and the mean length."""
    stds, ratios = [], []
    for group in lengths:
        if not group or min(group) < 1:
            raise ValueError("every group needs at least one response of length >= 1")
        stds.append(float(np.std(group)))
        ratios.append(max(group) / min(group))
    return {"groups": len(lengths), "mean_within_group_std": float(np.mean(stds)),
            "mean_max_min_ratio": float(np.mean(ratios)),
            "median_max_min_ratio": float(np.median(ratios)),
            "share_groups_ratio_ge_2": float(np.mean([r >= 2 for r in ratios])),
            "mean_length": float(np.mean([x for g in lengths for x in g]))}


def ratio_ci(per_prompt: np.ndarray, num: int, den: int, rounds: int = 2000, seed: int = 0):
    """Bootstrap 95% interval over prompts of Σ per_prompt[:, num] / Σ per_prompt[:, den]."""
    rng = np.random.default_rng(seed)
    p = per_prompt.shape[0]
    idx = rng.integers(0, p, size=(rounds, p))
    top, bottom = per_prompt[idx, num].sum(1), per_prompt[idx, den].sum(1)
    ratios = top[bottom > 0] / bottom[bottom > 0]
    if len(ratios) == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]


# --------------------------------------------------------------------------- the driver

@dataclass
class VarianceSettings:
    prompts: int = 16           # P prompts
    groups: int = 16            # M groups of K responses per prompt
    group_size: int = 8         # K
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0
    param_filter: str = ""      # regex on parameter names; empty = every trainable parameter

    def validate(self) -> None:
        """ValueError naming the setting when no variance can be measured with these."""
        if self.prompts < 1:
            raise ValueError(f"variance needs at least 1 prompt, got --prompts {self.prompts}")
        if self.groups < 2:
            raise ValueError(f"variance needs at least 2 groups per prompt, got --groups {self.groups}")
        if self.group_size < 2:
            raise ValueError(f"variance needs groups of at least 2 responses, got --k {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"variance samples at a temperature > 0, got {self.temperature}")
        if self.param_filter:
            try:
                re.compile(self.param_filter)
            except re.error as exc:
                raise ValueError(f"--params {self.param_filter!r} is not a regular expression: {exc}") from None


def measure_variance(model, tokenizer, examples: list[dict], scorer, prompt_cfg,
                     settings: VarianceSettings, log=print) -> dict:
    """Sample, score, take per-response gradients and measure every baseline's variance.

    ``examples`` are the prompts to use (the first ``settings.prompts``); ``scorer`` has
    the trainer's ``score(prompts, responses, examples)`` interface. Returns a JSON-ready
    dict (see the module docstring and ``BASELINE_HANDLING``).
    """
    s = settings
    dist = Dist(s.temperature, s.top_p)  # the distribution the responses are sampled from
    s.validate()
    examples = examples[:s.prompts]
    if len(examples) < s.prompts:
        raise ValueError(f"asked for {s.prompts} prompts, only {len(examples)} available")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if s.param_filter:
        pattern = re.compile(s.param_filter)
        params = [(n, p) for n, p in params if pattern.search(n)]
        if not params:
            raise ValueError(f"--params {s.param_filter!r} matches no trainable parameter")
    tensors = [p for _, p in params]
    dim = sum(p.numel() for p in tensors)
    acc_dtype = torch.float64 if dim <= 50_000_000 else torch.float32
    torch.manual_seed(s.seed)
    started = time.perf_counter()

    texts, prompt_ids = encode_prompts(tokenizer, [ex["question"] for ex in examples], prompt_cfg)
    engine = make_engine("hf", model, tokenizer, eos_ids(model, tokenizer), 0)
    n_each = s.groups * s.group_size
    batch = engine.generate(prompt_ids, SamplingParams(n=n_each, temperature=s.temperature,
                                                       top_p=s.top_p, max_new_tokens=s.max_new_tokens))
    scored = scorer.score([texts[g] for g in batch.group_ids], batch.texts,
                          [examples[g] for g in batch.group_ids])
    rewards_all = torch.tensor(scored.rewards, dtype=torch.float64)
    log(f"sampled {len(batch)} responses ({s.prompts} prompts x {s.groups} groups x {s.group_size}) "
        f"in {time.perf_counter() - started:.0f}s; mean reward {float(rewards_all.mean()):.3f}")

    per_prompt = np.zeros((s.prompts, len(VARIANTS)))      # trace of covariance
    mean_sq = np.zeros((s.prompts, len(VARIANTS)))         # ‖mean estimate‖²
    rows = {"length": [], "gradnorm2": [], "proxy": [], "reward": [], "prompt": []}
    group_lengths = []
    # A confident policy samples the same response many times; its gradient is computed
    # once per prompt and kept (up to about 1 GB of gradients).
    cache_limit = int(1e9 // (dim * 4))
    backward_passes = 0
    for p in range(s.prompts):
        accs = [TraceCovariance(dim, acc_dtype) for _ in VARIANTS]
        cache: dict[tuple, tuple[Tensor, float]] = {}
        for m in range(s.groups):
            idx = [p * n_each + m * s.group_size + j for j in range(s.group_size)]
            responses = [tuple(batch.response_ids[i]) for i in idx]
            if any(len(r) == 0 for r in responses):
                raise ValueError("a sampled response is empty; cannot take its gradient")
            fresh: dict[tuple, tuple[Tensor, float]] = {}
            todo = list(dict.fromkeys(r for r in responses if r not in cache))
            if todo:
                packed = pack([batch.prompt_ids[idx[0]]] * len(todo), [list(r) for r in todo],
                              tokenizer.pad_token_id)
                for j, flat, prox, _ in per_response_grads(model, packed, tensors, dist):
                    fresh[todo[j]] = (flat, prox)
                    if len(cache) < cache_limit:
                        cache[todo[j]] = (flat, prox)
                backward_passes += len(todo)
            grads = torch.empty(s.group_size, dim, dtype=torch.float32)
            proxy = torch.empty(s.group_size, dtype=torch.float64)
            for j, response in enumerate(responses):
                grads[j], proxy[j] = fresh[response] if response in fresh else cache[response]
            r = rewards_all[idx]
            lengths = torch.tensor([len(x) for x in responses], dtype=torch.float64)
            norm2 = grads.double().pow(2).sum(-1)
            weights = {"none": None, "mean": torch.ones_like(r), "opo": lengths,
                       "exact": norm2, "proxy": proxy}
            for acc, (_, base, loo) in zip(accs, VARIANTS):
                b = group_baselines(r[None], weights[base] if base == "none" else weights[base][None], loo)
                acc.update(group_estimates(grads[None], r[None].float(), b)[0])
            rows["length"] += lengths.tolist()
            rows["gradnorm2"] += norm2.tolist()
            rows["proxy"] += proxy.tolist()
            rows["reward"] += r.tolist()
            rows["prompt"] += [p] * s.group_size
            group_lengths.append([len(x) for x in responses])
        per_prompt[p] = [a.value for a in accs]
        mean_sq[p] = [float(a.mean.double().pow(2).sum()) for a in accs]
        log(f"prompt {p + 1}/{s.prompts}: {time.perf_counter() - started:.0f}s")

    result = summarise(per_prompt, mean_sq, rows, group_lengths, s, dim, time.perf_counter() - started)
    result["distinct_response_share"] = backward_passes / len(batch)
    return result


def summarise(per_prompt: np.ndarray, mean_sq: np.ndarray, rows: dict, group_lengths, s,
              dim: int, seconds: float) -> dict:
    names = [v[0] for v in VARIANTS]
    col = {n: i for i, n in enumerate(names)}
    total = per_prompt.mean(0)
    out: dict = {"trace_cov": {n: float(total[col[n]]) for n in names},
                 "mean_estimate_sq_norm": {n: float(mean_sq[:, col[n]].mean()) for n in names}}
    for n in names:
        if n in ("mean", "mean_loo"):
            continue
        ref = "mean_loo" if n.endswith("_loo") else "mean"
        key = f"var_ratio_{n}_vs_{ref}"
        den = total[col[ref]]
        out[key] = float(total[col[n]] / den) if den > 0 else float("nan")
        out[key + "_ci95"] = ratio_ci(per_prompt, col[n], col[ref], seed=s.seed)
    x = rows
    out.update(
        corr_gradnorm2_length=pearson(x["gradnorm2"], x["length"]),
        spearman_gradnorm2_length=spearman(x["gradnorm2"], x["length"]),
        corr_gradnorm2_length_within_prompt=within_group_pearson(x["gradnorm2"], x["length"], x["prompt"]),
        corr_proxy_gradnorm2=pearson(x["proxy"], x["gradnorm2"]),
        corr_proxy_gradnorm2_within_prompt=within_group_pearson(x["proxy"], x["gradnorm2"], x["prompt"]),
        corr_proxy_length=pearson(x["proxy"], x["length"]),
        corr_gradnorm2_reward_within_prompt=within_group_pearson(x["gradnorm2"], x["reward"], x["prompt"]),
        corr_length_reward_within_prompt=within_group_pearson(x["length"], x["reward"], x["prompt"]),
        gradnorm2_per_token=float(np.sum(x["gradnorm2"]) / np.sum(x["length"])),
        mean_reward=float(np.mean(x["reward"])),
        share_prompts_all_equal_reward=float(np.mean([
            len(set(np.asarray(x["reward"])[np.asarray(x["prompt"]) == p])) == 1
            for p in range(per_prompt.shape[0])])),
        length_spread=length_spread(group_lengths),
        baseline_handling=BASELINE_HANDLING,
        variance_definition=("trace of the covariance over the groups of one prompt of "
                             "(1/K) sum_i (r_i - b_i) grad log pi(y_i|x), averaged over prompts; "
                             "ci95 is a bootstrap over prompts"),
        settings={**s.__dict__, "parameters": dim}, seconds=seconds,
        per_prompt_trace_cov={n: per_prompt[:, col[n]].tolist() for n in names},
    )
    return out


def format_report(result: dict) -> str:
    """A plain-text table of the result of ``measure_variance``."""
    lines = [f"{'baseline':<12}{'trace cov':>14}{'vs mean':>10}{'95% CI':>18}{'|E g|^2':>14}"]
    for name, _, loo in VARIANTS:
        ref = "mean_loo" if loo else "mean"
        key = f"var_ratio_{name}_vs_{ref}"
        ratio = result.get(key, 1.0)
        ci = result.get(key + "_ci95")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"{name:<12}{result['trace_cov'][name]:>14.5g}{ratio:>10.3f}{ci_text:>18}"
                     f"{result['mean_estimate_sq_norm'][name]:>14.5g}")
    spread = result["length_spread"]
    lines += [
        "",
        f"corr(|grad log pi|^2, length)            pearson {result['corr_gradnorm2_length']:.3f}, "
        f"spearman {result['spearman_gradnorm2_length']:.3f}, within prompt "
        f"{result['corr_gradnorm2_length_within_prompt']:.3f}",
        f"corr(proxy, |grad log pi|^2)             {result['corr_proxy_gradnorm2']:.3f} "
        f"(within prompt {result['corr_proxy_gradnorm2_within_prompt']:.3f})",
        f"corr(length, reward) within prompt       {result['corr_length_reward_within_prompt']:.3f}",
        f"within-group length std {spread['mean_within_group_std']:.2f}, max/min mean "
        f"{spread['mean_max_min_ratio']:.2f} (median {spread['median_max_min_ratio']:.2f}), "
        f"mean length {spread['mean_length']:.1f}, mean reward {result['mean_reward']:.3f}",
        f"parameters in the gradient {result['settings']['parameters']:,}; distinct responses per "
        f"prompt {result.get('distinct_response_share', float('nan')):.1%} of those sampled; "
        f"{result['seconds']:.0f}s",
        "",
        "baselines: " + result["baseline_handling"],
        "variance: " + result["variance_definition"],
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the scratchpad task

def describe_scratchpad_model(path: str | Path = scratchpad.ASSET_DIR, problems: int = 200, groups: int = 64, group_size: int = 8,
                   max_new_tokens: int = 48, seed: int = 1234) -> dict:
    """What a scratchpad model does on held-out problems (data.seed = `seed`): greedy and
    sampled (T = 1) accuracy, the share of direct answers and each format's accuracy, and
    the within-group spread of sampled response lengths (groups of `group_size`)."""
    model, tok = load_policy(str(path), device="cpu")
    model.eval()
    engine = make_engine("hf", model, tok, eos_ids(model, tok), 0)
    examples = scratchpad.make_scratchpad_examples(problems, derive_seed(seed, "held_out"))
    ids = [tok(ex["question"], add_special_tokens=False)["input_ids"] for ex in examples]

    def by_format(batch, exs):
        correct = [exact_match(exs[g]["question"], text, exs[g]) for g, text in zip(batch.group_ids, batch.texts)]
        direct = [not text.split(">")[0] for text in batch.texts]
        n_direct = sum(direct)
        return {"accuracy": sum(correct) / len(correct), "direct_share": n_direct / len(correct),
                "accuracy_direct": sum(c for c, d in zip(correct, direct) if d) / max(n_direct, 1),
                "accuracy_worked": sum(c for c, d in zip(correct, direct) if not d)
                / max(len(correct) - n_direct, 1)}, correct

    torch.manual_seed(0)
    greedy, _ = by_format(engine.generate(ids, SamplingParams(n=1, temperature=0.0,
                                                              max_new_tokens=max_new_tokens)), examples)
    sampled_batch = engine.generate(ids[:groups], SamplingParams(n=group_size, temperature=1.0,
                                                                 max_new_tokens=max_new_tokens))
    sampled, correct = by_format(sampled_batch, examples[:groups])
    lengths = [sampled_batch.lengths[g * group_size:(g + 1) * group_size] for g in range(groups)]
    mixed = sum(0 < sum(correct[g * group_size:(g + 1) * group_size]) < group_size for g in range(groups))
    return {"greedy": greedy, "sampled": {**sampled, "groups_with_mixed_rewards": mixed / groups},
            "length_spread": length_spread(lengths), "problems": problems, "groups": groups,
            "group_size": group_size}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m opo.variance",
                                     description="Task analyses (`opo variance` measures baselines).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scratchpad", help="a scratchpad model's accuracy by answer format and its "
                                          "within-group length spread")
    p.add_argument("--model", default=str(scratchpad.ASSET_DIR))
    p.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    result = describe_scratchpad_model(args.model)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

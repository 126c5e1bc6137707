"""Compare training runs: estimators × seeds, as a table, plots and one HTML report.

This module reads run folders only (``config.yaml``, ``metrics.jsonl``,
``summary.json``); it never imports the trainer. A grid is run as independent
``opo train`` subprocesses, so a crashed run cannot take the others down and a grid can
be resumed: a run whose folder already holds ``summary.json`` is skipped.

What the table reports for each variant (over seeds: mean ± sample std):

* final held-out accuracy, and the paired difference against the reference variant
  (``opo``) seed by seed: mean difference ± its standard error, and a 95% bootstrap
  interval over seeds. Runs of the same seed share data order and initial model, so
  pairing removes that shared noise;
* the area under the held-out accuracy curve, normalised by the steps it spans (the
  mean accuracy over training; trapezoids between evaluations, from step 0);
* entropy, repetition rate and response length averaged over the last tenth of the
  steps, and kl_to_init at the last step;
* wall time (``summary.json``'s ``wall_seconds``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml


class CompareError(ValueError):
    """A run folder or an input file is missing or malformed; the message names it."""


# --------------------------------------------------------------------------- the default grid

@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


DEFAULT_GRID = (
    Variant("opo", ("algo.estimator=opo", "algo.updates_per_batch=1")),
    Variant("grpo", ("algo.estimator=grpo", "algo.updates_per_batch=1")),
    Variant("grpo_offpolicy", ("algo.estimator=grpo", "algo.updates_per_batch=4", "algo.clip_eps=0.2")),
    Variant("dr_grpo", ("algo.estimator=dr_grpo", "algo.updates_per_batch=1")),
    Variant("rloo", ("algo.estimator=rloo", "algo.updates_per_batch=1")),
    Variant("opo_exact", ("algo.estimator=opo_exact", "algo.updates_per_batch=1")),
    Variant("opo_proxy", ("algo.estimator=opo_proxy", "algo.updates_per_batch=1")),
)
REFERENCE = "opo"


# Precision x rollout correction (the low-precision question): the same estimator in fp32,
# in bf16 without and with truncated importance sampling, and in fp16. Names follow
# variant_name, so a run folder is named the same whichever grid produced it.
PRECISION_GRID = (
    Variant("opo", ("model.dtype=float32", "algo.rollout_correction=none")),
    Variant("opo_bf16", ("model.dtype=bfloat16", "algo.rollout_correction=none")),
    Variant("opo_bf16_token-tis", ("model.dtype=bfloat16", "algo.rollout_correction=token-tis")),
    Variant("opo_fp16", ("model.dtype=float16", "algo.rollout_correction=none")),
)
# On-policy distillation (give algo.teacher=PATH to the grid): RL alone (the reference),
# RL with the teacher's per-token signal, and the teacher's signal alone.
DISTILL_GRID = (
    Variant("opo", ("algo.distill_coef=0", "algo.reward_coef=1")),
    Variant("opo_distill", ("algo.distill_coef=1", "algo.reward_coef=1")),
    Variant("distill", ("algo.distill_coef=1", "algo.reward_coef=0")),
)
GRIDS = {"estimators": DEFAULT_GRID, "precision": PRECISION_GRID, "distill": DISTILL_GRID}

_DTYPE_SUFFIX = {"float32": "", "bfloat16": "_bf16", "float16": "_fp16"}


def variant_name(config: dict) -> str:
    """The grid name of a run from its resolved config: the estimator, with
    ``_offpolicy`` (plus ``_uN`` when N is not 4) for more than one update per batch,
    ``_bf16``/``_fp16`` for a low-precision model.dtype and ``_<mode>`` for a rollout
    correction other than none; ``_distill`` with a teacher, or ``distill`` alone when the
    reward's advantage is off (algo.reward_coef = 0)."""
    algo = config.get("algo", {}) or {}
    dtype = _DTYPE_SUFFIX.get(str((config.get("model") or {}).get("dtype", "float32")), "")
    distilling = bool(algo.get("teacher")) and float(algo.get("distill_coef", 1.0)) > 0
    if distilling and float(algo.get("reward_coef", 1.0)) == 0:
        return "distill" + dtype
    name = str(algo.get("estimator", "?"))
    updates = int(algo.get("updates_per_batch", 1) or 1)
    if updates > 1:
        name += "_offpolicy" + ("" if updates == 4 else f"_u{updates}")
    name += dtype
    correction = str(algo.get("rollout_correction", "none") or "none")
    if correction != "none":
        name += "_" + correction
    return name + ("_distill" if distilling else "")


# --------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    path: Path
    variant: str
    seed: int
    config: dict
    rows: list[dict]
    summary: dict
    accuracy_curve: list[tuple[int, float]] = field(default_factory=list)


def load_run(path: str | Path) -> Run:
    """Read one run folder; a missing or malformed file is a CompareError naming it."""
    path = Path(path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        if not (path / name).is_file():
            raise CompareError(f"{path}: no {name}; is this a finished `opo train` run folder?")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise CompareError(f"{path / 'config.yaml'}: not valid YAML ({exc})") from None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path / 'summary.json'}: not valid JSON ({exc.msg})") from None
    rows = []
    with open(path / "metrics.jsonl") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompareError(f"{path / 'metrics.jsonl'}: line {number} is not valid JSON "
                                   f"({exc.msg})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise CompareError(f"{path / 'metrics.jsonl'}: line {number} has no 'step' field")
            rows.append(row)
    seed = int((config.get("trainer") or {}).get("seed", 0))
    run = Run(path, variant_name(config), seed, config, rows, summary)
    run.accuracy_curve = accuracy_curve(rows, summary)
    return run


def accuracy_curve(rows: list[dict], summary: dict) -> list[tuple[int, float]]:
    """(step, held-out accuracy) pairs from step 0. A logged step-0 evaluation is used
    when present; otherwise summary.json's initial_accuracy stands for step 0."""
    curve = {int(r["step"]): float(r["eval_accuracy"]) for r in rows
             if r.get("eval_accuracy") is not None}
    if 0 not in curve and _finite(summary.get("initial_accuracy")):
        curve[0] = float(summary["initial_accuracy"])
    return sorted(curve.items())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among `paths`: each path is a run folder, or a folder searched (to any
    depth) for run folders (those holding summary.json)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CompareError(f"{p} does not exist")
        if (p / "summary.json").is_file():
            found.append(p)
            continue
        inner = sorted(q.parent for q in p.rglob("summary.json"))
        if not inner:
            raise CompareError(f"{p}: no run folders (folders with summary.json) found in it")
        found += inner
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------- per-run figures

def curve_auc(curve: list[tuple[int, float]]) -> float:
    """Trapezoid area under (step, value) divided by the steps spanned: the mean value
    over training. One point gives that value; none gives NaN."""
    if not curve:
        return float("nan")
    if len(curve) == 1:
        return curve[0][1]
    x = np.array([c[0] for c in curve], float)
    y = np.array([c[1] for c in curve], float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def _tail_mean(rows: list[dict], key: str, share: float = 0.1) -> float:
    values = [float(r[key]) for r in rows if r.get("step", 0) > 0 and _finite(r.get(key))]
    if not values:
        return float("nan")
    n = max(1, int(round(len(values) * share)))
    return float(np.mean(values[-n:]))


def _mean(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get("step", 0) > 0 and _finite(r.get(key))]
    return float(np.mean(values)) if values else float("nan")


def _last(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get("step", 0) > 0 and _finite(r.get(key))]
    return values[-1] if values else float("nan")


def run_figures(run: Run) -> dict:
    """The per-run numbers the table aggregates."""
    final = run.summary.get("final_accuracy")
    if not _finite(final):
        final = run.accuracy_curve[-1][1] if run.accuracy_curve else float("nan")
    return {
        "final_accuracy": float(final),
        "initial_accuracy": run.accuracy_curve[0][1] if run.accuracy_curve else float("nan"),
        "auc_accuracy": curve_auc(run.accuracy_curve),
        "entropy": _tail_mean(run.rows, "entropy"),
        "kl_to_init": _last(run.rows, "kl_to_init"),
        # Sampler-vs-trainer KL (k3, per token) over the whole run: 0 in exact fp32.
        "mismatch_kl": _mean(run.rows, "mismatch_kl"),
        # KL(student ‖ teacher) per token over the last tenth, in runs with algo.teacher.
        "teacher_kl": _tail_mean(run.rows, "teacher_kl"),
        "repetition_rate": _tail_mean(run.rows, "repetition_rate"),
        "response_length": _tail_mean(run.rows, "response_length_mean"),
        "wall_seconds": float(run.summary.get("wall_seconds", float("nan"))),
        "steps": int(run.summary.get("steps", max((r["step"] for r in run.rows), default=0))),
    }


# --------------------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN std for one value), NaNs dropped."""
    v = np.array([x for x in values if _finite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def paired_difference(a: dict[int, float], b: dict[int, float], rounds: int = 5000,
                      seed: int = 0) -> dict:
    """Paired comparison of a against b over the seeds both have (a[seed] − b[seed]).

    Returns n, the mean difference, its standard error (sample std / √n), and a 95%
    percentile-bootstrap interval of the mean difference over seeds (NaN below n = 2).
    """
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    d = np.array([a[s] - b[s] for s in seeds], float)
    out = {"n": len(seeds), "seeds": seeds, "mean": float("nan"), "se": float("nan"),
           "ci95": [float("nan"), float("nan")]}
    if len(d) == 0:
        return out
    out["mean"] = float(d.mean())
    if len(d) > 1:
        out["se"] = float(d.std(ddof=1) / math.sqrt(len(d)))
        rng = np.random.default_rng(seed)
        boot = d[rng.integers(0, len(d), size=(rounds, len(d)))].mean(1)
        out["ci95"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    return out


TABLE_FIELDS = ("final_accuracy", "auc_accuracy", "entropy", "kl_to_init", "mismatch_kl", "teacher_kl",
                "repetition_rate", "response_length", "wall_seconds")


def build_table(runs: list[Run], reference: str = REFERENCE) -> dict:
    """Aggregate runs by variant: {"reference", "variants": [{...}], "runs": [{...}]}."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    figures = {id(r): run_figures(r) for r in runs}
    known = list(dict.fromkeys(v.name for grid in GRIDS.values() for v in grid))
    order = [name for name in known if name in by_variant] + \
        sorted(v for v in by_variant if v not in known)
    ref_final = {r.seed: figures[id(r)]["final_accuracy"] for r in by_variant.get(reference, [])}
    ref_auc = {r.seed: figures[id(r)]["auc_accuracy"] for r in by_variant.get(reference, [])}
    variants = []
    for name in order:
        group = sorted(by_variant[name], key=lambda r: r.seed)
        seeds = [r.seed for r in group]
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            raise CompareError(f"variant {name!r} has several runs with seed {dup}: "
                               + ", ".join(str(r.path) for r in group if r.seed in dup))
        row = {"variant": name, "n": len(group), "seeds": seeds}
        for key in TABLE_FIELDS:
            row[key] = dict(zip(("mean", "std"), mean_std([figures[id(r)][key] for r in group])))
        row["initial_accuracy"] = dict(zip(("mean", "std"), mean_std(
            [figures[id(r)]["initial_accuracy"] for r in group])))
        if name != reference and ref_final:
            row["final_accuracy_vs_reference"] = paired_difference(
                {r.seed: figures[id(r)]["final_accuracy"] for r in group}, ref_final)
            row["auc_accuracy_vs_reference"] = paired_difference(
                {r.seed: figures[id(r)]["auc_accuracy"] for r in group}, ref_auc)
            # The paper's other claims (KL, entropy, repetition) are paired the same way.
            row["paired_vs_reference"] = {
                key: paired_difference({r.seed: figures[id(r)][key] for r in group},
                                       {r.seed: figures[id(r)][key] for r in by_variant[reference]})
                for key in TABLE_FIELDS}
        variants.append(row)
    return {"reference": reference, "variants": variants,
            "runs": [{"path": str(r.path), "variant": r.variant, "seed": r.seed, **figures[id(r)]}
                     for r in runs]}


def _pm(cell: dict, digits: int = 3) -> str:
    m, s = cell["mean"], cell["std"]
    if not _finite(m):
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if _finite(s) else "")


def _sci(cell: dict) -> str:
    m, s = cell["mean"], cell["std"]
    if not _finite(m):
        return "-"
    return f"{m:.2e}" + (f" ± {s:.1e}" if _finite(s) else "")


def _diff(cell: dict | None) -> str:
    if not cell or not _finite(cell["mean"]):
        return "-"
    text = f"{cell['mean']:+.3f}"
    if _finite(cell["se"]):
        lo, hi = cell["ci95"]
        text += f" ± {cell['se']:.3f} [{lo:+.3f}, {hi:+.3f}]"
    return text + f" (n={cell['n']})"


COLUMNS = [("variant", "variant"), ("n", "seeds"), ("final_accuracy", "final acc"),
           ("final_accuracy_vs_reference", "Δ final acc vs ref: mean ± SE [95% CI]"),
           ("auc_accuracy", "acc AUC"), ("entropy", "entropy"), ("kl_to_init", "KL to init"),
           ("mismatch_kl", "mismatch KL"), ("teacher_kl", "KL to teacher"),
           ("repetition_rate", "repetition"), ("response_length", "length"), ("wall_seconds", "wall s")]


def table_rows(table: dict) -> list[list[str]]:
    """The table as strings: a header row, then one row per variant."""
    out = [[title.replace("ref", table["reference"]) for _, title in COLUMNS]]
    for row in table["variants"]:
        cells = []
        for key, _ in COLUMNS:
            if key == "variant":
                cells.append(row["variant"])
            elif key == "n":
                cells.append(str(row["n"]))
            elif key.endswith("_vs_reference"):
                cells.append(_diff(row.get(key)))
            else:
                if key == "mismatch_kl":
                    cells.append(_sci(row[key]))
                    continue
                digits = {"response_length": 1, "wall_seconds": 0, "repetition_rate": 4}.get(key, 3)
                cells.append(_pm(row[key], digits))
        out.append(cells)
    return out


def format_table(table: dict) -> str:
    rows = table_rows(table)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- plots

PLOTS = [("eval_accuracy", "held-out accuracy"), ("entropy", "entropy (nats/token)"),
         ("kl_to_init", "KL to initial policy (nats/token)"),
         ("response_length_mean", "mean response length (tokens)"), ("reward_mean", "training reward")]


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise CompareError("plots need matplotlib, which is not installed: "
                           "pip install 'opo[evidence]'  (or: pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(run: Run, key: str) -> dict[int, float]:
    if key == "eval_accuracy":
        return dict(run.accuracy_curve)
    return {int(r["step"]): float(r[key]) for r in run.rows if r["step"] > 0 and _finite(r.get(key))}


def _smooth(series: dict[int, float], window: int) -> dict[int, float]:
    if window <= 1 or not series:
        return series
    steps = sorted(series)
    values = np.array([series[s] for s in steps])
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, "full")[:len(values)]
    counts = np.convolve(np.ones(len(values)), kernel, "full")[:len(values)]
    return dict(zip(steps, (sums / counts).tolist()))  # trailing mean over up to `window` steps


def plot_metric(runs: list[Run], key: str, label: str, path: Path) -> Path:
    """One PNG: `key` against step, one line per variant (mean over seeds) with a band of
    ± one standard deviation over seeds. Per-step training metrics are smoothed with a
    trailing mean over about 1/25 of the steps; held-out accuracy is not smoothed."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    names = [v.name for v in DEFAULT_GRID if v.name in by_variant] + \
        sorted(v for v in by_variant if v not in {g.name for g in DEFAULT_GRID})
    max_step = max((r["step"] for run in runs for r in run.rows), default=1)
    window = 1 if key == "eval_accuracy" else max(1, round(max_step / 25))
    drawn = False
    for name in names:
        per_seed = [_smooth(_series(r, key), window) for r in by_variant[name]]
        steps = sorted({s for series in per_seed for s in series})
        if not steps:
            continue
        mean, lo, hi = [], [], []
        for s in steps:
            vals = np.array([series[s] for series in per_seed if s in series])
            m, sd = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            mean.append(m)
            lo.append(m - sd)
            hi.append(m + sd)
        line, = ax.plot(steps, mean, marker="o" if key == "eval_accuracy" else None, markersize=3,
                        label=f"{name} (n={len(per_seed)})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        drawn = True
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(label)
    note = "" if window == 1 else f", trailing mean over {window} steps"
    ax.set_title(f"{label}: mean over seeds, band ± 1 std{note}", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {key} values in these runs", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- pass@k

def load_passk(path: str | Path) -> dict:
    """An `opo eval --out` JSON file: {"label", "k": [...], "pass": [...], "maj": [...]}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: expected a JSON object from `opo eval --out`")
    ks = sorted(int(k.split("@", 1)[1]) for k in data if k.startswith("pass@")
                and k.split("@", 1)[1].isdigit())
    if not ks:
        raise CompareError(f"{path}: no pass@K fields; write it with `opo eval --n N --k 1,2,4,... --out`")
    return {"label": str(data.get("label") or _short_model(data.get("model")) or path.stem), "path": str(path),
            "k": ks, "pass": [float(data[f"pass@{k}"]) for k in ks],
            "maj": [float(data[f"maj@{k}"]) if _finite(data.get(f"maj@{k}")) else float("nan") for k in ks],
            "problems": data.get("problems"), "samples": data.get("samples"),
            "temperature": data.get("temperature")}


def _short_model(model) -> str:
    """A model path as a legend label: its last two parts (a run's `opo-seed0/final`)."""
    if not model:
        return ""
    parts = Path(str(model)).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else str(model)


def plot_passk(curves: list[dict], path: Path) -> Path:
    """pass@k (solid) and maj@k (dashed) against k on a log2 axis, one colour per model."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    labels = [c["label"] for c in curves]
    for c in curves:
        label = c["label"] if labels.count(c["label"]) == 1 else f"{c['label']} ({Path(c['path']).name})"
        line, = ax.plot(c["k"], c["pass"], marker="o", markersize=3, label=f"{label} pass@k")
        if any(_finite(m) for m in c["maj"]):
            ax.plot(c["k"], c["maj"], linestyle="--", color=line.get_color(), marker="x", markersize=3,
                    label=f"{label} maj@k")
    ax.set_xscale("log", base=2)
    ks = sorted({k for c in curves for k in c["k"]})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("share of problems solved")
    ax.set_ylim(0, 1.02)
    ax.set_title("pass@k (solid), maj@k (dashed): a gain at k = 1 that vanishes at large k "
                 "is sharpening", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report

def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def html_report(table: dict | None, images: list[tuple[Path, str]], passk: list[dict],
                title: str, notes: list[str]) -> str:
    """One self-contained HTML page: no scripts, styles inline, images as base64."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;"
             "padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if table is not None:
        rows = table_rows(table)
        parts.append("<h2>Summary over seeds</h2><table><tr>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
        for r in rows[1:]:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
    paired = [row for row in (table or {}).get("variants", []) if "paired_vs_reference" in row]
    if paired:
        parts.append(f"<h2>Paired differences from {html.escape(table['reference'])} (mean ± SE "
                     "[95% bootstrap CI], same seeds)</h2><table><tr><th>variant</th>"
                     + "".join(f"<th>{html.escape(k)}</th>" for k in TABLE_FIELDS[1:]) + "</tr>")
        for row in paired:
            parts.append(f"<tr><td>{html.escape(row['variant'])}</td>" + "".join(
                f"<td>{html.escape(_diff(row['paired_vs_reference'][k]))}</td>" for k in TABLE_FIELDS[1:])
                + "</tr>")
        parts.append("</table>")
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for path, alt in images:
        parts.append(_png_tag(path, alt))
    if table is not None:
        parts.append("<h2>Runs</h2><table><tr><th>run folder</th><th>variant</th><th>seed</th>"
                     "<th>steps</th><th>initial acc</th><th>final acc</th><th>wall s</th></tr>")
        for r in table["runs"]:
            parts.append(f"<tr><td>{html.escape(r['path'])}</td><td>{html.escape(r['variant'])}</td>"
                         f"<td>{r['seed']}</td><td>{r['steps']}</td><td>{r['initial_accuracy']:.3f}</td>"
                         f"<td>{r['final_accuracy']:.3f}</td><td>{r['wall_seconds']:.0f}</td></tr>")
        parts.append("</table>")
    if passk:
        parts.append("<h2>pass@k</h2><table><tr><th>model</th>"
                     + "".join(f"<th>k={k}</th>" for k in passk[0]["k"]) + "</tr>")
        for c in passk:
            cells = dict(zip(c["k"], c["pass"]))
            parts.append(f"<tr><td>{html.escape(c['label'])}</td>"
                         + "".join(f"<td>{cells[k]:.3f}</td>" if k in cells else "<td>-</td>"
                                   for k in passk[0]["k"]) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


TABLE_NOTES = [
    "final acc: held-out accuracy at the last evaluation, mean ± sample std over seeds. "
    "Δ vs reference: paired by seed (same data order and start), mean difference ± standard "
    "error, with a 95% bootstrap interval over seeds.",
    "acc AUC: area under the held-out accuracy curve from step 0, divided by the steps "
    "(the mean accuracy over training). entropy, repetition and length: mean over the last "
    "tenth of the steps; KL to init: the last step's estimate. mismatch KL: the "
    "sampler-vs-trainer KL per token (k3), averaged over all steps (0 when exactly on-policy). "
    "KL to teacher: KL(student || teacher) per token over the last tenth of the steps (runs "
    "with algo.teacher, including RL-alone runs where it only monitors).",
]


def write_report(runs: list[Run], out: Path, passk_files: list[str] = (), title: str = "opo compare",
                 reference: str = REFERENCE) -> dict:
    """Write out/table.json, out/*.png and out/report.html; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    require_matplotlib()  # fail early and clearly if matplotlib is missing
    table = build_table(runs, reference) if runs else None
    images = []
    if runs:
        for key, label in PLOTS:
            images.append((plot_metric(runs, key, label, out / f"{key}.png"), label))
    curves = [load_passk(p) for p in passk_files]
    if curves:
        images.append((plot_passk(curves, out / "passk.png"), "pass@k"))
    payload = dict(table or {})
    if curves:
        payload["passk"] = curves
    (out / "table.json").write_text(json.dumps(payload, indent=2))
    (out / "report.html").write_text(html_report(table, images, curves, title,
                                                 TABLE_NOTES if table else []))
    return payload


# --------------------------------------------------------------------------- running a grid

@dataclass
class Job:
    variant: Variant
    seed: int
    run_dir: Path

    def command(self, preset: str, overrides: list[str], threads: int) -> list[str]:
        base = [sys.executable, "-m", "opo.cli", "train"]
        if (self.run_dir / "checkpoints").is_dir() and any((self.run_dir / "checkpoints").iterdir()):
            return base + ["--resume", str(self.run_dir)]
        return base + [preset, *overrides, *self.variant.overrides, f"run.dir={self.run_dir}",
                       f"trainer.seed={self.seed}", f"trainer.threads={threads}",
                       "trainer.progress=false"]


def plan_grid(out: Path, seeds: list[int], variants=DEFAULT_GRID) -> list[Job]:
    return [Job(v, s, out / "runs" / f"{v.name}-seed{s}") for v in variants for s in seeds]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_grid(jobs: list[Job], preset: str, overrides: list[str], parallel: int, log=print,
             poll_s: float = 1.0) -> list[tuple[Job, int]]:
    """Run the jobs as `opo train` subprocesses, at most `parallel` at a time, each with
    trainer.threads = cores // parallel (at least 1). A job whose run folder already holds
    summary.json is skipped; one with checkpoints is resumed. Returns (job, exit code)
    for the jobs that ran; each job's output goes to RUN_DIR/train.log."""
    parallel = max(1, parallel)
    threads = max(1, available_cores() // parallel)
    todo = [j for j in jobs if not (j.run_dir / "summary.json").is_file()]
    skipped = len(jobs) - len(todo)
    if skipped:
        log(f"skipping {skipped} finished run(s) (summary.json present)")
    running: list[tuple[Job, subprocess.Popen, float]] = []
    done: list[tuple[Job, int]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            cmd = job.command(preset, overrides, threads)
            logf = open(job.run_dir / "train.log", "ab")
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            logf.close()  # the child holds its own descriptor
            running.append((job, proc, time.perf_counter()))
            log(f"started {job.variant.name} seed {job.seed} (pid {proc.pid}) -> {job.run_dir}")
        time.sleep(poll_s)
        for item in list(running):
            job, proc, t0 = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            done.append((job, rc))
            status = "done" if rc == 0 else f"FAILED (exit {rc}; see {job.run_dir / 'train.log'})"
            log(f"{status}: {job.variant.name} seed {job.seed} in {time.perf_counter() - t0:.0f}s")
    return done


def select_variants(names: str, grid: str = "estimators") -> tuple[Variant, ...]:
    """Variants by comma-separated name from the named grid ("" = all of it)."""
    if grid not in GRIDS:
        raise CompareError(f"--grid: unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    if not names:
        return GRIDS[grid]
    known = {v.name: v for v in GRIDS[grid]}
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise CompareError(f"--variants: unknown variant {name!r} in the {grid} grid; "
                               f"known: {', '.join(known)}")
        chosen.append(known[name])
    return tuple(chosen)

"""Command line: `opo train`, `opo eval`, `opo compare`, `opo variance`, `opo toy-base`, `opo config`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opo.config import ConfigError, allowed_values, field_docs, list_presets, load_config

USAGE_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def cmd_train(args) -> int:
    from opo.trainer import load_run_config, train

    if args.resume:
        if args.config and "=" not in args.config:
            raise ConfigError("--resume takes its config from the run folder; give only key=value overrides")
        overrides = ([args.config] if args.config else []) + args.overrides
        cfg = load_run_config(args.resume, overrides)
        cfg.run.dir = args.resume
    else:
        source, overrides = args.config, args.overrides
        if source and "=" in source:  # `opo train key=value ...` with the default preset
            source, overrides = None, [source, *overrides]
        cfg = load_config(source or "tiny", overrides)
    train(cfg, resume=bool(args.resume))
    return 0


def _parse_task_config(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--task-config is not valid JSON ({exc.msg} at column {exc.colno}): "
                          f"{text!r}; write an object, e.g. '{{\"min_terms\": 2, \"max_terms\": 2}}' "
                          "(single quotes outside, double quotes inside)") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--task-config must be a JSON object of generator settings, "
                          f"got {type(value).__name__} {text!r}")
    return value


def _parse_k(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--k: expected comma-separated integers such as 1,4,16, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise ConfigError(f"--k: every k must be >= 1, got {text!r}")
    return ks


def eval_config(args):
    """The Config `opo eval` runs with (see opo.evaluation.eval_settings); ConfigError for bad flags."""
    from opo.evaluation import eval_settings

    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit: use an integer >= 0 (0 = all held-out problems), got {args.limit}")
    if args.show < 0:
        raise ConfigError(f"--show: use an integer >= 0, got {args.show}")
    return eval_settings(
        model=args.model, preset=args.preset, task=args.task, data=args.data,
        task_config=None if args.task_config is None else _parse_task_config(args.task_config),
        reward=args.reward, samples=args.n, k=None if args.k is None else _parse_k(args.k),
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch=args.batch, overrides=args.set)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"


def _print_sample(record: dict) -> None:
    verdict = "correct" if record["correct"] else "wrong"
    print(f"\n--- problem {record['problem']}, sample {record['sample']}: reward {record['reward']:g} "
          f"({verdict}), {record['finish_reason']} after {record['length']} tokens")
    print(f"question: {_clip(record['question'], 400)}")
    print(f"response: {_clip(record['response'], 800)}")
    print(f"answer read: {record['answer']!r}   gold: {record['gold']!r}")


def cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from opo.evaluation import run_evaluation

    cfg = eval_config(args)
    shown: list[dict] = []
    samples_file = None
    if args.samples_out:
        Path(args.samples_out).parent.mkdir(parents=True, exist_ok=True)
        samples_file = open(args.samples_out, "w", encoding="utf-8")

    def on_sample(record: dict) -> None:
        if samples_file:
            samples_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if len(shown) < args.show:
            shown.append(record)

    try:
        with tqdm(desc="opo eval", unit="problem") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            result = run_evaluation(cfg, limit=args.limit or 0, seed=args.seed, on_sample=on_sample,
                                    progress=progress, log=lambda m: print(m, file=sys.stderr))
    finally:
        if samples_file:
            samples_file.close()
    for record in shown:
        _print_sample(record)
    print(f"\n{'metric':<15}value")
    for key, value in result.items():
        if key.startswith(("pass@", "maj@")) or key in ("mean_length", "truncated_rate"):
            print(f"{key:<15}{value:.4f}")
    print(f"{'problems':<15}{result['problems']}  ({cfg.eval.samples} samples each, temperature "
          f"{cfg.eval.temperature:g}, top-p {cfg.eval.top_p:g}, seed {args.seed})")
    if result["reward_errors"]:
        print(f"{'reward_errors':<15}{result['reward_errors']}")
    if args.samples_out:
        print(f"wrote every sample to {args.samples_out}")
    _write_json(args.out, result)
    return 0


def _write_json(path: str | None, result: dict) -> None:
    """The --out file of `opo eval` and `opo variance` (nothing when no path was given)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


def cmd_compare(args) -> int:
    from opo.compare import (CompareError, build_table, find_runs, format_table, load_run, plan_grid,
                             require_matplotlib, run_grid, select_variants, write_report)

    try:
        if args.out:
            require_matplotlib()  # a missing matplotlib is reported before any run starts
        if not args.runs and not args.passk or args.config or args.overrides:
            if args.runs:
                raise CompareError("give either --runs DIR... or a grid to run (PRESET key=value...), "
                                   "not both")
            if not args.out:
                raise CompareError("running a grid needs --out DIR (the runs go in DIR/runs)")
            source, overrides = args.config, list(args.overrides)
            if source and "=" in source:
                source, overrides = None, [source, *overrides]
            load_config(source or "tiny", overrides)  # a config error stops us before any run
            if args.seeds < 1:
                raise CompareError(f"--seeds must be >= 1, got {args.seeds}")
            out = Path(args.out)
            jobs = plan_grid(out, list(range(args.seed0, args.seed0 + args.seeds)),
                             select_variants(args.variants, args.grid))
            results = run_grid(jobs, source or "tiny", overrides, args.jobs)
            failed = [job for job, rc in results if rc != 0]
            run_dirs = [j.run_dir for j in jobs if (j.run_dir / "summary.json").is_file()]
        else:
            failed, run_dirs = [], find_runs(args.runs) if args.runs else []
        runs = [load_run(d) for d in run_dirs]
        if runs:
            print(format_table(build_table(runs, args.reference)))
        if args.out:
            write_report(runs, Path(args.out), args.passk or [], reference=args.reference)
            print(f"wrote {Path(args.out) / 'report.html'} and table.json")
        if failed:
            print("failed runs: " + ", ".join(str(j.run_dir) for j in failed), file=sys.stderr)
            return 1
    except CompareError as exc:
        print(f"opo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_variance(args) -> int:
    from opo.config import apply_overrides
    from opo.data import load_examples
    from opo.models import load_policy
    from opo.rewards import RewardScorer
    from opo.variance import VarianceSettings, format_report, measure_variance

    import torch

    cfg = load_config(args.preset or "tiny")
    apply_overrides(cfg, args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = VarianceSettings(
        prompts=args.prompts, groups=args.groups, group_size=args.k,
        temperature=args.temperature if args.temperature is not None else cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, max_new_tokens=args.max_new_tokens or cfg.rollout.max_new_tokens,
        seed=args.seed, param_filter=args.params)
    try:
        settings.validate()
    except ValueError as exc:
        print(f"opo: error: {exc}", file=sys.stderr)
        return 2
    train, held_out = load_examples(cfg.data)
    examples = held_out if args.split == "held_out" else train
    model, tokenizer = load_policy(args.model or cfg.model.path, cfg.model.dtype, cfg.model.device,
                                   cfg.model.cache_dir)
    model.eval()  # dropout off: the gradients are those of the distribution we sample
    scorer = RewardScorer.from_config(cfg.reward)
    try:
        result = measure_variance(model, tokenizer, examples, scorer, cfg.prompt, settings)
    except ValueError as exc:  # settings that cannot give a variance (one group, no prompts...)
        print(f"opo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        scorer.close()
    result.update(model=args.model or cfg.model.path, preset=cfg.preset,
                  task=cfg.data.task or cfg.data.source, split=args.split)
    print()
    print(format_report(result))
    _write_json(args.out, result)
    return 0


def cmd_toy_base(args) -> int:
    from opo.tasks.addition import ASSET_DIR, build_toy_base

    out = build_toy_base(args.out or ASSET_DIR)
    print(f"wrote the tiny model to {out}")
    return 0


def cmd_config(args) -> int:
    if args.fields:
        for key, text, default in field_docs():
            print(f"{key} = {default!r}    [{allowed_values(key)}]\n    {text}")
        return 0
    from opo.config import dump_yaml

    print(dump_yaml(load_config(args.preset or "tiny", args.overrides)), end="")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("opo")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opo", description="On-policy RL with the optimal reward baseline.")
    parser.add_argument("--version", action="version", version=f"opo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy (default: the built-in tiny preset)")
    p.add_argument("config", nargs="?", help=f"preset name ({', '.join(list_presets())}) or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.steps=50")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="report pass@k, maj@k and response length on held-out problems",
                       description="Evaluate a model on held-out problems. Without --preset, each data "
                       "source brings its natural reward, instruction and token limit (reasoning-gym: "
                       "its own scorer; CHAMP and files: math_verify with a \\boxed{} instruction; "
                       "toy_addition: exact_match); a chat model gets its chat template.")
    p.add_argument("--model", help="model path or built-in name (default: the preset's model.path, else tiny)")
    p.add_argument("--preset", help="start from this preset or YAML (its data, prompt, reward and eval "
                   "settings; its task settings only for its own task) (default: none)")
    p.add_argument("--task", help="reasoning-gym task name, or toy_addition / champ "
                   "(default: the preset's task, else toy_addition)")
    p.add_argument("--task-config", help="JSON object of task generator settings, e.g. "
                   "'{\"min_terms\": 2, \"max_terms\": 2}' (default: the task's own defaults)")
    p.add_argument("--data", help="a .jsonl/.json/.parquet file or a saved `datasets` folder (default: none)")
    p.add_argument("--reward", help="reward kind or module:function (default: the preset's for its own "
                   "task, else the source's: reasoning_gym, math_verify or exact_match)")
    p.add_argument("--n", type=int, help="samples per problem (default: eval.samples, 1)")
    p.add_argument("--k", help="comma-separated k values for pass@k and maj@k (default: eval.k, 1)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N held-out problems "
                   "(default: 0 = all)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: eval.temperature, "
                   "0 = greedy; 1 when --n > 1 and that is 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: eval.top_p, 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default: "
                   "eval.max_new_tokens; 0 = the source's default: 256 for reasoning-gym, 512 for "
                   "CHAMP and files, 32 for toy_addition with a plain prompt)")
    p.add_argument("--batch", type=int, help="problems generated at once (default: eval.batch_size, 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config override, applied last (default: none)")
    p.add_argument("--samples-out", metavar="FILE.jsonl", help="write every prompt, response, answer "
                   "read, gold answer and reward here (default: none)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N samples (default: 0)")
    p.add_argument("--out", help="write the results as JSON here (default: none)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="run a grid of estimators x seeds, or read run folders, and "
                                       "write a table, plots and an HTML report")
    p.add_argument("config", nargs="?", help="preset or YAML for the grid (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run of the grid")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="compare these run folders (or folders "
                                                             "holding run folders) instead of running")
    p.add_argument("--passk", nargs="+", metavar="EVAL.json", help="plot pass@k against k from "
                                                                    "`opo eval --out` files")
    p.add_argument("--seeds", type=int, default=5, help="seeds per variant (trainer.seed)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; each gets cores/jobs threads")
    p.add_argument("--grid", default="estimators", choices=["estimators", "precision", "distill"],
                   help="estimators: opo, grpo, grpo_offpolicy, dr_grpo, rloo, opo_exact, opo_proxy; "
                   "precision: opo in fp32 (the reference), opo_bf16, opo_bf16_token-tis, opo_fp16; "
                   "distill (give algo.teacher=PATH): opo (RL alone), opo_distill, distill (teacher alone)")
    p.add_argument("--variants", default="", help="comma-separated subset of the chosen grid")
    p.add_argument("--reference", default="opo", help="variant the others are paired against")
    p.add_argument("--out", metavar="DIR", help="write DIR/report.html, DIR/table.json and the PNGs "
                                                "(and, for a grid, the runs in DIR/runs)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("variance", help="measure the policy-gradient variance under each reward "
                                        "baseline, with exact per-response gradients (small models)")
    p.add_argument("preset", nargs="?", help="preset or YAML for model, data, prompt and reward "
                                             "(default: tiny)")
    p.add_argument("--model", help="model path or built-in name (default: the preset's)")
    p.add_argument("--prompts", type=int, default=16, help="prompts (P)")
    p.add_argument("--groups", type=int, default=16, help="independent groups per prompt (M)")
    p.add_argument("--k", type=int, default=8, help="responses per group (K)")
    p.add_argument("--temperature", type=float, help="default: the preset's rollout.temperature")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: the preset's")
    p.add_argument("--split", choices=["train", "held_out"], default="train",
                   help="which problems supply the prompts")
    p.add_argument("--params", default="", metavar="REGEX",
                   help="only parameters whose name matches (for models too big for full "
                        "per-response gradients); default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    p.add_argument("--out", metavar="FILE.json", help="write every figure as JSON here")
    p.set_defaults(func=cmd_variance)

    p = sub.add_parser("toy-base", help="rebuild the tiny preset's warm-started weights")
    p.add_argument("--out", help="output folder (default: the package's assets/tiny)")
    p.set_defaults(func=cmd_toy_base)

    p = sub.add_parser("config", help="print a resolved config, or every field with its documentation")
    p.add_argument("preset", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--fields", action="store_true", help="list every config key with its documentation")
    p.set_defaults(func=cmd_config)
    return parser


def _quiet_third_party() -> None:
    """transformers draws its own bars when loading and saving weights; ours is the one to read."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_third_party()
    from opo.checkpoint import CheckpointError
    from opo.data import DataError
    from opo.models import ModelError
    from opo.trainer import TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, CheckpointError, TrainingError) as exc:
        print(f"opo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

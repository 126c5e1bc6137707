"""Command line: `opo train`, `opo eval`, `opo toy-base`, `opo config`."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

from opo.config import ConfigError, apply_overrides, field_docs, list_presets, load_config

USAGE_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def _default_run_dir(cfg) -> str:
    return f"runs/{cfg.preset}-{cfg.algo.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"


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
        cfg.run.dir = cfg.run.dir or _default_run_dir(cfg)
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
    """The Config `opo eval` runs with: preset (or defaults), then flags, then --set.

    A preset's task settings (task_config, reward, instruction) belong to its own task: when
    --task/--data names a different one, those come from the new source's defaults instead
    (opo.data.SourceDefaults). Likewise its prompt template belongs to its model: another
    --model gets template auto (its chat template if it has one). Raises ConfigError for
    any bad flag.
    """
    from opo.config import Config
    from opo.data import SOURCES, source_defaults

    cfg = load_config(args.preset) if args.preset else Config()
    preset_task = (cfg.data.source, cfg.data.task) if args.preset else None
    if args.task and args.data:
        raise ConfigError("give --task or --data, not both")
    if args.task:
        builtin = args.task in SOURCES and args.task != "reasoning_gym"
        cfg.data.source, cfg.data.task = (args.task, "") if builtin else ("reasoning_gym", args.task)
    if args.data:
        cfg.data.source, cfg.data.task = args.data, ""
    if (cfg.data.source, cfg.data.task) != preset_task:
        defaults = source_defaults(cfg.data.source)
        cfg.data.task_config = {}
        cfg.reward.kind = defaults.reward
        cfg.prompt.instruction = defaults.instruction
    if args.task_config is not None:
        cfg.data.task_config = _parse_task_config(args.task_config)
    if args.reward:
        cfg.reward.kind = args.reward
    if args.model and args.model != cfg.model.path:
        cfg.model.path = args.model
        cfg.prompt.template = "auto"  # a preset's template suits its own model; a chat model gets its own
    if args.n is not None:
        cfg.eval.samples = args.n
    if args.k is not None:
        cfg.eval.k = _parse_k(args.k)
        cfg.eval.samples = max(cfg.eval.samples, *cfg.eval.k)
    if args.temperature is not None:
        cfg.eval.temperature = args.temperature
    elif cfg.eval.samples > 1 and cfg.eval.temperature == 0:
        cfg.eval.temperature = 1.0  # n identical greedy samples would measure nothing
    if args.top_p is not None:
        cfg.eval.top_p = args.top_p
    if args.max_new_tokens is not None:
        cfg.eval.max_new_tokens = args.max_new_tokens
    if args.batch is not None:
        cfg.eval.batch_size = args.batch
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit: use an integer >= 0 (0 = all held-out problems), got {args.limit}")
    if args.show < 0:
        raise ConfigError(f"--show: use an integer >= 0, got {args.show}")
    try:
        return apply_overrides(cfg, args.set)  # --set wins over everything; validates
    except ConfigError as exc:
        close = difflib.get_close_matches(args.task or "", [s for s in SOURCES if s != "reasoning_gym"], n=1)
        if args.task and close and args.task not in SOURCES:
            raise ConfigError(f"{exc} (or did you mean --task {close[0]}?)") from None
        raise


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
    import random

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from opo.data import load_split, uses_chat_template
    from opo.evaluate import eval_max_new_tokens, evaluate
    from opo.models import eos_ids, load_policy
    from opo.rewards import RewardScorer
    from opo.rollout import make_engine

    cfg = eval_config(args)
    split = load_split(cfg.data)
    held_out = split.held_out[:args.limit] if args.limit else split.held_out
    model, tokenizer = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)
    engine = make_engine(cfg.rollout.engine, model, tokenizer, eos_ids(model, tokenizer),
                         cfg.rollout.batch_size)
    max_new_tokens = eval_max_new_tokens(cfg, tokenizer)
    task = cfg.data.task or cfg.data.source
    template = "chat" if uses_chat_template(tokenizer, cfg.prompt) else "plain"
    print(f"opo eval: {cfg.model.path} on {task}, {len(held_out)} of {len(split.held_out)} held-out "
          f"problems; reward {cfg.reward.kind} (answer_format {cfg.reward.answer_format}), "
          f"{template} prompt, at most {max_new_tokens} new tokens", file=sys.stderr)
    if cfg.trainer.threads:  # --set trainer.threads=1 helps on a machine shared with other jobs
        torch.set_num_threads(cfg.trainer.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

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
        with RewardScorer.from_config(cfg.reward) as scorer, \
                tqdm(total=len(held_out), desc="opo eval", unit="problem") as bar:
            result = evaluate(engine, tokenizer, held_out, scorer, cfg.prompt, samples=cfg.eval.samples,
                              temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, k=cfg.eval.k,
                              max_new_tokens=max_new_tokens, chunk=cfg.eval.batch_size,
                              progress=lambda done, total: bar.update(done - bar.n), on_sample=on_sample)
    finally:
        if samples_file:
            samples_file.close()
    result.update(model=cfg.model.path, task=task, reward=cfg.reward.kind,
                  answer_format=cfg.reward.answer_format, prompt=template,
                  temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                  max_new_tokens=max_new_tokens, seed=args.seed)
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def cmd_toy_base(args) -> int:
    from opo.toy import ASSET_DIR, build_toy_base

    out = build_toy_base(args.out or ASSET_DIR)
    print(f"wrote the tiny model to {out}")
    return 0


def cmd_config(args) -> int:
    if args.fields:
        for key, text, default in field_docs():
            print(f"{key} = {default!r}\n    {text}")
        return 0
    from opo.config import dump_yaml

    print(dump_yaml(load_config(args.preset or "tiny", args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opo", description="On-policy RL with the optimal reward baseline.")
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

    p = sub.add_parser("toy-base", help="rebuild the tiny preset's warm-started weights")
    p.add_argument("--out", help="output folder (default: the package's assets/tiny)")
    p.set_defaults(func=cmd_toy_base)

    p = sub.add_parser("config", help="print a resolved config, or every field with its documentation")
    p.add_argument("preset", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--fields", action="store_true", help="list every config key with its documentation")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

"""opo: on-policy RL with the optimal reward baseline.

The Python API, for notebooks and scripts:

    import opo

    cfg = opo.load_config("tiny", ["trainer.steps=20"])     # a preset or YAML, then overrides
    summary = opo.train(cfg)                                 # or opo.train("tiny", ["trainer.steps=20"])
    result = opo.evaluate(summary["run_dir"] + "/final", task="toy_addition", limit=50)
    adv = opo.compute_advantages("opo", rewards, lengths, group_ids)

Names are imported on first use, so `import opo` stays cheap (the reward worker processes
import this package and must not pay for torch).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_config", "train", "evaluate", "compute_advantages", "__version__"]


def train(config="tiny", overrides: list[str] = (), *, resume: bool = False, log=print) -> dict:
    """Train and return the run's summary (also written to RUN_DIR/summary.json).

    config: a `Config` (from `load_config`), a preset name or a YAML path; `overrides` are
    dotted key=value strings applied on top. With resume=True, `config` is a run folder to
    continue from its latest checkpoint.
    """
    from opo.config import Config, apply_overrides, load_config
    from opo.trainer import load_run_config
    from opo.trainer import train as run_training

    if resume:
        cfg = load_run_config(config, list(overrides))
        cfg.run.dir = str(config)
    elif isinstance(config, Config):
        cfg = apply_overrides(config, list(overrides))
    else:
        cfg = load_config(config, list(overrides))
    return run_training(cfg, resume=resume, log=log)


def __getattr__(name: str):
    if name == "load_config":
        from opo.config import load_config

        return load_config
    if name == "evaluate":
        from opo.evaluation import evaluate_model

        return evaluate_model
    if name == "compute_advantages":
        from opo.advantages import compute_advantages

        return compute_advantages
    raise AttributeError(f"module 'opo' has no attribute {name!r}")

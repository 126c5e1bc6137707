"""Optional mirrors of metrics.jsonl: TensorBoard and Weights & Biases (`trainer.loggers`).

`metrics.jsonl` is always written and stays the record that `opo compare`, resume and the
summary read. A logger here receives each row right after it is appended there, with the
same field names and the row's `step` as the x-axis, so a curve in TensorBoard or W&B is
the same number as the line in the file. Only numbers are mirrored (a nested mapping is
flattened to `outer/inner`); text fields stay in the file alone.

Both packages are optional extras (`pip install 'opo[tensorboard]'`, `'opo[wandb]'`); asking
for one that is not installed is a config error that says what to install. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

from opo.schema import Config, ConfigError, require, to_dict

INSTALL = {"tensorboard": "pip install 'opo[tensorboard]'", "wandb": "pip install 'opo[wandb]'"}
LOGGERS = tuple(INSTALL)


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row, except `step`; nested mappings become `a/b`."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)):  # bool is an int: logged as 0/1
            out[key] = float(value)
    return out


def _not_installed(name: str, detail: str = "") -> ConfigError:
    return ConfigError(f"trainer.loggers: {name!r} needs the {name} package, which is not installed"
                       f"{detail}; install it with `{INSTALL[name]}`, or remove {name!r} from "
                       f"trainer.loggers")


def check_config(cfg: Config) -> None:
    """trainer.loggers names known loggers whose packages are installed (checked with the
    config, before any model is loaded or run folder written; opo.config runs this)."""
    for name in cfg.trainer.loggers:
        require(name in LOGGERS, "trainer.loggers", "use a list of " + " and/or ".join(LOGGERS),
                cfg.trainer.loggers)
    check_installed(cfg.trainer.loggers)


def check_installed(names: list) -> None:
    """ConfigError naming trainer.loggers when a named logger's package is not installed
    (checked with the config, before any model is loaded or run folder written)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise _not_installed(name)


def _require(name: str):
    """Import the package behind logger `name`; the same ConfigError if the import fails."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            return SummaryWriter
        import wandb
        return wandb
    except ImportError as exc:
        raise _not_installed(name, f" ({exc})") from None


class TensorBoardLogger:
    """Event files in RUN/tensorboard; flushed after every row, so a killed run keeps its curves."""

    def __init__(self, run_dir: Path, resumed_step: int):
        summary_writer = _require("tensorboard")
        # On resume, rows after the checkpoint's step are trained again and rewritten in
        # metrics.jsonl; purge_step makes TensorBoard drop the old events for those steps too.
        self.writer = summary_writer(log_dir=str(run_dir / "tensorboard"),
                                     purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()

    def log_samples(self, step: int, records: list[dict]) -> None:
        """The step's samples as one markdown table in TensorBoard's Text tab."""
        columns = list(records[0])
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in records]
        self.writer.add_text("samples", "\n".join(lines), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in RUN/wandb, offline unless trainer.wandb_mode=online.

    The W&B run id is kept in RUN/wandb_id, so a resumed opo run continues the same W&B run
    (offline runs are joined when uploaded with `wandb sync`). Like metrics.jsonl, a resumed
    run logs again the steps between its checkpoint and the moment the earlier process died."""

    def __init__(self, run_dir: Path, cfg: Config, resumed_step: int):
        wandb = _require("wandb")
        id_file = run_dir / "wandb_id"
        if resumed_step and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids are short [a-z0-9] strings
            id_file.write_text(run_id + "\n")
        # console="off": W&B would otherwise wrap stdout, which the progress bar writes to.
        try:
            self.run = wandb.init(project=cfg.trainer.wandb_project, name=run_dir.name, id=run_id,
                                  resume="allow", dir=str(run_dir), mode=cfg.trainer.wandb_mode,
                                  config=to_dict(cfg), settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # no network, no login, a bad project name: W&B's own errors vary
            raise ConfigError(f"trainer.loggers: W&B could not start (trainer.wandb_mode={cfg.trainer.wandb_mode}) "
                              f"({type(exc).__name__}: {exc}); trainer.wandb_mode=offline needs no "
                              f"network or account") from None

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def log_samples(self, step: int, records: list[dict]) -> None:
        import wandb

        columns = list(records[0])
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The loggers named in trainer.loggers; `log` and `close` go to each of them."""

    def __init__(self, loggers: list | None = None):
        self.loggers = list(loggers or [])

    @classmethod
    def from_config(cls, cfg: Config, run_dir: Path, resumed_step: int = 0, is_main: bool = True) -> Loggers:
        if not is_main:
            return cls()
        made = []
        for name in cfg.trainer.loggers:
            made.append(TensorBoardLogger(run_dir, resumed_step) if name == "tensorboard"
                        else WandbLogger(run_dir, cfg, resumed_step))
        return cls(made)

    def log(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def log_samples(self, step: int, records: list[dict]) -> None:
        for logger in self.loggers:
            logger.log_samples(step, records)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

"""What a person sees while a run trains: the progress bar or per-step lines, the phase
profile, and the SIGINT/SIGTERM handling that lets a run stop cleanly between steps."""

from __future__ import annotations

import signal


def print_profile(run) -> None:
    """The median seconds of each phase of a step, from the run's metrics rows."""
    rows = [r for r in run.state.rows if r.get("step", 0) > 0]
    names = sorted({k for r in rows for k in r if k.startswith("time_")})
    run.log("seconds per step by phase (median over steps):")
    for name in names + ["seconds"]:
        values = sorted(r[name] for r in rows if name in r)
        if values:
            run.log(f"  {name.removeprefix('time_'):<14}{values[len(values) // 2]:8.3f}")


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.announce:
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def progress_bar(cfg, initial: int, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.steps, initial=initial, disable=not (cfg.trainer.progress and show),
                desc="opo train", unit="step", dynamic_ncols=True)


def report_progress(run, row: dict, bar) -> None:
    held = next((r["eval_accuracy"] for r in reversed(run.state.rows) if "eval_accuracy" in r), None)
    parts = {"reward": f"{row['reward_mean']:.3f}", "train_acc": f"{row['accuracy']:.3f}"}
    if held is not None:
        parts["heldout_acc"] = f"{held:.3f}"
    bar.update(1)
    bar.set_postfix(parts)
    cfg = run.cfg.trainer
    if not cfg.progress and (row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps):
        text = " ".join(f"{k} {v}" for k, v in parts.items())
        run.log(f"step {row['step']}/{cfg.steps} {text} {row['seconds']:.2f}s")

"""Atomic checkpoints and exact resume.

A checkpoint is a folder RUN_DIR/checkpoints/step_N/ holding

    model.safetensors      the weights (the fp32 master weights under mixed precision); with
                           frozen parameters (LoRA) only the trainable ones, since the
                           frozen base is reloaded bit-identical from model.path on resume
    config.json, tokenizer files, generation_config.json
                           so the folder also loads as a model (from_pretrained, opo eval);
                           with LoRA instead adapter/, a peft adapter folder (see opo.lora)
    optimizer.pt           optimiser state (tensors and numbers only; loaded weights_only=True)
    tensors.safetensors    torch RNG states and the KL probe
    trainer_state.json     step, policy version, data-sampler position, scheduler state,
                           python/numpy RNG states, the metrics rows so far; under data
                           parallelism also every other rank's RNG states

Weights and optimiser state are always the full (unsharded) ones in torch's own layout,
so a checkpoint written by N data-parallel processes loads in one process and back.

It is written into a hidden temporary folder, every file is fsync'd, and only then is
the folder renamed to step_N, so a folder with that name is always complete. Nothing
is ever unpickled except through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from opo import lora

STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "tensors.safetensors", "trainer_state.json")


# transformers 4.x refuses a safetensors file without this tag as a model's weights.
PT_FORMAT = {"format": "pt"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


@dataclass
class RunState:
    """Everything besides weights and optimiser that a checkpoint must restore."""

    step: int = 0                 # rollout batches done
    policy_version: int = 0       # optimiser steps applied to the weights
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    no_signal_in_row: int = 0     # consecutive steps where every group's rewards were equal
    initial_accuracy: float = float("nan")
    sampler: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    wall_seconds: float = 0.0
    world_size: int = 1           # data-parallel processes that wrote the checkpoint
    grad_scaler: dict = field(default_factory=dict)  # float16's gradient scale (opo.precision)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every RNG the run draws from: JSON-able parts and tensor parts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    return plain, tensors


def rng_to_json(plain: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """`rng_state()` as one JSON-able object (RNG states are small byte tensors)."""
    return {"plain": plain, "tensors": {k: v.tolist() for k, v in tensors.items()}}


def rng_from_json(obj: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    return obj["plain"], {k: torch.tensor(v, dtype=torch.uint8) for k, v in obj["tensors"].items()}


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, step: int, *, model, optimizer, state: dict,
                    tensors: dict[str, torch.Tensor], keep: int, tokenizer=None,
                    weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write step `step` atomically. `weights` / `optimizer_state`, when given (gathered
    from shards, see opo.parallel), are written instead of `model` / `optimizer`'s own."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        trainable = _trainable_only(model)
        if weights is not None:  # gathered by opo.parallel (FSDP2 shards)
            save_file(weights, str(tmp / "model.safetensors"), metadata=PT_FORMAT)
        elif trainable is not None:  # LoRA: only the adapters; the base comes from model.path
            save_file(trainable, str(tmp / "model.safetensors"), metadata=PT_FORMAT)
        else:
            save_model(model, str(tmp / "model.safetensors"), metadata=PT_FORMAT)
        _save_torch(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                    tmp / "optimizer.pt")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "tensors.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        write_model_files(tmp, model, tokenizer)
        for name in FILES:
            _fsync(tmp / name)
        _fsync(tmp)
        replace_folder(tmp, final)  # re-saving a step after a resume keeps the old one until then
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for s, p in list_checkpoints(run_dir) if s != step]
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write the checkpoint for step {step} in {root}: "
                              f"{exc.strerror or exc}{kept}") from exc
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_torch(obj, path: Path) -> None:
    """torch.save, with a failed write reported as the OSError it is: torch's zip writer
    raises a RuntimeError ("[enforce fail at inline_container.cc:...] unexpected pos ...")
    when the disk fills up under it."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        raise OSError(f"writing {path.name} failed, is the disk full? ({exc})") from exc


def lock_run_dir(run_dir: Path):
    """Claim `run_dir` for this process: an open file holding an exclusive `flock` on
    RUN/.lock, released when it is closed or the process ends (so a killed run's lock never
    blocks its resume). A folder another live process holds is a CheckpointError naming it.
    Under torchrun rank 0 alone takes it: one lock per run, not per rank."""
    import fcntl
    import socket

    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run.dir {run_dir} is a file, not a folder; choose another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+", encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot use run.dir {run_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(f"{run_dir} is in use by a running opo process ({owner}); wait for it to "
                              f"end or stop it, or choose another run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the `.step_N.tmp<pid>` folders of saves whose process is gone (killed in the
    middle of a write); a live process's folder is left alone. Returns what was removed."""
    removed = []
    for folder in root.glob(".step_*.tmp*"):
        pid = folder.name.rpartition(".tmp")[2]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def load_checkpoint(path: str | Path, *, model=None, optimizer=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimiser in place (each skipped when None); return (trainer
    state, extra tensors)."""
    path = Path(path)
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
        if model is not None:
            trainable = _trainable_only(model)
            if trainable is None:
                missing_keys, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            else:  # frozen parameters come from model.path; the file holds the trained ones
                saved = load_file(str(path / "model.safetensors"))
                missing_keys, unexpected = set(trainable) - set(saved), set(saved) - set(trainable)
                if not (missing_keys or unexpected):
                    model.load_state_dict(saved, strict=False)
            if unexpected or missing_keys:
                raise CheckpointError(f"checkpoint {path} does not match the model: missing "
                                      f"{sorted(missing_keys)[:3]}, unexpected {sorted(unexpected)[:3]}")
        if optimizer is not None:
            optimizer.load_state_dict(read_optimizer_state(path))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: "
                              f"{type(exc).__name__}: {exc}") from exc
    return state, tensors


def read_optimizer_state(path: str | Path) -> dict:
    """The optimiser state of checkpoint `path`, in torch's layout, on the CPU."""
    try:
        return torch.load(Path(path) / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: optimizer.pt: "
                              f"{type(exc).__name__}: {exc}") from exc


def latest_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run folder {run_dir} does not exist")
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"cannot resume: {run_dir} has no checkpoints (expected "
                              f"{run_dir}/checkpoints/step_N; set checkpoint.every > 0)")
    return found[-1][1]


def _trainable_only(model) -> dict[str, torch.Tensor] | None:
    """The trainable parameters when some are frozen (LoRA), else None (save the whole module)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return None
    return {n: p.detach().cpu().contiguous() for n, p in params.items() if p.requires_grad}


def write_model_files(folder: Path, model, tokenizer=None) -> None:
    """config.json, generation_config.json and the tokenizer beside model.safetensors, so that
    a checkpoint folder loads with `from_pretrained` and `opo eval --model` like `final/`.
    A LoRA model gets adapter/ instead of config.json: its model.safetensors holds only the
    adapters, so it must not look like a complete model."""
    config = getattr(model, "config", None)
    if lora.is_lora(model):
        lora.save_adapter(model, folder / "adapter")
    elif config is not None:
        config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final`; the old `final` is removed only once the new
    one is in place, so a crash at any moment leaves one complete folder behind."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_run(run_dir: str | Path, keep: int, state: RunState, model, tokenizer, optimizer, scheduler,
             sampler, tensors: dict[str, torch.Tensor], *, weights: dict[str, torch.Tensor] | None = None,
             optimizer_state: dict | None = None, other_rank_rngs: list[dict] = ()) -> Path:
    """Checkpoint a whole run at `state.step`: weights, optimiser, scheduler, sampler, every
    RNG, the metrics so far, and any extra tensors (the KL probe). Under data parallelism
    rank 0 calls this with the gathered `weights` / `optimizer_state` (FSDP2) and the
    other ranks' RNG states (`rng_to_json` form, rank 1 first)."""
    state.sampler = sampler.state_dict()
    state.scheduler = scheduler.state_dict()
    rng_plain, rng_tensors = rng_state()
    payload = {**state.__dict__, "rng": rng_plain, "rng_other_ranks": list(other_rank_rngs)}
    return save_checkpoint(run_dir, state.step, model=model, optimizer=optimizer, state=payload,
                           tensors={**rng_tensors, **tensors}, keep=keep, tokenizer=tokenizer,
                           weights=weights, optimizer_state=optimizer_state)


def restore_run(run_dir: str | Path, model, optimizer, scheduler, sampler, *, rank: int = 0,
                write_metrics: bool = True) -> tuple[RunState, dict]:
    """Load the latest checkpoint into model and optimiser (each skipped when None),
    scheduler, sampler and rank `rank`'s RNGs; return the run state and the extra tensors.
    A rank the checkpoint has no RNG state for keeps its own. With `write_metrics`,
    metrics.jsonl is rewritten to the rows the checkpoint knows: rows logged after it by
    the interrupted run are replayed."""
    run_dir = Path(run_dir)
    path = latest_checkpoint(run_dir)
    payload, tensors = load_checkpoint(path, model=model, optimizer=optimizer)
    others = payload.pop("rng_other_ranks", [])
    if rank == 0:
        set_rng_state(payload.pop("rng"), tensors)
    elif rank <= len(others):
        set_rng_state(*rng_from_json(others[rank - 1]))
    known = {f for f in RunState.__dataclass_fields__}
    state = RunState(**{k: v for k, v in payload.items() if k in known})
    sampler.load_state_dict(state.sampler)
    scheduler.load_state_dict(state.scheduler)
    if write_metrics:
        tmp = run_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in state.rows))
        os.replace(tmp, run_dir / "metrics.jsonl")
    extra = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return state, extra

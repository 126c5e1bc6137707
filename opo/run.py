"""A run's pieces and how they are put together: model, data, reward, engine, optimiser,
checkpoint restore. `opo.trainer` decides the order of the steps; this module only builds
and holds what the steps use, and offers the few operations they share (sample, score,
evaluate, save).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opo import checkpoint as ckpt
from opo import lora, parallel
from opo.advantages import estimator_needs
from opo.checkpoint import RunState
from opo.config import Config, apply_overrides, dump_yaml, from_dict, read_yaml
from opo.data import PromptSampler, derive_seed, encode_prompts, load_split
from opo.distill import same_tokenizer
from opo.evaluation import evaluate
from opo.loggers import Loggers
from opo.metrics import KLProbe
from opo.models import ModelError, load_policy, pick_device
from opo.precision import Precision
from opo.rewards import RewardScorer
from opo.rollout import SamplingParams, engine_from_config
from opo.sequences import batched_logprobs, pack
from opo.update import sampling_dist


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class Run:
    """Everything a run holds while it trains; built once by `set_up`."""

    cfg: Config
    dir: Path
    model: torch.nn.Module
    tokenizer: object
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scorer: RewardScorer
    train_set: list
    held_out: list
    sampler: PromptSampler
    state: RunState
    probe: KLProbe | None
    ref_model: torch.nn.Module | None
    log: object
    world: parallel.World
    policy: torch.nn.Module  # what is scored and optimised: `model`, or its DDP/FSDP2 wrapper
    resumed: bool  # restored from a checkpoint (--resume, or a torchrun restart)
    precision: Precision = field(default_factory=Precision)  # every policy forward runs under it
    loggers: Loggers = field(default_factory=Loggers)  # trainer.loggers: mirrors of metrics.jsonl
    lock: object = None  # rank 0's hold on RUN/.lock (checkpoint.lock_run_dir), released by `release`
    teacher: torch.nn.Module | None = None  # algo.teacher, frozen (sharded under fsdp), or None

    def release(self) -> None:
        """Give back what the run holds beyond its memory: the engine, the run folder's lock."""
        self.engine.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, max_new_tokens=r.max_new_tokens)

    def logprobs(self, packed):
        a = self.cfg.algo
        with self.precision.autocast():
            return batched_logprobs(self.policy, packed, sampling_dist(self.cfg), max_rows=a.micro_batch_size,
                                    max_tokens=a.max_tokens_per_micro_batch, chunk_tokens=a.logprob_chunk_size,
                                    same_count=self.world.same_count)

    def generate(self, prompt_ids, params: SamplingParams, *, main_only: bool = False):
        """Sample from the policy (on rank 0 alone with main_only; None elsewhere)."""
        with self._engine_weights(), self.precision.autocast():  # the loss forward's autocast
            return self.engine.generate(prompt_ids, params) if self.world.is_main or not main_only else None

    def _engine_weights(self):
        """Full parameters for an engine that generates with the policy module (FSDP2 gathers
        them); nothing for one that holds its own copy (vLLM, refreshed by sync_weights)."""
        return parallel.gathered(self.policy) if self.engine.samples_from_policy else contextlib.nullcontext()

    def evaluate(self) -> dict:
        """Held-out evaluation, each rank on its part of the problems; means over all of them."""
        e, mine = self.cfg.eval, self.world.split(self.held_out)
        with self._engine_weights(), self.precision.autocast():
            result = evaluate(self.engine, self.tokenizer, mine, self.scorer, self.cfg.prompt,
                              samples=e.samples, temperature=e.temperature, top_p=e.top_p, k=e.k,
                              max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                              chunk=e.batch_size) if mine else {}
        return self.world.mean_over_ranks(result, len(mine), totals=("problems", "reward_errors"))

    def save(self) -> None:
        """A checkpoint; every rank takes part (FSDP2 gathers, every rank's RNG state is kept)."""
        self.state.grad_scaler = self.precision.state_dict()
        weights = parallel.full_weights(self.world, self.policy)
        optimizer_state = parallel.optimizer_state(self.world, self.policy, self.optimizer)
        rngs = self.world.all_gather_json(ckpt.rng_to_json(*ckpt.rng_state()))
        # Every rank waits for rank 0's write and learns how it went: no rank runs ahead into
        # the next step's collectives, and a failed write stops all of them with its message.
        self.world.on_main(lambda: ckpt.save_run(
            self.dir, self.cfg.checkpoint.keep, self.state, self.model, self.tokenizer, self.optimizer,
            self.scheduler, self.sampler, self.probe.state_dict() if self.probe else {}, weights=weights,
            optimizer_state=optimizer_state, other_rank_rngs=rngs[1:]), ckpt.CheckpointError)


def fused_adamw(params) -> bool:
    """Whether AdamW can take its single-kernel path for `params`: float tensors (FSDP2's DTensor
    shards too) on a CPU or CUDA device. It updates the same way in one pass over the state
    instead of a dozen (SmolLM2's 135M parameters on 2 CPU cores: 0.08 s a step against 0.35 s
    for the default), and every process layout takes the same path, so a sharded step stays
    equal to the single-process one."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def lr_lambda(cfg: Config):
    warm, total, kind = cfg.optim.warmup_steps, max(cfg.trainer.steps, 1), cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]
    return factor


def default_run_dir(cfg: Config) -> str:
    return f"runs/{cfg.preset}-{cfg.algo.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_up(cfg: Config, resume: bool, log, world: parallel.World = parallel.SINGLE) -> Run:
    """Load model, data, reward, engine and optimiser; restore a checkpoint when resuming."""
    parallel.check_config(world, cfg)
    if estimator_needs(cfg.algo.estimator) and world.size > 1 and cfg.trainer.parallel == "fsdp":
        raise TrainingError(f"algo.estimator={cfg.algo.estimator} takes per-response gradients of the "
                            f"whole model, which FSDP2 shards; use trainer.parallel=ddp")
    # An empty run.dir gets a name with a timestamp; every rank uses rank 0's.
    cfg.run.dir = world.broadcast_json(cfg.run.dir or default_run_dir(cfg))
    run_dir = Path(cfg.run.dir)
    lock = world.on_main(lambda: ckpt.lock_run_dir(run_dir), ckpt.CheckpointError)  # one process per run folder
    try:
        run = _set_up_in(run_dir, cfg, resume, log, world)
    except BaseException:
        # A set-up that fails gives the folder back now, not when its traceback is collected
        # (an interactive session keeps that alive, and a retry would find the folder "in use").
        if lock is not None:
            lock.close()
        raise
    run.lock = lock
    return run


def _set_up_in(run_dir: Path, cfg: Config, resume: bool, log, world: parallel.World) -> Run:
    """The rest of `set_up`, once this process holds `run_dir`."""
    if not resume and ckpt.list_checkpoints(run_dir):
        if not parallel.restart_count():
            raise TrainingError(f"{run_dir} already holds checkpoints; continue it with "
                                f"`opo train --resume {run_dir}` or choose another run.dir")
        # torchrun --max-restarts started the group again after a rank died: carry on from
        # the latest checkpoint, as `--resume` would (the command line is the same one).
        resume = True
        log(f"torchrun restart {parallel.restart_count()}: resuming {run_dir} from its latest checkpoint")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if pick_device(world.device).type == "cpu":
        # With 2+ threads the backward of the shared-prompt gathers (opo.sequences) otherwise
        # accumulates in an order that varies from call to call, so runs of one seed drift
        # apart (~1e-9 after a step). The deterministic kernels cost nothing measurable here;
        # warn_only keeps an op without one from stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Rank 0 keeps the single-process seed; other ranks sample their own responses.
    seed_everything(cfg.trainer.seed if world.is_main else derive_seed(cfg.trainer.seed, f"rank {world.rank}"))
    split = load_split(cfg.data)
    train_set, held_out = split.train, split.held_out
    log(split.summary())
    scorer = RewardScorer.from_config(cfg.reward)
    # Mixed precision: fp32 master weights, low-precision compute under autocast (opo.precision).
    precision = Precision.from_config(cfg.model, pick_device(world.device))
    model, tokenizer = load_policy(cfg.model.path, precision.param_dtype, world.device, cfg.model.cache_dir)
    if cfg.model.lora.r:  # adapters injected in place: engines and scorer call the same module
        lora.attach(model, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules)
    if cfg.model.gradient_checkpointing:
        # HF only checkpoints activations in train() mode; dropout is off (see load_policy),
        # so train() and eval() compute the same function and sampling stays on-policy.
        # Non-reentrant: gradients reach LoRA adapters even though the embeddings are frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ref_model = None
    if cfg.algo.kl_coef > 0:  # only then does a second copy of the model live in memory
        ref_model = load_policy(cfg.model.path, precision.param_dtype, world.device, cfg.model.cache_dir)[0]
        ref_model.requires_grad_(False)
    teacher = load_teacher(cfg, tokenizer, precision, world, log) if cfg.algo.teacher else None
    _warn_unknown_tokens(tokenizer, train_set, cfg, log)
    checkpoint = ckpt.latest_checkpoint(run_dir) if resume else None
    if checkpoint:  # the full weights, on every rank, before any sharding
        ckpt.load_checkpoint(checkpoint, model=model)
    policy = parallel.wrap(model, world, cfg.trainer.parallel, precision.fsdp_policy())
    engine = engine_from_config(cfg, model, tokenizer, log)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay, fused=fused_adamw(trainable))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    run = Run(cfg, run_dir, model, tokenizer, engine, optimizer, scheduler, scorer, train_set, held_out,
              PromptSampler(len(train_set), cfg.trainer.seed), RunState(), None, ref_model, log, world, policy,
              checkpoint is not None, precision, teacher=teacher)
    if checkpoint:
        run.state, tensors = ckpt.restore_run(run_dir, None, None, scheduler, run.sampler, rank=world.rank,
                                              write_metrics=world.is_main)
        parallel.load_optimizer_state(world, policy, optimizer, lambda: ckpt.read_optimizer_state(checkpoint))
        run.probe = KLProbe.from_state_dict(tensors) if "probe.logp0" in tensors else None
        precision.load_state_dict(run.state.grad_scaler)
        if world.is_main:
            _keep_samples_up_to(run_dir, run.state.step)
        engine.sync_weights(model, run.state.policy_version)
        log(f"resumed {run_dir} at step {run.state.step}")
        if run.state.world_size != world.size:
            log(f"note: the checkpoint was written by {run.state.world_size} process(es), this run has "
                f"{world.size}: training continues correctly, but does not replay the samples an "
                f"uninterrupted run would have drawn")
    else:
        if world.is_main:
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (run_dir / "metrics.jsonl").write_text("")
            (run_dir / "samples.jsonl").write_text("")
        run.probe = make_probe(run)
    run.state.world_size = world.size
    run.loggers = Loggers.from_config(cfg, run_dir, run.state.step if checkpoint else 0, world.is_main)
    return run


def _warn_unknown_tokens(tokenizer, train_set, cfg: Config, log) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    _, ids = encode_prompts(tokenizer, [ex["question"] for ex in train_set[:64]], cfg.prompt)
    total = sum(map(len, ids))
    unknown = sum(row.count(unk) for row in ids)
    if unknown:
        log(f"warning: {unknown} of {total} prompt tokens in the first {len(ids)} training prompts map "
            f"to the tokenizer's unknown token: the model cannot read these prompts "
            f"(model.path={cfg.model.path}).")


def load_teacher(cfg: Config, student_tokenizer, precision: Precision, world: parallel.World,
                 log) -> torch.nn.Module:
    """algo.teacher in the compute dtype, frozen; its tokenizer must be the student's.

    Under fsdp it is sharded like the policy (its layers are gathered one at a time for
    each forward), under ddp every rank holds a whole copy; it never has gradients or
    optimiser state, so it costs its weights (P_teacher x bytes of model.dtype) and the
    activations of one no-grad forward per micro-batch."""
    path = cfg.algo.teacher
    try:
        teacher, teacher_tokenizer = load_policy(path, cfg.model.dtype, world.device, cfg.model.cache_dir)
    except ModelError as exc:
        raise TrainingError(f"algo.teacher: {exc}") from None
    why = same_tokenizer(student_tokenizer, teacher_tokenizer)
    if why:
        raise TrainingError(f"algo.teacher {path!r} does not share model.path's tokenizer: {why}. The "
                            f"teacher scores the student's token ids as they are, so it needs the same "
                            f"tokenizer; distil from a teacher of the same family")
    teacher.requires_grad_(False)
    teacher.eval()
    params = sum(p.numel() for p in teacher.parameters())
    log(f"teacher {path}: {params / 1e6:.1f}M parameters in {cfg.model.dtype}, scoring only")
    if cfg.trainer.parallel == "fsdp" and world.size > 1:
        return parallel.wrap(teacher, world, "fsdp", precision.fsdp_policy())
    return teacher


def make_probe(run: Run) -> KLProbe | None:
    """Sample the fixed KL probe from the starting policy, with the rollout's sampling settings."""
    n = run.cfg.metrics.kl_probe_size
    if n == 0:
        return None
    _, ids = encode_prompts(run.tokenizer, [ex["question"] for ex in run.train_set[:n]], run.cfg.prompt)
    params = SamplingParams(**{**run.sampling().__dict__, "n": 1})
    batch = run.generate(ids, params, main_only=True)  # rank 0 samples; every rank keeps the same probe
    prompt_ids, response_ids = run.world.broadcast_json(None if batch is None else [batch.prompt_ids,
                                                                                    batch.response_ids])
    packed = pack(prompt_ids, response_ids, run.tokenizer.pad_token_id)
    return KLProbe(packed, run.logprobs(packed).cpu())


def write_row(run: Run, row: dict) -> None:
    run.state.rows.append(row)
    if run.world.is_main:
        with open(run.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        run.loggers.log(row)  # after the file: metrics.jsonl stays the record


def write_samples(run: Run, records: list[dict]) -> None:
    """Append this step's sampled responses to RUN/samples.jsonl (rank 0; see train_step)."""
    if run.world.is_main and records:
        with open(run.dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        run.loggers.log_samples(records[0]["step"], records)


def _keep_samples_up_to(run_dir: Path, step: int) -> None:
    """On resume the steps after the checkpoint are trained again: drop their old samples."""
    path = run_dir / "samples.jsonl"
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def save_final(run: Run) -> None:
    weights = parallel.full_weights(run.world, run.policy)  # FSDP2: gathered on rank 0; else None
    if not run.world.is_main:
        return
    tmp = run.dir / "final.tmp"
    ckpt.shutil.rmtree(tmp, ignore_errors=True)
    if lora.is_lora(run.model):
        lora.save_final(run.model, tmp, merge=run.cfg.model.lora.merge_on_save)
    else:
        run.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    run.tokenizer.save_pretrained(tmp)
    ckpt.replace_folder(tmp, run.dir / "final")


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The resolved config of an existing run, with optional overrides (e.g. more steps)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ckpt.CheckpointError(f"cannot resume: {path} does not exist")
    return apply_overrides(from_dict(read_yaml(path)), overrides)

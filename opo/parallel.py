"""Data parallelism: process groups, whole-group sharing of a batch, reductions, DDP/FSDP2.

One process per GPU (or per CPU process, under gloo), started by torchrun:

    torchrun --standalone --nproc_per_node N -m opo train [CONFIG] [key=value ...]

Every rank draws the same global batch of prompts and keeps its own contiguous share of
whole prompts (`World.share`), so the K responses of a prompt never straddle two ranks
and group baselines are exact. Everything the update and the metrics need from the
whole batch is reduced here: rewards and lengths for batch-level estimators
(`World.gather`), the token count that the token-mean loss divides by, the log-prob
mismatch, the NaN/inf verdict and the metric sums (`World.sum` / `max` / `any`). Each
rank's loss is its own tokens' share of the global token-mean, so the sum of the ranks'
gradients is the single-process gradient on the global batch; DDP and FSDP2 average
over ranks, hence the trainer scales the loss by the world size before backward.

A run without torchrun goes through the same code with a `World` of size 1 and no
process group: every reduction returns its input and `wrap` returns the model itself.

The trainer calls this module; this module never imports the trainer.
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opo.models import is_sharded
from opo.schema import ConfigError
from opo.sequences import Dist, Packed, ScoreModule

PARALLEL_KINDS = ("ddp", "fsdp")


@dataclass
class World:
    """This process's place among the data-parallel ranks.

    `device` is the model.device spec this rank loads the model on (under torchrun with
    CUDA: cuda:LOCAL_RANK). `owns_group` says whether `init` created the process group
    (and `shutdown` should destroy it).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "auto"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ reductions

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def _reduce(self, values, op) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, *values: float):
        """Sum of each value over ranks: a float for one value, a tuple for several."""
        out = list(map(float, values)) if self.size == 1 else self._reduce(values, dist.ReduceOp.SUM)
        return out[0] if len(out) == 1 else tuple(out)

    def max(self, *values: float):
        """Maximum of each value over ranks: a float for one value, a tuple for several."""
        out = list(map(float, values)) if self.size == 1 else self._reduce(values, dist.ReduceOp.MAX)
        return out[0] if len(out) == 1 else tuple(out)

    def any(self, *flags: bool):
        """True for each flag that is set on at least one rank (so all ranks decide alike)."""
        out = [bool(v) for v in (flags if self.size == 1 else self._reduce(flags, dist.ReduceOp.MAX))]
        return out[0] if len(out) == 1 else tuple(out)

    def mean_over_ranks(self, values: dict, weight: float, totals: tuple[str, ...] = ()) -> dict:
        """The numbers in rank 0's `values`, averaged over ranks weighted by `weight` (e.g.
        problems evaluated), except the keys in `totals`, which are summed. A rank with
        weight 0 may pass {}. With one rank `values` come back unchanged."""
        if self.size == 1:
            return values
        keys = self.broadcast_json([k for k, v in values.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)])
        sums = self.sum(weight, *(values.get(k, 0) * (1 if k in totals else weight) for k in keys))
        sums = sums if isinstance(sums, tuple) else (sums,)
        return {k: type(values[k])(v) if k in totals else v / sums[0] for k, v in zip(keys, sums[1:])}

    def gather(self, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concatenate 1-D tensors of equal length on every rank, in rank order.

        Each column keeps its dtype (the float64 transport is exact for float32 values
        and for integers below 2**53). With one rank the inputs come back unchanged.
        """
        if self.size == 1:
            return columns
        local = torch.stack([c.detach().to("cpu", torch.float64) for c in columns], dim=1)
        parts = [torch.empty_like(local, device=self._comm_device()) for _ in range(self.size)]
        dist.all_gather(parts, local.to(self._comm_device()))
        full = torch.cat(parts).cpu()
        return tuple(full[:, i].to(c.dtype).to(c.device) for i, c in enumerate(columns))

    def local_part(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor built by `gather` (all ranks hold equally many)."""
        if self.size == 1:
            return full
        n = full.shape[0] // self.size
        return full[self.rank * n:(self.rank + 1) * n]

    def share(self, items: list) -> list:
        """This rank's contiguous share of a list whose length the world size divides."""
        if len(items) % self.size:
            raise ValueError(f"cannot share {len(items)} items equally among {self.size} ranks")
        n = len(items) // self.size
        return items[self.rank * n:(self.rank + 1) * n]

    def split(self, items: list) -> list:
        """This rank's contiguous part of a list of any length (parts differ by at most one)."""
        base, extra = divmod(len(items), self.size)
        lo = self.rank * base + min(self.rank, extra)
        return items[lo:lo + base + (self.rank < extra)]

    def all_gather_json(self, obj) -> list:
        """Every rank's JSON-able `obj`, in rank order, on every rank (no pickling)."""
        if self.size == 1:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        dev = self._comm_device()
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], device=dev))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8, device=dev)
        padded[:data.numel()] = data.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return [json.loads(p[:int(s.item())].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]

    def broadcast_json(self, obj):
        """Rank 0's JSON-able `obj` on every rank (what other ranks pass is ignored)."""
        if self.size == 1:
            return obj
        dev = self._comm_device()
        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(size, 0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        return json.loads(buf.cpu().numpy().tobytes())

    def on_main(self, action, error: type[Exception]):
        """`action()` on rank 0 alone, its result there (None elsewhere), and a barrier: an
        `error` it raises is raised on every rank with rank 0's message, so no rank goes on
        into collectives that a stopped rank 0 will never join."""
        result, failure = None, None
        if self.is_main:
            try:
                result = action()
            except error as exc:
                failure = str(exc)
        failure = self.broadcast_json(failure)
        if failure:
            raise error(failure)
        return result

    # ------------------------------------------------------------------ micro-batches

    def same_count(self, plan: list[list[int]]) -> list[list[int]]:
        """A micro-batch plan with as many micro-batches as the longest plan of any rank.

        FSDP2 all-gathers parameters in every forward and reduce-scatters in every
        backward, so ranks must run equally many; a rank with fewer micro-batches splits
        its largest ones (which only lowers their token counts). This needs every rank to
        hold at least as many rows as the longest plan has micro-batches, which holds when
        ranks hold equally many rows (they do: see `share`).
        """
        if self.size == 1:
            return plan
        plan = [list(idx) for idx in plan]
        target = int(self.max(len(plan)))
        while len(plan) < target:
            i = max(range(len(plan)), key=lambda j: len(plan[j]))
            if len(plan[i]) < 2:
                raise RuntimeError(f"rank {self.rank} has {sum(map(len, plan))} rows, too few for "
                                   f"the {target} micro-batches another rank needs")
            half = len(plan[i]) // 2
            plan[i:i + 1] = [plan[i][:half], plan[i][half:]]
        return plan

    def micro_batches(self, model, plan: list[list[int]]):
        """Yield `same_count(plan)`; under DDP every micro-batch but the last runs in
        `no_sync`, so gradients are all-reduced once per optimiser step.

        The loop body (forward and backward) runs inside that context, as DDP decides at
        forward time whether the coming backward synchronises. FSDP2 reduce-scatters after
        every micro-batch instead: gradients stay sharded (its point), for more traffic.
        """
        plan = self.same_count(plan)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        for i, idx in enumerate(plan):
            with model.no_sync() if ddp and i < len(plan) - 1 else nullcontext():
                yield idx


SINGLE = World()


# ---------------------------------------------------------------------- process group

def init(device: str = "auto", timeout_minutes: float = 30.0) -> World:
    """The World of this process: from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) when WORLD_SIZE > 1, else a single process.
    `timeout_minutes` bounds every collective of the group it creates.

    nccl on CUDA (LOCAL_RANK picks the GPU), gloo on CPU. A process group that already
    exists (e.g. created by a test harness) is used as it is and left alone at the end.
    """
    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(), dist.get_rank()
        owns = False
    else:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        owns = size > 1
    if size == 1:
        return World(device=device)
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda:"):
        raise ConfigError(f"model.device: {device!r} pins every process to one GPU; under torchrun use "
                          f"`auto` or `cuda` (LOCAL_RANK picks each process's GPU) or `cpu`")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ConfigError("model.device: 'cuda' was asked for but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local)
    if owns:
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=_attempt_store(rank, size, timeout),
                                rank=rank, world_size=size, timeout=timeout)
    return World(rank, size, local, f"cuda:{local}" if use_cuda else "cpu", owns)


def _attempt_store(rank: int, size: int, timeout: timedelta):
    """torchrun's key-value store (MASTER_ADDR/PORT), seen under a prefix of this attempt's own.

    After a restart (--max-restarts) the store still holds the failed attempt's keys, among
    them the dead ranks' addresses: without the prefix, gloo dials those and the restarted
    group never connects ("Connection refused")."""
    store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
    return dist.PrefixStore(f"opo/attempt_{restart_count()}", store)


def restart_count() -> int:
    """How often torchrun has restarted this job's processes after a failure
    (`torchrun --max-restarts N`); 0 for the first attempt and outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def shutdown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def check_config(world: World, cfg) -> None:
    """Settings that only make sense for some world sizes; errors name the key."""
    if world.size == 1:
        return
    if cfg.rollout.prompts_per_step % world.size:
        raise ConfigError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts cannot be "
                          f"shared equally among {world.size} processes; use a multiple of {world.size}")
    rows = cfg.rollout.prompts_per_step // world.size * cfg.rollout.samples_per_prompt
    if cfg.algo.updates_per_batch > rows:
        raise ConfigError(f"algo.updates_per_batch: {cfg.algo.updates_per_batch} mini-batches need at least "
                          f"as many responses per process, and each of the {world.size} processes has {rows}")


# ---------------------------------------------------------------------- wrapping

def wrap(model: torch.nn.Module, world: World, kind: str = "ddp", mp_policy=None) -> torch.nn.Module:
    """The module the trainer scores with and optimises.

    World size 1: `model` itself. Otherwise a `ScoreModule` around it, so that every
    scoring call is a forward of the root module DDP or FSDP2 wraps (their gradient
    synchronisation and parameter gathering live in hooks around that forward):
    - ddp: replicated weights, gradients all-reduced once per optimiser step;
    - fsdp: FSDP2 `fully_shard` on every decoder layer (the model's `_no_split_modules`
      classes), then on the root, so parameters, gradients and optimiser state are sharded.
      `mp_policy` (Precision.fsdp_policy()) makes its all-gathers and compute run in the
      low-precision dtype while the fp32 shards stay the master weights.
    `model` keeps pointing at the same parameters (under FSDP2, at their local shards).
    """
    if kind not in PARALLEL_KINDS:
        raise ConfigError(f"trainer.parallel: {kind!r} is not allowed; use one of {', '.join(PARALLEL_KINDS)}")
    if world.size == 1:
        return model
    root = ScoreModule(model)
    if kind == "ddp":
        # No buffer broadcast in forward: the buffers (rotary tables) never change, and a
        # broadcast per forward would be one more collective for ranks to run in lockstep.
        ddp = torch.nn.parallel.DistributedDataParallel
        quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                 else {"broadcast_buffers": False})  # the older name (torch < 2.13)
        ids = [torch.device(world.device).index] if world.device.startswith("cuda") else None
        return ddp(root, device_ids=ids, **quiet)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None  # noqa: N806
    if FSDPModule is None or not hasattr(FSDPModule, "reset_iter_state"):
        raise ConfigError(f"trainer.parallel: 'fsdp' needs FSDP2 with fully_shard and reset_iter_state "
                          f"(torch 2.13 has them; this is torch {torch.__version__}); use trainer.parallel=ddp "
                          f"or a newer torch")
    mesh = init_device_mesh("cuda" if world.device.startswith("cuda") else "cpu", (world.size,))
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"trainer.parallel: 'fsdp' shards per decoder layer, but {type(model).__name__} "
                          f"names no layer classes in _no_split_modules; use trainer.parallel=ddp")
    options = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(root, **options)
    # FSDP2 makes the first module to run forward its root. Generation calls the language
    # model directly, so run one tiny forward through the wrapper now to settle that.
    one = torch.ones(1, 1, dtype=torch.long)
    probe = Packed(one, one, torch.zeros(1, dtype=torch.long), one, one.float()).to(next(model.parameters()).device)
    with torch.no_grad():
        root(probe, Dist())
    root.reset_iter_state()
    return root


@contextmanager
def gathered(policy: torch.nn.Module):
    """Full parameters on every rank for a phase that calls the language model directly
    (generation, evaluation, the KL probe's sampling). No-op unless FSDP2 shards `policy`.

    Every rank enters together (one all-gather per shard group); inside, forwards run no
    collectives at all, so ranks may generate different numbers of tokens. On exit the
    parameters go back to their shards and FSDP2 forgets the phase's forwards. The cost:
    each GPU holds the whole (unsharded) parameters while it generates.
    """
    if not is_sharded(policy):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    policy.set_reshard_after_forward(False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        policy.reset_iter_state()  # reshards every group, clears the forwards it recorded
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm, after clipping to `max_norm` (inf: no clipping).

    With FSDP2 shards the norm of the local pieces is a partial DTensor; it is reduced
    to the full norm before clipping, so every rank clips by the same factor.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # noqa: N806 - torch < 2.5 has no public DTensor
    if not any(isinstance(p, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# ---------------------------------------------------------------------- checkpoint state

def full_weights(world: World, policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2: the full, unsharded weights as CPU tensors on rank 0 (an empty dict on
    other ranks), named as in the unwrapped model, each shared (tied) parameter once.
    Otherwise None: the model holds its full weights already. Every rank must call it."""
    if not is_sharded(policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return {}
    seen, out = set(), {}
    names = dict(policy.named_parameters(remove_duplicate=False))
    for name, tensor in full.items():
        key = id(names[name]) if name in names else name
        if key in seen:
            continue  # a tied parameter, kept under its first name
        seen.add(key)
        out[name.removeprefix("lm.")] = tensor
    return out


def optimizer_state(world: World, policy: torch.nn.Module, optimizer) -> dict | None:
    """Under FSDP2: the optimiser state gathered in torch's own layout (parameters
    numbered in optimiser order), on rank 0, so a single process can load it. Otherwise
    None (every rank holds the full state). Every rank must call it."""
    if not is_sharded(policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(policy, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return {}
    order = _fqn_order(policy, optimizer)
    number = {fqn: i for i, fqn in enumerate(order)}
    return {"state": {number[fqn]: value for fqn, value in full["state"].items()},
            "param_groups": [{**g, "params": [number[f] for f in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(world: World, policy: torch.nn.Module, optimizer, read) -> None:
    """Load a state saved in torch's layout; `read()` returns it. Under FSDP2 only rank 0
    reads the file and the state is scattered to the shards."""
    if not is_sharded(policy):
        optimizer.load_state_dict(read())
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = {}
    if world.is_main:
        saved = read()
        order = _fqn_order(policy, optimizer)
        state = {"state": {order[int(i)]: value for i, value in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                  for g in saved["param_groups"]]}
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _fqn_order(policy, optimizer) -> list[str]:
    """Parameter names in the order torch numbers them in an optimiser's state dict."""
    names = {id(p): n for n, p in policy.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


__all__ = ["World", "SINGLE", "PARALLEL_KINDS", "init", "restart_count", "shutdown", "check_config", "wrap", "gathered",
           "is_sharded", "clip_grad_norm", "full_weights", "optimizer_state", "load_optimizer_state"]

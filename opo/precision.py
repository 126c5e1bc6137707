"""Mixed precision: fp32 master weights and optimiser state, low-precision compute.

`model.dtype` names the *compute* dtype. With `bfloat16` or `float16` the parameters
stay float32 (they are the master weights that AdamW updates and checkpoints save) and
every forward pass of the policy runs under `torch.autocast`, which hands matmuls and
attention low-precision copies of their inputs and keeps the rest in float32.

Why not simply load the weights in bf16: bf16 keeps 8 significant bits, so a weight w
cannot move by less than about |w| / 256. An AdamW step at lr 1e-6 on a weight of 0.02
is 5e-5 of it, and rounds back to the old value: training silently stops. With fp32
master weights the same step lands. `model.pure_low_precision=true` still loads bf16 or
fp16 parameters (half the memory for weights, gradients and optimiser state) for those
who accept that; it warns.

One context serves every forward of the policy: sampling by the engines that run the
trainer's own module (`fast`, `hf`), the loss forward, old log-probs, the KL probe and
evaluation. The trainer and `opo.update` open it at their call sites, so the scoring
code (`opo.sequences`) and the engines stay precision-agnostic, and sampler and trainer
compute the same low-precision function: `logp_mismatch` then measures the
kernel-level noise between a KV-cached decode and a full forward, not a dtype gap.

float16 has a narrow exponent range, so its gradients are scaled (`torch.amp.GradScaler`,
on CPU and CUDA alike): a step whose scaled gradients overflow is skipped like any
NaN/inf step and the scale is lowered. bfloat16 has float32's exponent range and needs
no scaling.

Data parallelism: DDP keeps fp32 parameters and gradients, so this module applies
unchanged. FSDP2 (`fully_shard`) casts parameters itself when it gathers them;
`Precision.fsdp_policy()` is the `MixedPrecisionPolicy` that matches this config
(compute in the low dtype, gradients reduced in fp32, fp32 shards as master weights).
With that policy in force the autocast context is harmless but redundant.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# algo.max_logp_mismatch="auto" resolves to these: the largest |log pi_sampler - log pi_trainer|
# over a step's response tokens that still counts as the same policy. Measured per-step maxima
# (benchmarks/bench_precision.py, CPU autocast, BENCHMARKS.md section 9): float32 at most 3.4e-5
# (tiny model and SmolLM2-135M); bfloat16 0.07 (tiny) and 0.23 (SmolLM2); float16 0.011
# (tiny). A maximum grows with the number of tokens it is taken over, hence the head-room.
AUTO_MISMATCH = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.2}

# algo.max_mismatch_kl="auto" resolves to these: the largest mean KL(sampler ‖ trainer) per token
# (k3, `mismatch_kl`) of a step that still counts as the same policy. Measured per-step means
# (benchmarks/bench_onpolicy_check.py, BENCHMARKS.md section 14; CPU): noise in float32 0 to
# 4e-9; bfloat16 5e-6 (tiny, fast engine), 9e-5 (tiny, vLLM) and 1.0e-3 (SmolLM2, fast);
# float16 1.3e-7 (tiny). Real changes: a sampler one to four steps stale 0.15-0.26 (tiny); a 5%
# temperature error 1.4e-4 (tiny, fp32) and 5.7e-3 (SmolLM2, bf16). bfloat16's limit sits 10x
# above the largest noise and catches the stale engine; it cannot catch the temperature
# error, which lies within 6x of SmolLM2's noise. float16's is 1e-3: 40x finer noise than
# bf16 on tiny (SmolLM2 in fp16 is too slow to measure on CPU). float32 keeps the per-token
# maximum as its strict check; the mean only adds a second one.
AUTO_MISMATCH_KL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-3}


def autocast_low_dtype(device_type: str) -> torch.dtype | None:
    """The low-precision dtype autocast computes in on this device right now (bf16 or fp16),
    or None when autocast is off there (or set to float32). Code that must match what the
    policy's forward computes under `Precision.autocast` reads it here."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if dtype == torch.float32 else dtype


class Precision:
    """How the policy's parameters are stored and its forwards computed.

    dtype: the compute dtype name (`float32`, `bfloat16`, `float16`).
    device_type: `cpu` or `cuda`, where autocast and the gradient scaler act.
    pure: store the parameters themselves in `dtype` (no master weights, no autocast).
    """

    def __init__(self, dtype: str = "float32", device_type: str = "cpu", pure: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.dtype = dtype
        self.device_type = device_type
        self.pure = pure and dtype != "float32"
        self.scaler = torch.amp.GradScaler(device_type) if self.autocasting and dtype == "float16" else None

    @classmethod
    def from_config(cls, model_cfg, device) -> "Precision":
        """From a `ModelConfig` and the device the model lives on; warns for pure low precision."""
        device_type = torch.device(device).type
        precision = cls(model_cfg.dtype, device_type, model_cfg.pure_low_precision)
        if precision.pure:
            warnings.warn(
                f"model.pure_low_precision=true: parameters, gradients and AdamW state are stored in "
                f"{model_cfg.dtype}. A weight cannot move by less than ~|w|/{_spacing(model_cfg.dtype)}, so "
                f"small updates (lr 1e-6 on weights of 0.02, say) round to nothing and training can "
                f"silently stall. Leave it false for fp32 master weights.", stacklevel=2)
        return precision

    @property
    def param_dtype(self) -> str:
        """The dtype parameters are loaded and kept in."""
        return self.dtype if self.pure else "float32"

    @property
    def autocasting(self) -> bool:
        return self.dtype != "float32" and not self.pure

    def autocast(self):
        """The context every policy forward runs in (a no-op in float32 or pure mode)."""
        if not self.autocasting:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=DTYPES[self.dtype])

    # ---- the optimiser step, with gradient scaling where float16 needs it

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_(self, optimizer) -> None:
        """Bring gradients back to their true size before they are clipped or measured."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self) -> None:
        """The step was dropped for non-finite gradients: lower the scale.

        The verdict is the whole world's (opo.update reduces it), so the scale is backed off
        explicitly rather than from this rank's own inf check: under FSDP2 a rank sees only
        its shard of the gradients, and a rank whose shard was finite would otherwise keep
        (or grow) its scale, and later reduce-scatters would mix differently scaled
        gradients. Same result as the scaler's own update after an overflow."""
        if self.scaler:
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
            tracker = getattr(self.scaler, "_growth_tracker", None)  # steps since the last overflow
            if tracker is not None:
                tracker.zero_()

    def state_dict(self) -> dict:
        return dict(self.scaler.state_dict()) if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)

    # ---- hooks for other wrappers

    def fsdp_policy(self):
        """FSDP2's `MixedPrecisionPolicy` for this config, or None for full fp32.

        Parameters are gathered in the compute dtype and gradients reduced in fp32; the
        sharded fp32 parameters stay the master weights the optimiser updates.
        """
        if self.dtype == "float32" or self.pure:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=DTYPES[self.dtype], reduce_dtype=torch.float32)


def _spacing(dtype: str) -> int:
    """1 / the smallest relative step that survives rounding (half the dtype's epsilon)."""
    return round(2 / torch.finfo(DTYPES[dtype]).eps)


def _resolve(limit, auto: dict[str, float], dtype: str) -> float:
    """A limit as configured: the number given, or the dtype's default for "auto"."""
    return auto[dtype] if limit == "auto" else float(limit)


def mismatch_kl_limit(cfg) -> float:
    """The effective algo.max_mismatch_kl."""
    return _resolve(cfg.algo.max_mismatch_kl, AUTO_MISMATCH_KL, cfg.model.dtype)


def mismatch_limit(cfg) -> float:
    """The effective algo.max_logp_mismatch."""
    return _resolve(cfg.algo.max_logp_mismatch, AUTO_MISMATCH, cfg.model.dtype)


__all__ = ["AUTO_MISMATCH", "AUTO_MISMATCH_KL", "DTYPES", "Precision", "mismatch_kl_limit", "mismatch_limit"]

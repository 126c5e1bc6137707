"""The attention function of a policy on a CPU: transformers' SDPA, whose backward pass
runs in float32 where a gradient flows through it under bf16/fp16 autocast.

Why: on a CPU, PyTorch's flash-attention backward for bf16 inputs is several times slower
than for float32 inputs of the same shape (about 3.2 against 1.0 ms per call for a SmolLM2
layer at 9 rows x 29 tokens over a 63-token prompt; benchmarks/bench_attention.py), and a
training step of SmolLM2 makes over a hundred such calls (30 layers x the prompt pass and
the length buckets).

What changes in the numbers: the forward pass is SDPA's own bf16 kernel, so the log-probs
the trainer scores are those of the same kernel the sampler runs (computing the forward in
float32 too was tried: it moved the trainer away from the bf16 sampler, raising the
measured mismatch by about a quarter). The backward pass is the float32 flash kernel's, fed
the queries, keys and values rounded to the autocast dtype (exactly what the bf16 forward
received) and the forward's own output and log-sum-exp: the gradient of the same function,
with float32 rounding inside instead of bf16's. Generation, scoring without gradients,
float32 training and GPUs go straight to SDPA.

How: transformers prepares the call (grouped heads, masks, causality) and calls
`F.scaled_dot_product_attention`; under `_FloatBackwardMode` that one call is routed here.
When the call is one the CPU flash kernel takes directly (no dropout, dense 4-D inputs, as
many key/value heads as query heads or grouped ones under `enable_gqa`, a boolean or
additive mask or none), the forward calls that
kernel and keeps its output and log-sum-exp for the backward (`_FlashFloatBackward`). Any
other call falls back to recomputing the attention in float32 during the backward
(`_FloatBackward`): the same gradient, one more forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from opo.precision import autocast_low_dtype

NAME = "opo_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = autocast_low_dtype(query.device.type) if query.device.type == "cpu" else None
    if low is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        with _FloatBackwardMode(low):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _FloatBackwardMode(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` calls to `float_backward_sdpa`; every other
    torch call passes through unchanged."""

    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return float_backward_sdpa(self.low, *args, **kwargs)
        return func(*args, **kwargs)


def float_backward_sdpa(low: torch.dtype, query, key, value, attn_mask=None, dropout_p=0.0,
                        is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` as CPU autocast to `low` computes it, with a float32
    backward. query [B, Hq, L, D], key and value [B, Hkv, S, D] -> [B, Hq, L, D] in `low`."""
    if _flash_takes(query, key, value, attn_mask, dropout_p, enable_gqa):
        if attn_mask is not None:
            # SDPA turns a boolean mask into an additive one of the query's dtype (0 where
            # attended, -inf elsewhere); autocast casts a floating one to `low`.
            attn_mask = (torch.zeros(attn_mask.shape, dtype=low, device=query.device).masked_fill_(~attn_mask, -torch.inf)
                         if attn_mask.dtype == torch.bool else attn_mask.to(low))
        return _FlashFloatBackward.apply(low, query, key, value, attn_mask, bool(is_causal), scale)
    run = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return _FloatBackward.apply(run, low, query, key, value)


def _flash_takes(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    """Whether SDPA on a CPU would run this call on its flash kernel as given (the conditions
    of PyTorch's CPU kernel choice that the calls of a training step can break). The kernel
    takes grouped key/value heads itself, forward and backward."""
    tensors = (query, key, value)
    heads, kv_heads = query.shape[1], key.shape[1]
    return (dropout_p == 0.0 and torch.backends.cuda.flash_sdp_enabled()
            and all(t.device.type == "cpu" and t.dim() == 4 and not t.is_nested and t.stride(-1) == 1
                    for t in tensors)
            and query.shape[0] == key.shape[0] == value.shape[0]
            and kv_heads == value.shape[1] and (heads == kv_heads or (enable_gqa and heads % kv_heads == 0))
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[2] > 0 and key.shape[2] > 0
            and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))


class _FlashFloatBackward(torch.autograd.Function):
    """The CPU flash kernel forward on the inputs cast to `low` (as autocast would); its
    float32 kernel backward, given the forward's output and log-sum-exp. Gradients come back
    in the inputs' own dtypes, unrounded."""

    @staticmethod
    def forward(ctx, low, query, key, value, attn_mask, is_causal, scale):
        q, k, v = (t.to(low) for t in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.is_causal,
            attn_mask=None if attn_mask is None else attn_mask.float(), scale=ctx.scale)
        return (None,) + tuple(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)) + (None, None, None)


class _FloatBackward(torch.autograd.Function):
    """`run(q, k, v)` as it is (under the caller's autocast) forward; in float32 backward,
    by recomputing it on the inputs rounded to `low`."""

    @staticmethod
    def forward(ctx, run, low, query, key, value):
        ctx.run, ctx.low = run, low
        ctx.save_for_backward(query, key, value)
        with torch.no_grad():
            return run(query, key, value)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().to(ctx.low).float().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad(), torch.autocast(device_type=grad_out.device.type, enabled=False):
            out = ctx.run(*inputs)
            grads = torch.autograd.grad(out, inputs, grad_out.float())
        return (None, None) + tuple(g.to(t.dtype) for g, t in zip(grads, ctx.saved_tensors))


def register() -> None:
    """Make `NAME` an attention implementation transformers knows (the attention function and,
    for its masks, SDPA's mask format). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_for(model) -> bool:
    """Switch a CPU model that uses SDPA to `NAME`; returns whether it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True

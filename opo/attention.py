"""The attention function of a policy on a CPU: transformers' SDPA, whose backward pass
runs in float32 where a gradient flows through it under bf16/fp16 autocast.

Why: on a CPU, PyTorch's flash-attention backward for bf16 inputs is several times slower
than for float32 inputs of the same shape (about 3.4 against 0.9 ms per call for a SmolLM2
layer at 9 rows x 29 tokens over a 63-token prompt; benchmarks/bench_attention.py), and a
training step of SmolLM2 makes 180 such calls (30 layers x the prompt pass and the length
buckets).

What changes in the numbers: the forward pass is SDPA itself, so the log-probs the trainer
scores are those of the same kernel the sampler runs (computing the forward in float32 too
was tried: it moved the trainer away from the bf16 sampler, raising the measured mismatch
by about a quarter). The backward pass recomputes attention in float32 on the queries,
keys and values rounded to the autocast dtype, exactly as the bf16 kernel receives them, and
takes that computation's gradient: the gradient of the same function, with float32 rounding
instead of bf16's inside. Generation, scoring without gradients, float32 training and GPUs
go straight to SDPA.
"""

from __future__ import annotations

import torch

from opo.precision import autocast_low_dtype

NAME = "opo_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = autocast_low_dtype(query.device.type) if query.device.type == "cpu" else None
    if low is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        run = lambda q, k, v: sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)[0]
        return _FloatBackward.apply(run, low, query, key, value), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _FloatBackward(torch.autograd.Function):
    """`run(q, k, v)` as it is (under the caller's autocast) forward; in float32 backward."""

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

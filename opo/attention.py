"""The attention function of a policy on a CPU: transformers' SDPA, except where a gradient
flows through it under bf16/fp16 autocast; there the forward is the same flash kernel and the
backward runs in float32.

Why: on a CPU, PyTorch's flash-attention backward for bf16 inputs is several times slower
than for float32 inputs of the same shape (about 3.2 against 1.0 ms per call for a SmolLM2
layer at 9 rows x 29 tokens over a 63-token prompt; benchmarks/bench_attention.py), and a
training step of SmolLM2 makes over a hundred such calls (30 layers x the prompt pass and
the length buckets).

What changes in the numbers: nothing forward. The forward is the CPU flash kernel SDPA
itself runs, on the inputs cast to the autocast dtype, so the log-probs the trainer scores
are those of the kernel the sampler runs (bitwise; computing the forward in float32 too was
tried: it moved the trainer away from the bf16 sampler, raising the measured mismatch by
about a quarter). The backward is the float32 flash kernel's, fed the queries, keys and
values as the bf16 forward received them and that forward's own output and log-sum-exp: the
gradient of the same function, with float32 rounding inside instead of bf16's.

Two more things come free from calling the kernel directly: grouped key/value heads go to it
as they are (transformers repeats them whenever there is a mask, a copy forward and a sum
backward per layer), and a boolean mask becomes the additive one once per call.

Generation, scoring without gradients, float32 training, GPUs, and calls with features the
direct path does not take (dropout, position biases, soft-capping) go straight to
transformers' SDPA.
"""

from __future__ import annotations

import torch

from opo.precision import autocast_low_dtype

NAME = "opo_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: query [B, Hq, L, D], key and value
    [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = autocast_low_dtype(query.device.type) if query.device.type == "cpu" else None
    if low is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _float_backward_call(module, low, query, key, value, attention_mask, **kwargs)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _float_backward_call(module, low, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
    """What transformers' `sdpa_attention_forward` computes, through `float_backward_sdpa`;
    None for a call this path does not take."""
    if dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None \
            or kwargs.get("output_attentions"):
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    # As transformers decides it: the causal flag only without a mask and for more than one
    # query; a causal prefill into a longer empty cache attends to its own positions only.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if not flash_takes(query, key, value, attention_mask):
        return None
    out = float_backward_sdpa(low, query, key, value, attention_mask, is_causal, scaling)
    return out.transpose(1, 2).contiguous()


def flash_takes(query, key, value, attn_mask=None) -> bool:
    """Whether the CPU flash kernel takes these inputs as they are: dense 4-D tensors with
    unit stride in the last dimension, equal head sizes, query heads a multiple of the
    key/value heads, non-empty sequences, and a 4-D boolean or additive mask or none (PyTorch's
    own conditions for choosing it on a CPU, less those a training step cannot break; the
    mask's rank is ours: transformers always passes 4-D masks)."""
    tensors = (query, key, value)
    heads, kv_heads = query.shape[1], key.shape[1]
    return (torch.backends.cuda.flash_sdp_enabled()
            and all(t.device.type == "cpu" and t.dim() == 4 and not t.is_nested and t.stride(-1) == 1
                    for t in tensors)
            and query.shape[0] == key.shape[0] == value.shape[0]
            and kv_heads == value.shape[1] and heads % kv_heads == 0
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[2] > 0 and key.shape[2] > 0
            and (attn_mask is None or (attn_mask.dim() == 4
                                       and (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive one SDPA makes of it before its
    kernel runs: 0 where attended, -inf elsewhere, in `dtype` (the query's), same shape."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)


def float_backward_sdpa(low: torch.dtype, query, key, value, attn_mask=None, is_causal=False, scale=None):
    """`F.scaled_dot_product_attention(..., enable_gqa=True)` as CPU autocast to `low` computes
    it (the flash kernel on the inputs cast to `low`), with the float32 kernel's backward.
    query [B, Hq, L, D], key and value [B, Hkv, S, D] (`flash_takes` them) -> [B, Hq, L, D]
    in `low`; gradients in the inputs' own dtypes."""
    if attn_mask is not None:  # autocast casts a floating mask to `low`
        attn_mask = additive_mask(attn_mask, low) if attn_mask.dtype == torch.bool else attn_mask.to(low)
    return _FlashFloatBackward.apply(low, query, key, value, attn_mask, bool(is_causal), scale)


class _FlashFloatBackward(torch.autograd.Function):
    """The CPU flash kernel forward on the inputs cast to `low`; its float32 kernel backward,
    given the forward's output and log-sum-exp (nothing is recomputed)."""

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

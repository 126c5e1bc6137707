"""The attention function of a policy on a CPU: transformers' SDPA, except where a gradient
will flow through it under bf16/fp16 autocast, where it runs in float32 instead.

Why: on a CPU, PyTorch's flash-attention backward for bf16 inputs is several times slower
than for float32 inputs of the same shape (3.4 against 0.9 ms per call for a SmolLM2 layer
at 9 rows x 29 tokens over a 63-token prompt; benchmarks/bench_attention.py), and a training
step of SmolLM2 makes 180 such calls (30 layers x one prompt pass and the length buckets).

What changes in the numbers: nothing outside that case (generation, scoring without
gradients, float32 training and every GPU go straight to SDPA). In that case the queries,
keys and values are first rounded to the autocast dtype, exactly as the bf16 kernel would
receive them, and the output is rounded back to it, as the bf16 kernel returns it; only the
kernel's own intermediate rounding differs (the bf16 kernel rounds the attention weights to
bf16 before multiplying the values). The sampler/trainer mismatch metrics measure the
result every step.
"""

from __future__ import annotations

import torch

NAME = "opo_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device = query.device.type
    if device == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        if low in (torch.bfloat16, torch.float16):
            query, key, value = (t.to(low).float() for t in (query, key, value))
            with torch.autocast(device_type=device, enabled=False):
                out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return out.to(low), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


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

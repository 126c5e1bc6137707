"""The response tokens of a scoring pass as one packed batch: no padding in the products.

`opo.sequences` runs each prompt once and then the responses that continue it. Through
transformers' forward the responses must be padded rectangles, so they go in length
buckets, each one more decoder pass: its products see only that bucket's few hundred rows,
and each weight's gradient is computed per bucket and summed. Here all response tokens
of a micro-batch are one [N, H] tensor, with no padding, for everything a decoder layer does
token by token (norms, projections, rotary embedding, MLP); only attention, which needs
each row's own tokens side by side, gathers them into padded per-bucket blocks and scatters
its output back. On SmolLM2 at 32 rows on a 2-core Xeon (benchmarks/bench_buckets.py) the
scoring pass and its backward ran 1.15-1.2x faster than in length buckets, in float32 and
under bf16 autocast alike, and the products no longer see padding.

The computation is that of transformers' forward for the family, module by module: this
calls the layer's own norms, projections (LoRA-wrapped ones included), MLP, rotary
function and the attention function the model is configured with, in the order of the
family's decoder layer, with the same inputs; only the number of rows each product sees
differs. Tests compare it with the bucketed path in float32 (log-probs and gradients).

Where it runs: Llama-family decoders (`opo.models.LLAMA_FAMILIES`) on a CPU, with SDPA
attention, no sliding window, not sharded by FSDP2 (which gathers a layer's weights in that
layer's forward, never called here) and no hooks on the layers. Anything else keeps the
bucketed passes. GPUs keep them too until this is measured there.
"""

from __future__ import annotations

import sys

import torch

from opo import attention
from opo.models import is_sharded, llama_family_reason

ATTENTION = ("sdpa", attention.NAME)
# length_buckets' cost of one more attention block, in padded tokens: only attention runs per
# bucket here (SmolLM2, 32 rows: 32 and 96 level in bench_buckets.py; 8 ~5% slower than 32 in
# a throwaway timing).
BUCKET_OVERHEAD = 32


def unsupported_reason(model) -> str | None:
    """Why `response_hidden` cannot score `model`'s responses (None when it can)."""
    reason = llama_family_reason(model)  # the layers `response_hidden` walks through
    if reason:
        return reason
    if getattr(model.config, "_attn_implementation", None) not in ATTENTION:
        return f"attention implementation {getattr(model.config, '_attn_implementation', None)!r}"
    decoder = model.get_decoder()
    if next(decoder.parameters()).device.type != "cpu":
        return "not measured on this device"
    if is_sharded(decoder):
        return "sharded by FSDP2"
    for name in ("norm", "rotary_emb"):
        if not hasattr(decoder, name):
            return f"decoder has no {name!r}"
    for layer in decoder.layers:
        if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, layer.self_attn, layer.mlp)):
            return "forward hooks on a decoder layer"
        if not hasattr(sys.modules[type(layer.self_attn).__module__], "apply_rotary_pos_emb"):
            return "no apply_rotary_pos_emb beside the attention module"
    return None


class _Plan:
    """Where each fed response token sits, in the packed order and in its bucket's block.

    The packed order is bucket by bucket, row by row, token by token, so each bucket's tokens
    are one contiguous slice [start, end) of the packed tensor. Response token j of a row
    is fed to predict token j + 1, so a row of length L feeds its first L - 1 tokens.
    """

    def __init__(self, packed, buckets: list[list[int]]):
        device = packed.response_ids.device
        fed = (packed.response_mask.sum(-1).long() - 1).clamp_min(0)         # [B]
        rows_of, cols_of, self.blocks = [], [], []
        start = 0
        for rows in buckets:
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            width = int(fed[idx].max()) if len(rows) else 0
            if width == 0:
                continue
            valid = torch.arange(width, device=device)[None, :] < fed[idx, None]   # [R, W]
            flat = valid.flatten()
            count = int(flat.sum())
            # Each block position's packed index (padding: the bucket's first token, masked out
            # as a key, its output dropped as a query).
            gather = (flat.cumsum(0) - 1).clamp_min(0) + start
            r, c = valid.nonzero(as_tuple=True)
            rows_of.append(idx[r])
            cols_of.append(c)
            keep = flat.nonzero().squeeze(1)
            key_ok = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :]
            self.blocks.append((idx, gather, keep, width, key_ok))
            start += count
        empty = torch.zeros(0, dtype=torch.long, device=device)
        self.row = torch.cat(rows_of) if rows_of else empty                  # [N]
        self.col = torch.cat(cols_of) if cols_of else empty                  # [N]


def response_hidden(decoder, packed, response_emb: torch.Tensor, prompt_kv: list, last: torch.Tensor,
                    length_buckets) -> torch.Tensor:
    """Hidden states [B, T, H] that predict response tokens 0..T-1 (what the bucketed passes
    of `opo.sequences._hidden_shared` give), from the responses' embeddings [B, T, H], each
    layer's prompt keys and values [G, Hkv, P, D] from the prompt pass, and the prompt pass's
    last hidden state [G, H] (which predicts response token 0)."""
    b, t = packed.response_ids.shape
    plan = _Plan(packed, length_buckets(packed.response_lengths(), BUCKET_OVERHEAD))
    hidden = last.new_zeros(b, t, last.shape[-1])
    hidden = hidden.index_put((torch.arange(b, device=last.device), torch.zeros_like(packed.row_group)),
                              last[packed.row_group])
    if plan.row.numel() == 0:
        return hidden
    x = response_emb[plan.row, plan.col]                                      # [N, H]
    starts = packed.prompt_mask.sum(-1)
    positions = starts[packed.row_group[plan.row]] + plan.col
    cos, sin = decoder.rotary_emb(x[None], positions[None])                  # [1, N, D]
    prompt_mask = packed.prompt_mask.bool()
    masks = []
    for idx, _, _, width, key_ok in plan.blocks:     # [R, 1, W, P + W]: the prompt, then causal
        groups = packed.row_group[idx]
        p_ok = prompt_mask[groups][:, None, :].expand(-1, width, -1)
        masks.append(torch.cat([p_ok, key_ok], dim=-1)[:, None])
    for layer, (prompt_k, prompt_v) in zip(decoder.layers, prompt_kv):
        x = x + _attention_block(layer.self_attn, layer.input_layernorm(x), cos, sin, prompt_k, prompt_v,
                                 plan, masks, packed.row_group)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = decoder.norm(x)
    return hidden.index_put((plan.row, plan.col + 1), x)


def _attention_block(attn, h, cos, sin, prompt_k, prompt_v, plan: _Plan, masks, row_group) -> torch.Tensor:
    """The layer's self-attention with its output projection, for packed tokens h [N, H]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    n, d = h.shape[0], attn.head_dim
    # [1, heads, N, D], the layout the family's rotary function takes (one "row" of N tokens).
    q = attn.q_proj(h).view(n, -1, d).transpose(0, 1)[None]
    k = attn.k_proj(h).view(n, -1, d).transpose(0, 1)[None]
    v = attn.v_proj(h).view(n, -1, d)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)                        # [N, heads, D]
    function = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, None)
    dropout = attn.attention_dropout if attn.training else 0.0
    outs = []
    for (idx, gather, keep, width, _), mask in zip(plan.blocks, masks):
        rows, groups = idx.shape[0], row_group[idx]

        def block(z):  # packed [N, heads, D] -> this bucket's [R, heads, W, D]
            return z.index_select(0, gather).view(rows, width, *z.shape[1:]).transpose(1, 2)

        keys = torch.cat([prompt_k.index_select(0, groups), block(k)], dim=2)
        values = torch.cat([prompt_v.index_select(0, groups), block(v)], dim=2)
        out, _ = function(attn, block(q), keys, values, mask, dropout=dropout, scaling=attn.scaling)
        outs.append(out.reshape(rows * width, -1).index_select(0, keep))    # [count, heads * D]
    return attn.o_proj(torch.cat(outs))

"""The fast engine's decode step for Llama-family decoders: fewer, larger kernels per token.

At a batch of 32 rows a decode step of a 135M-parameter model is bound by reading its
weights (538 MB in fp32, 269 MB in bf16) and by the number of kernels it launches, not by
arithmetic. transformers' forward spends a third of a SmolLM2 decode step outside the
matrix products (masks rebuilt, keys and values repeated for grouped-query attention,
three projections where one would do), and its products read the weights in their plain
layout. `FusedDecoder` computes the same function with:

- one matrix product for q, k and v, and one for the MLP's gate and up projections
  (the weights concatenated once per `generate` call);
- weights held in the compute dtype for the whole call (under bf16 autocast, the bf16
  copies autocast would cache, made once);
- on a CPU, weights packed once per call into oneDNN's blocked layout, which its matrix
  product reads fastest;
- attention by `scaled_dot_product_attention` over the preallocated cache, the query heads
  of each grouped key/value head passed as that head's rows, so nothing is copied;
- the rotary embedding applied to the query and key heads in one go, and autocast's casts
  made explicitly (the body runs with autocast off, one dispatch fewer per kernel).

Everything else is the model's own code: its embedding, RMSNorm modules, rotary tables,
activation and output layer, called in the order of transformers' forward, with the casts
autocast would make there and the family's rotary formula element by element, so the result
is that forward's up to the rounding of a matrix product (tested against it). The prompt
pass stays transformers' forward, the very computation the trainer's prompt pass makes:
running it here too (with the packed products) was tried and dropped: it saved ~25 ms of a
SmolLM2 rollout and raised the bf16 sampler/trainer mismatch by about 7%, the prompt's keys
and values no longer being those the trainer computes. Only single-token steps come here.

A model this does not recognise (another architecture, LoRA-wrapped projections, weights
sharded as DTensors, sliding-window attention) gets `None` from `FusedDecoder.build`, and
the engine calls transformers' forward at every step as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opo import attention
from opo.models import llama_family_reason
from opo.precision import autocast_low_dtype

class _Linear:
    """One weight (and bias) in the compute dtype, packed for oneDNN on a CPU where it can be.

    oneDNN's blocked layout is chosen for `rows_hint` rows but serves any row count, so it
    keeps paying as rows finish and leave the batch (benchmarks/bench_decode.py, SmolLM2's
    shapes on a 2-core Xeon: 1.15x fp32 and 1.4x bf16 over the plain product at 32 rows,
    1.5x at 8).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, rows_hint: int):
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype
        self.packed = None
        if self.weight.device.type == "cpu" and _onednn_packs(dtype):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows_hint)
            except RuntimeError:  # a build whose oneDNN refuses this shape or dtype
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)  # what autocast does to a linear's input
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack and multiply `dtype` weights with oneDNN on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Layer:
    def __init__(self, layer, dtype: torch.dtype, rows_hint: int):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [p.bias for p in qkv]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else p.weight.new_zeros(p.out_features) for p, b in zip(qkv, biases)])
        # Cast, then concatenate: half the bytes to copy under bf16.
        self.qkv = _Linear(_cat_as([p.weight for p in qkv], dtype), bias, dtype, rows_hint)
        self.o = _Linear(attn.o_proj.weight, attn.o_proj.bias, dtype, rows_hint)
        self.gate_up = _Linear(_cat_as([mlp.gate_proj.weight, mlp.up_proj.weight], dtype), None, dtype, rows_hint)
        self.down = _Linear(mlp.down_proj.weight, None, dtype, rows_hint)
        self.q_size = attn.q_proj.out_features
        self.q_heads = self.q_size // attn.head_dim
        self.kv_size = attn.k_proj.out_features
        self.intermediate = mlp.gate_proj.out_features
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.act = mlp.act_fn
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm


def _cat_as(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weights stacked along their output dimension, in `dtype`."""
    return torch.cat([w.detach().to(dtype) for w in weights])


def unsupported_reason(model) -> str | None:
    """Why `FusedDecoder` cannot run `model` (None when it can)."""
    reason = llama_family_reason(model)  # the layers `step` computes token by token
    if reason:
        return reason
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", attention.NAME, "eager", None):
        return f"attention implementation {config._attn_implementation!r}"
    for layer in model.get_decoder().layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections are not plain Linear layers (LoRA adapters, quantised layers)"
        if any(m.bias is not None for m in linears[3:]):
            return "biases on the output or MLP projections"
        if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for m in linears for p in m.parameters()):
            return "weights are sharded or wrapped tensors"
        if _has_hooks(layer):
            return "forward hooks on a decoder layer"
    return None


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether any forward hook sits on `module` or below (a wrapper that expects its calls)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class FusedDecoder:
    """One decode step of a Llama-family causal LM over a preallocated KV cache.

    Built once per `generate` call (the weights change after every optimiser step), inside
    the autocast context the engine samples under, whose dtype it takes as the compute dtype.
    """

    def __init__(self, model, rows_hint: int = 32):
        decoder = model.get_decoder()
        device_type = next(model.parameters()).device.type
        dtype = autocast_low_dtype(device_type) or decoder.layers[0].self_attn.q_proj.weight.dtype
        self.device_type, self.dtype = device_type, dtype
        self.embed = decoder.get_input_embeddings()
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.layers = [_Layer(layer, dtype, rows_hint) for layer in decoder.layers]
        head = model.get_output_embeddings()
        self.head = _Linear(head.weight, head.bias, dtype, rows_hint)

    @classmethod
    def build(cls, model, rows_hint: int = 32) -> "FusedDecoder | None":
        """A decoder for `model`, or None when `unsupported_reason` finds one."""
        return None if unsupported_reason(model) else cls(model, rows_hint)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
             cache_layers: list) -> torch.Tensor:
        """Logits [B, V] for the next token after `tokens` [B].

        positions [B]: each token's position id; key_mask [B, S] bool: which of the cache's
        positions (this token's included, last) each row attends to; cache_layers: the
        `PreallocatedLayer`s of the prompt pass, extended here by one position.
        """
        # Autocast's casts are made explicitly below (each product's input, attention's
        # inputs), so the body runs with autocast off: the same values, one dispatch fewer
        # for each of the step's ~1,000 small kernels.
        with torch.autocast(self.device_type, enabled=False):
            return self._step(tokens, positions, key_mask, cache_layers)

    def _step(self, tokens, positions, key_mask, cache_layers):
        b, dtype = tokens.shape[0], self.dtype
        x = self.embed(tokens)                                         # [B, H]
        cos, sin = self.rotary(x, positions[:, None])                  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]                          # [B, 1, 1, D]: one per head
        # The boolean mask as the additive one attention makes of it, once rather than per layer.
        mask = attention.additive_mask(key_mask, dtype)[:, None, None, :]             # [B, 1, 1, S]
        for layer, cache in zip(self.layers, cache_layers):
            qkv = layer.qkv(layer.norm_in(x))
            d, q_heads, k_end = layer.head_dim, layer.q_heads, layer.q_size + layer.kv_size
            # Query and key heads rotated together (the family's formula, element by element),
            # then cast once: the cast autocast gives attention's query and the cache its keys.
            qk = qkv[:, :k_end].view(b, -1, 1, d)
            qk = (qk * cos + _rotate_half(qk) * sin).to(dtype)
            keys, values = cache.update(qk[:, q_heads:], qkv[:, k_end:].view(b, -1, 1, d))
            # The query heads that share a key/value head, as that head's `groups` query rows
            # (query head i reads key/value head i // groups, as in grouped-query attention).
            # All rows sit at this one position, so the key mask applies to each. The CPU
            # flash kernel then takes a head's queries as one block: per call 2.0x (bf16) and
            # 1.5x (fp32) faster than enable_gqa's one query per head at 32 rows
            # (benchmarks/bench_attention.py; a whole 64-token rollout, bf16: 4% faster).
            kv_heads = keys.shape[1]
            o = F.scaled_dot_product_attention(qk[:, :q_heads].reshape(b, kv_heads, q_heads // kv_heads, d),
                                               keys.to(dtype), values.to(dtype), attn_mask=mask,
                                               scale=layer.scaling)
            x = x + layer.o(o.reshape(b, -1))
            gate_up = layer.gate_up(layer.norm_post(x))
            x = x + layer.down(layer.act(gate_up[:, :layer.intermediate]) * gate_up[:, layer.intermediate:])
        return self.head(self.norm(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The last dimension's halves swapped, the new first half negated: Llama's `rotate_half`."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

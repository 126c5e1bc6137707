"""Log-probabilities and entropy of the sampling distribution straight from the output
layer's weight, block by block, without ever holding a [tokens, vocabulary] tensor.

The plain way to score N response tokens builds the logits [N, V], casts them to float32,
takes a logsumexp over them and, in the backward pass, a softmax [N, V] and its cast back to
the compute dtype. For SmolLM2 (V = 49152) and a thousand tokens that is five or six
200 MB tensors a step; on a CPU each is fresh memory (the allocator returns blocks that
large to the system), so every pass over it also pays the page faults of first touch, and
the element-wise passes cost more than the products themselves under bf16 (measured in
benchmarks/bench_output_layer.py).

Here the logits exist only as [token_block, vocab_block] tiles (a few MB, reused from the
allocator's cache):

- forward: each tile gives its tokens' logsumexp over the tile, the drawn token's logit when
  it falls in the tile, and Σ q log q of the tile's own softmax q (for the entropy); the tiles
  then combine exactly (a logsumexp over the per-tile logsumexps);
- backward: each tile is recomputed from the hidden states and the weight, turned into
  g · (onehot − p) / T in place, and multiplied into the two gradients. The weight's gradient
  of a vocabulary tile is one product over all tokens when they fit one token block, so it
  is rounded once, as the unblocked product's is.

The cost is one more product (the recomputed logits) against the unblocked backward; under
bf16 on a CPU with AMX that product is cheap and the passes it replaces are not.

This serves the common case only: temperature is supported, top-k / top-p filtering (whose
support needs the whole row at once) and logit soft-capping are not, and the output layer
must be a plain `nn.Linear` without bias. `usable_weight` says when; `opo.sequences` falls
back to the chunked plain path otherwise.

Shapes: hidden [N, H], weight [V, H], targets [N] (token ids) -> log-probs [N] float32 and
entropy [N] float32 (detached) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opo.precision import autocast_low_dtype

# Tile sizes, measured on a 2-core Xeon (AMX) with SmolLM2's output layer: a [1024, 2048]
# float32 tile is 8 MB, big enough for efficient products and small enough to stay in the
# allocator's cache. Larger vocabulary tiles were slower there (the element-wise passes fall
# out of cache), smaller token tiles gave no gain.
TOKEN_BLOCK = 1024
VOCAB_BLOCK = 2048


def usable_weight(model, dist) -> Tensor | None:
    """The output layer's weight [V, H] when `head_scores` can replace the plain path for this
    model and sampling distribution, else None.

    Only on a CPU (where it was measured; GPUs keep the plain path), only without top-k /
    top-p (the support needs the whole row) and without logit soft-capping, and only for a
    plain bias-free `nn.Linear` holding an ordinary tensor (not a LoRA wrapper, not an
    FSDP2 shard).
    """
    if dist.top_p < 1.0 or dist.top_k > 0:
        return None
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight.data) is not torch.Tensor or weight.device.type != "cpu":
        return None
    return weight


def head_scores(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                with_entropy: bool = False, token_block: int = TOKEN_BLOCK,
                vocab_block: int = VOCAB_BLOCK) -> tuple[Tensor, Tensor | None]:
    """log pi_s(target) [N] and, when asked, the entropy of pi_s [N] (detached), for the
    distribution softmax(hidden @ weight.T / temperature) over the whole vocabulary.

    The products run in autocast's dtype when autocast is on for this device (as the plain
    path's linear layer would), else in the weight's dtype; everything after them in float32.
    Differentiable with respect to `hidden` and `weight`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a sampling distribution, got {temperature}")
    compute = autocast_low_dtype(hidden.device.type) or weight.dtype
    return _HeadScores.apply(hidden, weight, targets, float(temperature), compute, with_entropy,
                             max(int(token_block), 1), max(int(vocab_block), 1))


def _tile_logits(h: Tensor, w: Tensor, temperature: float) -> Tensor:
    """z = h @ w.T / T for one tile (h and w in the compute dtype), as float32 [n, v]."""
    z = (h @ w.T).float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _HeadScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, compute, with_entropy, token_block, vocab_block):
        n, vocab = hidden.shape[0], weight.shape[0]
        starts = range(0, vocab, vocab_block)
        tile_lse = hidden.new_empty((n, len(starts)), dtype=torch.float32)
        tile_qlogq = hidden.new_empty((n, len(starts)), dtype=torch.float32) if with_entropy else None
        picked = hidden.new_empty(n, dtype=torch.float32)
        targets = targets.long()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h_all = hidden.to(compute)
            for j, v0 in enumerate(starts):
                w = weight[v0:v0 + vocab_block].to(compute)  # each weight tile cast once
                for lo in range(0, n, token_block):
                    h, t = h_all[lo:lo + token_block], targets[lo:lo + token_block]
                    z = _tile_logits(h, w, temperature)
                    lse = torch.logsumexp(z, dim=-1, keepdim=True)
                    tile_lse[lo:lo + len(h), j] = lse.squeeze(-1)
                    here = ((t >= v0) & (t < v0 + z.shape[1])).nonzero().squeeze(-1)
                    picked[lo + here] = z[here, t[here] - v0]
                    if with_entropy:
                        log_q = z.sub_(lse)                      # the tile's own log-softmax
                        tile_qlogq[lo:lo + len(h), j] = (torch.exp(log_q).mul_(log_q)).sum(-1)
        lse = torch.logsumexp(tile_lse, dim=-1)
        logp = picked - lse
        entropy = None
        if with_entropy:
            # p = exp(tile_lse - lse) * q inside a tile, so
            # H = -Σ_tiles exp(tile_lse - lse) * (Σ q log q + tile_lse - lse).
            shift = tile_lse - lse[:, None]
            entropy = -(torch.exp(shift) * (tile_qlogq + shift)).sum(-1)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.settings = (temperature, compute, token_block, vocab_block)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, compute, token_block, vocab_block = ctx.settings
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        one_block = n <= token_block
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        # d logp_i / d z_iv = (onehot_iv - p_iv) / T; times the incoming gradient g_i.
        minus_g = (grad_logp.float() / -temperature)[:, None]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h_all = hidden.to(compute)
            for v0 in range(0, vocab, vocab_block):
                w = weight[v0:v0 + vocab_block].to(compute)
                tile_grad_weight = None
                for lo in range(0, n, token_block):
                    h, t = h_all[lo:lo + token_block], targets[lo:lo + token_block]
                    p = _tile_logits(h, w, temperature).sub_(lse[lo:lo + len(h), None]).exp_()
                    here = ((t >= v0) & (t < v0 + w.shape[0])).nonzero().squeeze(-1)
                    p[here, t[here] - v0] -= 1.0                  # p - onehot
                    grad_z = torch.empty(p.shape, dtype=compute, device=p.device)
                    torch.mul(p, minus_g[lo:lo + len(h)], out=grad_z)  # the cast comes free
                    if want_hidden:
                        grad_hidden[lo:lo + len(h)] += grad_z @ w
                    if want_weight:
                        part = grad_z.T @ h
                        if one_block:
                            tile_grad_weight = part
                        elif tile_grad_weight is None:
                            tile_grad_weight = part.float()
                        else:
                            tile_grad_weight += part
                if want_weight:
                    grad_weight[v0:v0 + w.shape[0]] = tile_grad_weight
        return (grad_hidden.to(hidden.dtype) if want_hidden else None, grad_weight,
                None, None, None, None, None, None)

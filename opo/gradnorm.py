"""Per-response estimates of ‖∇_θ logπ(y|x)‖², the weight in the optimal baseline.

The variance-minimising baseline for the policy gradient ∇logπ(y)·(r − b) is

    b* = E[‖∇logπ(y)‖² r] / E[‖∇logπ(y)‖²],

and OPO replaces ‖∇logπ(y)‖² by the response length. Here are two ways of getting
closer to the real thing:

* **exact**: one backward pass per response gives ∇_θ Σ_t logπ(y_t) and its squared
  norm. Its cost is a full backward per response: fine for the tiny models, too slow
  for large ones.
* **proxy**: the chain rule through the last layer gives ∂logπ(y_t)/∂z_t = e_{y_t} − π_t
  for the logits z_t of token t, whose squared norm is 1 − 2π_t(y_t) + Σ_v π_t(v)².
  Summing it over the response's tokens treats the parameter Jacobian of the logits as
  roughly the same, and the tokens' gradients as roughly orthogonal; it needs only the
  logits of one forward pass. Confident tokens (π(y_t) → 1) contribute nearly 0, so it
  counts "uncertain tokens" where OPO counts all tokens.

Sampling at temperature τ scales every logit gradient by 1/τ; that factor is the same
for every response and cancels in Σ w r / Σ w, so it is left out of the proxy. Under
top-k / top-p, π is the truncated, renormalised distribution the trainer samples from
(tokens outside the support have probability 0 and add nothing).

`response_weights(kind, model, packed)` is the one entry the trainer needs: it returns
the weights [B] for ``opo.advantages.compute_advantages(..., weights=...)``. ``packed``
is the trainer's batch (``opo.sequences.Packed``); responses are scored through
``opo.sequences`` exactly as the loss scores them.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from opo.sequences import Dist, response_logits


# --------------------------------------------------------------------------- pure maths

def logit_grad_sq_norm(logits: Tensor, targets: Tensor) -> Tensor:
    """‖∂ log softmax(z)[y] / ∂z‖² per token: logits [..., V], targets [...] -> [...] float32.

    Equals 1 − 2π(y) + Σ_v π(v)², computed as (1 − π(y))² + Σ_{v≠y} π(v)² so that it
    stays >= 0 when π(y) is close to 1.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    p_y = probs.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    others = ((probs * probs).sum(-1) - p_y * p_y).clamp_min(0.0)
    return (1.0 - p_y) ** 2 + others


def proxy_grad_sq_norm(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Σ_t ‖∂logπ(y_t)/∂z_t‖² over each response: logits [B,T,V], targets [B,T],
    mask [B,T] (1 on response tokens) -> [B] float64."""
    per_token = logit_grad_sq_norm(logits, targets).double()
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)


# --------------------------------------------------------------------------- model side

def _trainable(model, params: Sequence[Tensor] | None) -> list[Tensor]:
    found = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not found:
        raise ValueError("no trainable parameters to take gradients of")
    return found


def per_response_grads(model, packed, params: Sequence[Tensor] | None = None,
                       dist=None, rows: Sequence[int] | None = None
                       ) -> Iterator[tuple[int, Tensor, float, float]]:
    """For each response i (every row, or those in ``rows``): (i, flat ∇_θ logπ(y_i|x_i)
    [D] float32, its proxy weight, log π(y_i|x_i)), one forward and backward pass each.

    ``dist`` (``opo.sequences.Dist``: temperature, top-p, top-k; default plain softmax)
    is the sampling distribution: π is the truncated, renormalised one the trainer samples.

    The gradient is taken over ``params`` (default: every trainable parameter) with
    ``torch.autograd.grad``, so the parameters' ``.grad`` are left untouched.
    """
    params = _trainable(model, params)
    dist = dist or Dist()
    for i in (range(packed.num_rows) if rows is None else rows):
        row = packed.rows(torch.tensor([i]))
        logits = response_logits(model, row, dist)                     # [1, T, V]
        logp_tok = torch.log_softmax(logits, -1).gather(-1, row.response_ids[..., None]).squeeze(-1)
        logp = (logp_tok * row.response_mask).sum()
        grads = torch.autograd.grad(logp, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, params)])
        proxy = float(proxy_grad_sq_norm(logits.detach(), row.response_ids, row.response_mask)[0])
        yield i, flat, proxy, float(logp.detach())


def exact_grad_sq_norm(model, packed, params: Sequence[Tensor] | None = None, dist=None) -> Tensor:
    """‖∇_θ logπ(y_i|x_i)‖² for every response: [B] float64 on packed's device.

    Rows with the same prompt and response (a confident policy samples the same response
    many times) share one backward pass.
    """
    prompts = packed.prompt_ids.tolist()
    keys = []
    for i in range(packed.num_rows):
        n = int(packed.response_mask[i].sum())
        keys.append((tuple(prompts[int(packed.row_group[i])]), tuple(packed.response_ids[i, :n].tolist())))
    first = list(dict.fromkeys(keys))
    index = {key: j for j, key in enumerate(first)}
    norms = torch.zeros(len(first), dtype=torch.float64)
    rows = [keys.index(key) for key in first]
    for i, flat, _, _ in per_response_grads(model, packed, params, dist, rows):
        norms[index[keys[i]]] = flat.double().pow(2).sum()
    return norms[[index[key] for key in keys]].to(packed.response_ids.device)


@torch.no_grad()
def model_proxy_grad_sq_norm(model, packed, dist=None, micro_batch_size: int = 0) -> Tensor:
    """The logit-gradient proxy for every response, from forward passes only:
    [B] float64 on packed's device. ``micro_batch_size`` rows at a time (0 = all), which
    bounds the [rows, T, V] logits held at once."""
    n = packed.num_rows
    out = torch.zeros(n, dtype=torch.float64)
    for idx in packed.micro_batches(max_rows=micro_batch_size):
        micro = packed.rows(torch.tensor(idx))
        logits = response_logits(model, micro, dist or Dist())
        out[idx] = proxy_grad_sq_norm(logits, micro.response_ids, micro.response_mask).cpu()
    return out.to(packed.response_ids.device)


def response_weights(kind: str, model, packed, dist=None, micro_batch_size: int = 0) -> Tensor:
    """Weights [B] float64 for the estimator that declared ``needs=kind``
    (``opo.advantages.estimator_needs``): ``grad_sq_norm_exact`` or ``grad_sq_norm_proxy``.

    Call it on the batch just sampled, before the optimiser step, with the policy that
    sampled it and its sampling distribution ``dist`` (``opo.sequences.Dist``). The
    result is on ``packed``'s device, which must be the model's.
    """
    if kind == "grad_sq_norm_exact":
        return exact_grad_sq_norm(model, packed, dist=dist)
    if kind == "grad_sq_norm_proxy":
        return model_proxy_grad_sq_norm(model, packed, dist, micro_batch_size)
    raise ValueError(f"unknown weight kind {kind!r}; use grad_sq_norm_exact or grad_sq_norm_proxy")

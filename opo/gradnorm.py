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
for every response and cancels in Σ w r / Σ w, so it is left out of the proxy.

`response_weights(kind, model, packed)` is the one entry the trainer needs: it returns
the weights [B] for ``opo.advantages.compute_advantages(..., weights=...)``. ``packed``
is the trainer's right-padded batch (``opo.sequences.Packed``): ``input_ids`` [B,T],
``attention_mask`` [B,T], ``start`` and ``response_mask`` [B, T-1-start], where window
position j predicts token ``start + j + 1``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor


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

def _row(packed, i: int) -> tuple[Tensor, Tensor]:
    """Row i without its right padding: ids [n] and the response mask [n-1] over
    positions 0..n-2 (position t predicts token t+1)."""
    n = int(packed.attention_mask[i].sum())
    ids = packed.input_ids[i, :n]
    mask = torch.zeros(n - 1, dtype=torch.float32, device=ids.device)
    width = n - 1 - packed.start
    if width > 0:
        mask[packed.start:] = packed.response_mask[i, :width].float()
    return ids, mask


def _trainable(model, params: Sequence[Tensor] | None) -> list[Tensor]:
    found = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not found:
        raise ValueError("no trainable parameters to take gradients of")
    return found


def per_response_grads(model, packed, params: Sequence[Tensor] | None = None,
                       temperature: float = 1.0, rows: Sequence[int] | None = None
                       ) -> Iterator[tuple[int, Tensor, float, float]]:
    """For each response i (every row, or those in ``rows``): (i, flat ∇_θ logπ(y_i|x_i)
    [D] float32, its proxy weight, log π(y_i|x_i)), one forward and backward pass each.

    The gradient is taken over ``params`` (default: every trainable parameter) with
    ``torch.autograd.grad``, so the parameters' ``.grad`` are left untouched. The model is
    used in whatever train/eval mode it is in (it must match the sampling distribution).
    """
    params = _trainable(model, params)
    for i in (range(packed.input_ids.shape[0]) if rows is None else rows):
        ids, mask = _row(packed, i)
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float() / temperature
        targets = ids[1:]
        logp = (torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum()
        grads = torch.autograd.grad(logp, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(grads, params)])
        proxy = float(proxy_grad_sq_norm(logits.detach().unsqueeze(0), targets.unsqueeze(0),
                                         mask.unsqueeze(0))[0])
        yield i, flat, proxy, float(logp.detach())


def exact_grad_sq_norm(model, packed, params: Sequence[Tensor] | None = None,
                       temperature: float = 1.0) -> Tensor:
    """‖∇_θ logπ(y_i|x_i)‖² for every response: [B] float64 on packed's device.

    Rows with the same tokens and response mask (a confident policy samples the same
    response many times) share one backward pass.
    """
    n = packed.input_ids.shape[0]
    keys = []
    for i in range(n):
        ids, mask = _row(packed, i)
        keys.append((tuple(ids.tolist()), tuple(mask.tolist())))
    first = list(dict.fromkeys(keys))
    index = {key: j for j, key in enumerate(first)}
    norms = torch.zeros(len(first), dtype=torch.float64)
    rows = [keys.index(key) for key in first]
    for i, flat, _, _ in per_response_grads(model, packed, params, temperature, rows):
        norms[index[keys[i]]] = flat.double().pow(2).sum()
    return norms[[index[key] for key in keys]].to(packed.input_ids.device)


@torch.no_grad()
def model_proxy_grad_sq_norm(model, packed, temperature: float = 1.0,
                             micro_batch_size: int = 0) -> Tensor:
    """The logit-gradient proxy for every response, from forward passes only:
    [B] float64 on packed's device. ``micro_batch_size`` rows at a time (0 = all), which
    bounds the [rows, T, V] logits held at once."""
    n = packed.input_ids.shape[0]
    size = micro_batch_size or n
    keep = packed.input_ids.shape[1] - packed.start
    out = []
    for s in range(0, n, size):
        rows = slice(s, min(s + size, n))
        logits = model(input_ids=packed.input_ids[rows], attention_mask=packed.attention_mask[rows],
                       logits_to_keep=keep).logits[:, :-1]
        targets = packed.input_ids[rows, packed.start + 1:]
        out.append(proxy_grad_sq_norm(logits.float() / temperature, targets,
                                      packed.response_mask[rows]))
    return torch.cat(out)


def response_weights(kind: str, model, packed, temperature: float = 1.0,
                     micro_batch_size: int = 0) -> Tensor:
    """Weights [B] float64 for the estimator that declared ``needs=kind``
    (``opo.advantages.estimator_needs``): ``grad_sq_norm_exact`` or ``grad_sq_norm_proxy``.

    Call it on the batch just sampled, before the optimiser step, with the policy that
    sampled it and the sampling temperature.
    """
    if kind == "grad_sq_norm_exact":
        return exact_grad_sq_norm(model, packed, temperature=temperature)
    if kind == "grad_sq_norm_proxy":
        return model_proxy_grad_sq_norm(model, packed, temperature, micro_batch_size)
    raise ValueError(f"unknown weight kind {kind!r}; use grad_sq_norm_exact or grad_sq_norm_proxy")

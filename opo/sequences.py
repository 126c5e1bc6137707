"""Packing prompt+response pairs into padded tensors and scoring them under a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opo.loss import token_entropy, token_logprobs


@dataclass
class Packed:
    """Right-padded prompt+response rows, cut to the window that holds response targets.

    input_ids [B, T]; attention_mask [B, T]; `start` is the first position whose next
    token can be a response token, so the model only has to produce logits for
    positions start..T-2 (about the response length, not the prompt's).
    response_mask [B, T-1-start]: 1 where the target at that position is a response token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    start: int

    def to(self, device) -> "Packed":
        return Packed(self.input_ids.to(device), self.attention_mask.to(device),
                      self.response_mask.to(device), self.start)

    def rows(self, idx) -> "Packed":
        return Packed(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx], self.start)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    start = min(len(p) for p in prompts) - 1
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    resp = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = 1
        resp[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0  # position t predicts token t+1
    return Packed(ids, attn, resp[:, start:], start)


def score(model, packed: Packed, with_entropy: bool = False, entropy_grad: bool = False):
    """log pi(target) for the window [B, W], and the token entropy there (or None).

    The entropy is detached unless `entropy_grad` (an entropy bonus needs its gradient;
    the metric alone does not, and keeping it out of the graph saves a [B, W, V] tensor).
    """
    width = packed.input_ids.shape[1]
    keep = width - packed.start  # logits for positions start..T-1; the last one predicts nothing
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   logits_to_keep=keep).logits[:, :-1]
    targets = packed.input_ids[:, packed.start + 1:]
    logp = token_logprobs(logits, targets)
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = token_entropy(logits)
        else:
            with torch.no_grad():
                entropy = token_entropy(logits.detach())
    return logp, entropy


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices cutting n rows into chunks of `size` (0 = one chunk)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def batched_logprobs(model, packed: Packed, micro_batch_size: int = 0) -> torch.Tensor:
    """log pi(target) [B, W] without gradients, `micro_batch_size` rows at a time (0 = all)."""
    device = next(model.parameters()).device
    return torch.cat([score(model, packed.rows(s).to(device))[0]
                      for s in micro_batches(packed.input_ids.shape[0], micro_batch_size)])

"""Packing prompt+response rows and scoring their response tokens under a model.

Scoring is where exactness and memory meet:
- tokens are scored under the sampling distribution (temperature, top-k, top-p) through
  `opo.sampling`, the same maths every engine samples with;
- only response positions reach the output layer, and they do so in chunks of at most
  `chunk_tokens` tokens, each recomputed in the backward pass, so no [B, T, V] tensor of
  logits ever exists: memory is bounded by one chunk's [chunk, V];
- micro-batches are cut by rows *and* by a token budget, and each micro-batch is trimmed
  to its own widest row, so padding costs little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from opo import sampling


@dataclass(frozen=True)
class Dist:
    """The sampling distribution tokens are scored under."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Packed:
    """Right-padded prompt+response rows, cut to the window that holds response targets.

    input_ids [B, W]; attention_mask [B, W]; `start` is the first position whose next
    token can be a response token, so only positions start..W-2 need logits.
    response_mask [B, W-1-start]: 1 where the target at that position is a response token.
    values: named per-token tensors laid out like response_mask (sampler log-probs,
    stored old log-probs); `rows` slices and trims them together with the ids.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    start: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "Packed":
        return Packed(self.input_ids.to(device), self.attention_mask.to(device),
                      self.response_mask.to(device), self.start,
                      {k: v.to(device) for k, v in self.values.items()})

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def row_lengths(self) -> torch.Tensor:
        """Prompt+response tokens per row [B]."""
        return self.attention_mask.sum(-1)

    def rows(self, idx) -> "Packed":
        """The rows `idx` (indices, slice or mask), trimmed to the columns they use."""
        ids, attn = self.input_ids[idx], self.attention_mask[idx]
        resp = self.response_mask[idx]
        values = {k: v[idx] for k, v in self.values.items()}
        if ids.shape[0] == 0:
            return Packed(ids, attn, resp, self.start, values)
        width = int(attn.sum(-1).max())
        # First response target of each row sits at window column c, i.e. position start + c.
        first = (resp > 0).float().argmax(-1)
        start = self.start + int(first.min())
        lo, hi = start - self.start, width - 1 - self.start
        return Packed(ids[:, :width], attn[:, :width], resp[:, lo:hi], start,
                      {k: v[:, lo:hi] for k, v in values.items()})

    def spread(self, per_row: list[list[float]]) -> torch.Tensor:
        """Per-token values of each response (e.g. sampler log-probs) laid out like response_mask."""
        flat = torch.tensor([x for row in per_row for x in row], dtype=torch.float32)
        out = torch.zeros(self.response_mask.shape, dtype=torch.float32)
        return out.masked_scatter(self.response_mask.cpu().bool(), flat).to(self.response_mask.device)


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


def plan_micro_batches(lengths: list[int], max_rows: int = 0, max_tokens: int = 0) -> list[list[int]]:
    """Group row indices into micro-batches of at most `max_rows` rows and at most
    `max_tokens` padded tokens (rows x widest row); 0 means no limit.

    Rows are taken longest first, so rows of similar length share a micro-batch and
    little is padded. A row longer than `max_tokens` still gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for i in order:
        if plan:
            current = plan[-1]
            widest = max(lengths[current[0]], lengths[i])  # the first row is the longest
            fits_rows = not max_rows or len(current) < max_rows
            fits_tokens = not max_tokens or (len(current) + 1) * widest <= max_tokens
            if fits_rows and fits_tokens:
                current.append(i)
                continue
        plan.append([i])
    return plan


def _output_layer(model):
    """The output projection and any final logit soft-capping (Gemma-style) of a causal LM."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def score(model, packed: Packed, dist: Dist = Dist(), *, with_entropy: bool = False,
          chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_s(target) over the window [B, W'] (0 off the response mask), and the
    sampling distribution's entropy there (detached) or None.

    The decoder runs once on the rows; the output layer runs only on response
    positions, `chunk_tokens` at a time (0 = all at once). With more than one chunk and
    gradients enabled, each chunk is recomputed during backward instead of keeping its
    [chunk, V] logits alive.
    """
    hidden = model.get_decoder()(input_ids=packed.input_ids,
                                 attention_mask=packed.attention_mask).last_hidden_state
    mask = packed.response_mask.bool()
    h = hidden[:, packed.start:-1][mask]                          # [N, H] response positions
    targets = packed.input_ids[:, packed.start + 1:][mask]        # [N]
    head = _output_layer(model)

    def chunk_scores(h_c, t_c):
        # One output-layer product serves both the log-probs and the (detached) entropy.
        logits = head(h_c)
        logp = sampling.target_logprobs(logits, t_c, dist.temperature, dist.top_p, dist.top_k)
        if not with_entropy:
            return logp, None
        return logp, sampling.entropy(logits, dist.temperature, dist.top_p, dist.top_k)

    n = h.shape[0]
    size = chunk_tokens if chunk_tokens and chunk_tokens < n else max(n, 1)
    recompute = size < n and torch.is_grad_enabled()
    logp_parts, ent_parts = [], []
    for lo in range(0, n, size):
        h_c, t_c = h[lo:lo + size], targets[lo:lo + size]
        if recompute:  # keep only h_c for backward; the chunk's logits are rebuilt there
            logp_c, ent_c = checkpoint(chunk_scores, h_c, t_c, use_reentrant=False)
        else:
            logp_c, ent_c = chunk_scores(h_c, t_c)
        logp_parts.append(logp_c)
        ent_parts.append(ent_c)
    flat = torch.cat(logp_parts) if logp_parts else h.new_zeros(0)
    logp = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
    entropy = None
    if with_entropy:
        ent = torch.cat(ent_parts) if ent_parts else flat.new_zeros(0)
        entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)
    return logp, entropy


@torch.no_grad()
def batched_logprobs(model, packed: Packed, dist: Dist = Dist(), *, max_rows: int = 0,
                     max_tokens: int = 0, chunk_tokens: int = 0) -> torch.Tensor:
    """log pi_s(target) [B, W'] without gradients, micro-batch by micro-batch."""
    device = next(model.parameters()).device
    out = torch.zeros(packed.response_mask.shape, dtype=torch.float32)
    lengths = packed.row_lengths().tolist()
    for idx in plan_micro_batches(lengths, max_rows, max_tokens):
        micro = packed.rows(torch.tensor(idx)).to(device)
        logp = score(model, micro, dist, chunk_tokens=chunk_tokens)[0].cpu()
        lo = micro.start - packed.start
        out[idx, lo:lo + logp.shape[1]] = logp
    return out.to(packed.response_mask.device)

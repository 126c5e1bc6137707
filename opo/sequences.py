"""Rollout rows ready for scoring, and scoring their response tokens under a model.

Scoring is where exactness, memory and speed meet:
- tokens are scored under the sampling distribution (temperature, top-k, top-p) through
  `opo.sampling`, the same maths every engine samples with;
- the K responses to one prompt share one pass over the prompt: its keys and values are
  computed once and reused by all K rows (the backward pass flows through them once), so
  the prompt is not run K times; this is the same computation as K full rows, not an
  approximation, and it is checked against them in the tests;
- only response positions reach the output layer. On a CPU, for a plain output layer and
  no top-k / top-p, `opo.output_layer` computes the log-probs and entropy from tiles of the
  logits; otherwise they go through in chunks of at most `chunk_tokens` tokens, each
  recomputed in the backward pass when there is more than one. Either way no [B, T, V]
  tensor of logits ever exists;
- micro-batches are cut by rows and by a token budget, and each is trimmed to its own
  longest prompt and response.

Layout: everything per response token is a [B, T] tensor whose column t is response
token t of row b (right-padded; `response_mask` marks real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from opo import output_layer, packing, sampling
from opo.models import cache_kwarg, is_sharded
from opo.precision import autocast_low_dtype


@dataclass(frozen=True)
class Dist:
    """The sampling distribution tokens are scored under."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Packed:
    """B response rows answering G distinct prompts.

    prompt_ids [G, P] left-padded, prompt_mask [G, P]; row_group [B] (long) names the
    prompt of each row; response_ids [B, T] right-padded, response_mask [B, T] (float,
    1 on real tokens). values: named [B, T] per-token tensors (sampler log-probs, stored
    old log-probs) that `rows` selects and trims together with the ids.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    row_group: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "Packed":
        return Packed(self.prompt_ids.to(device), self.prompt_mask.to(device), self.row_group.to(device),
                      self.response_ids.to(device), self.response_mask.to(device),
                      {k: v.to(device) for k, v in self.values.items()})

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    def response_lengths(self) -> list[int]:
        return self.response_mask.sum(-1).long().tolist()

    def prompt_lengths(self) -> list[int]:
        """Prompt tokens of each row's prompt [B]."""
        return self.prompt_mask.sum(-1)[self.row_group].long().tolist()

    def rows(self, idx) -> "Packed":
        """The rows `idx` (indices or a slice), with only their prompts, trimmed to the
        longest prompt and response among them."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.arange(self.num_rows)[idx]
        idx = idx.to(self.row_group.device)
        used, row_group = torch.unique(self.row_group[idx], return_inverse=True)
        prompt_ids, prompt_mask = self.prompt_ids[used], self.prompt_mask[used]
        resp_ids, resp_mask = self.response_ids[idx], self.response_mask[idx]
        p = int(prompt_mask.sum(-1).max()) if len(used) else 0
        t = int(resp_mask.sum(-1).max()) if len(idx) else 0
        return Packed(prompt_ids[:, prompt_ids.shape[1] - p:], prompt_mask[:, prompt_mask.shape[1] - p:],
                      row_group, resp_ids[:, :t], resp_mask[:, :t],
                      {k: v[idx][:, :t] for k, v in self.values.items()})

    def spread(self, per_row: list[list[float]]) -> torch.Tensor:
        """Per-token values of each response (e.g. sampler log-probs) in the [B, T] layout."""
        out = torch.zeros(self.response_mask.shape, dtype=torch.float32)
        for i, row in enumerate(per_row):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return out.to(self.response_mask.device)

    def micro_batches(self, max_rows: int = 0, max_tokens: int = 0) -> list[list[int]]:
        """Row indices per micro-batch; see `plan_micro_batches`."""
        return plan_micro_batches(self.response_lengths(), max_rows, max_tokens,
                                  groups=self.row_group.tolist(), prompt_lengths=self.prompt_lengths())


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    """Rows of (prompt, response) token lists; rows with identical prompts share one prompt."""
    distinct: dict[tuple, int] = {}
    row_group = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    unique = list(distinct)
    width = max(map(len, unique))
    prompt_ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(unique), width), dtype=torch.long)
    for g, p in enumerate(unique):
        prompt_ids[g, width - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[g, width - len(p):] = 1
    t = max(map(len, responses))
    response_ids = torch.full((len(responses), t), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), t), dtype=torch.float32)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1.0
    return Packed(prompt_ids, prompt_mask, torch.tensor(row_group), response_ids, response_mask)


def plan_micro_batches(lengths: list[int], max_rows: int = 0, max_tokens: int = 0, *,
                       groups: list[int] | None = None,
                       prompt_lengths: list[int] | None = None) -> list[list[int]]:
    """Group row indices into micro-batches of at most `max_rows` rows and at most
    `max_tokens` padded tokens; 0 means no limit.

    lengths are response lengths. With `groups` and `prompt_lengths`, rows answering one
    prompt are kept together where the budget allows (they share the prompt's pass), and
    a micro-batch costs (its prompts x longest prompt) + (its rows x longest response);
    without them it costs rows x longest length. Rows are taken longest first, so rows of
    similar length share a micro-batch. A row over budget on its own gets its own.
    """
    n = len(lengths)
    groups = groups if groups is not None else list(range(n))
    plens = prompt_lengths if prompt_lengths is not None else [0] * n
    longest = {}
    for i in range(n):
        longest[groups[i]] = max(longest.get(groups[i], 0), lengths[i])
    order = sorted(range(n), key=lambda i: (-longest[groups[i]], groups[i], -lengths[i], i))

    def cost(rows: list[int]) -> int:
        prompts = {groups[i] for i in rows}
        return len(prompts) * max(plens[i] for i in rows) + len(rows) * max(lengths[i] for i in rows)

    plan: list[list[int]] = []
    for i in order:
        if plan:
            current = plan[-1]
            fits_rows = not max_rows or len(current) < max_rows
            if fits_rows and (not max_tokens or cost(current + [i]) <= max_tokens):
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


def can_share_prompts(model) -> bool:
    """Whether the prompt's keys/values can be computed once and reused: true for full-attention
    decoders. Sliding-window layers and activation checkpointing (which turns the cache off in
    transformers) use one full pass per row instead."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    if any("sliding" in str(t) for t in layer_types):
        return False
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(model), name):
            return not getattr(model, name)
    return True


def length_buckets(lengths: list[int], overhead: int = 32) -> list[list[int]]:
    """Split rows into buckets of similar length (longest first) so that padding each bucket
    to its own longest row wastes little: minimises Σ rows x longest + overhead per bucket,
    where `overhead` (in tokens) stands for the fixed cost of one more forward call.

    An exact dynamic programme over the rows sorted by length, O(B²); above 512 rows,
    consecutive slices of 64 sorted rows instead.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n > 512:
        return [order[i:i + 64] for i in range(0, n, 64)]
    best = [0] + [float("inf")] * n      # best[j]: cost of bucketing the j longest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):               # last bucket = sorted rows i..j-1, padded to row i's length
            c = best[i] + (j - i) * lengths[order[i]] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _pass_overhead(like: torch.Tensor) -> int:
    """`length_buckets`' cost of one more decoder pass, in padded tokens. Under bf16/fp16
    autocast each token costs less and a pass's fixed cost (per-layer calls, the weights'
    gradients of one more pass) counts for more: on SmolLM2 at 32 rows, a 2-core Xeon
    (AMX) scored and back-propagated fastest at 96 under bf16, and float32 was flat from
    32 to 160 (benchmarks/bench_buckets.py)."""
    return 96 if autocast_low_dtype(like.device.type) else 32


def _hidden_shared(model, packed: Packed) -> torch.Tensor:
    """Hidden states [B, T, H] that predict response tokens 0..T-1, one prompt pass per prompt.

    The prompts run once; their keys and values then serve every row. The responses run as
    one packed batch where `opo.packing` can take the model (Llama-family decoders on a CPU),
    otherwise in buckets of similar length (`length_buckets`), so short responses are not
    padded to the longest one. Gradients reach each prompt pass once, through all rows that
    used it.
    """
    from transformers import DynamicCache

    decoder = model.get_decoder()
    kw = cache_kwarg(decoder)
    # One embedding lookup for all tokens, prompts and responses: the backward pass of each
    # lookup builds a dense [vocabulary, hidden] gradient (113 MB for SmolLM2), so a lookup
    # per bucket would fill and add that table once per bucket.
    g, p = packed.prompt_ids.shape
    b, t = packed.response_ids.shape
    embedded = decoder.get_input_embeddings()(torch.cat([packed.prompt_ids.reshape(-1),
                                                         packed.response_ids.reshape(-1)]))
    prompt_emb, response_emb = embedded[:g * p].view(g, p, -1), embedded[g * p:].view(b, t, -1)
    prompt_pos = (packed.prompt_mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    out = decoder(inputs_embeds=prompt_emb, attention_mask=packed.prompt_mask, position_ids=prompt_pos,
                  use_cache=True, **{kw: cache})
    last = out.last_hidden_state[:, -1]                         # [G, H]: predicts response token 0
    prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
    if packing.unsupported_reason(model) is None:  # one packed pass for all responses
        return packing.response_hidden(decoder, packed, response_emb, prompt_kv, last, length_buckets)
    starts = packed.prompt_mask.sum(-1)                         # real prompt tokens per prompt
    hidden = last.new_zeros(b, t, last.shape[-1])
    # Under FSDP2 every decoder forward all-gathers each layer, so all ranks must make the same
    # number of them, whatever their responses' lengths: one bucket, and a response pass even
    # when every response of the micro-batch is a single token (its output is then unused).
    sharded = is_sharded(decoder)
    buckets = [list(range(b))] if sharded else length_buckets(packed.response_lengths(), _pass_overhead(last))
    for rows in buckets:
        idx = torch.tensor(rows, device=last.device)
        groups = packed.row_group[idx]
        width = int(packed.response_mask[idx].sum(-1).max())
        parts = [last[groups, None]]
        if width > 1 or sharded:
            steps = max(width - 1, 1)
            # index_select, not k[groups]: the same rows, and its backward (an index_add) is several
            # times faster on a CPU than indexing's (an accumulating index_put) with repeated rows.
            bucket_cache = DynamicCache(ddp_cache_data=[(k.index_select(0, groups), v.index_select(0, groups))
                                                        for k, v in prompt_kv], config=model.config)
            mask = torch.cat([packed.prompt_mask[groups], packed.response_mask[idx, :steps].long()], dim=-1)
            pos = starts[groups, None] + torch.arange(steps, device=idx.device)
            out = decoder(inputs_embeds=response_emb[idx, :steps], attention_mask=mask, position_ids=pos,
                          use_cache=True, **{kw: bucket_cache})
            parts.append(out.last_hidden_state[:, :width - 1])
        cols = torch.arange(width, device=idx.device)
        hidden = hidden.index_put((idx[:, None], cols[None, :]), torch.cat(parts, dim=1))
    return hidden


def _hidden_full(model, packed: Packed) -> torch.Tensor:
    """The same hidden states [B, T, H], from one right-padded prompt+response pass per row."""
    plen = packed.prompt_mask.sum(-1)[packed.row_group]          # [B]
    rlen = packed.response_mask.sum(-1).long()
    b, t = packed.response_ids.shape
    width = int((plen + rlen).max())
    ids = torch.zeros((b, width), dtype=torch.long, device=packed.response_ids.device)
    attn = torch.zeros_like(ids)
    for i in range(b):
        p, r = int(plen[i]), int(rlen[i])
        g = int(packed.row_group[i])
        ids[i, :p] = packed.prompt_ids[g, packed.prompt_ids.shape[1] - p:]
        ids[i, p:p + r] = packed.response_ids[i, :r]
        attn[i, :p + r] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    index = (plen[:, None] - 1 + torch.arange(t, device=plen.device)).clamp(max=width - 1)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


class ScoreModule(torch.nn.Module):
    """`score` as the forward of a module that holds the causal LM (as `.lm`).

    DDP and FSDP2 work through hooks around the forward of the module they wrap: DDP
    prepares its gradient all-reduce there, FSDP2 gathers the root's parameters (here the
    embeddings, final norm and output layer) and queues its end-of-backward work. `score`
    calls the decoder and the output layer directly rather than the model's forward, so
    on a wrapped causal LM those hooks would never run. Wrapping this module instead makes
    every scoring call a forward of the wrapped root (see opo.parallel.wrap).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, packed: "Packed", dist: Dist = Dist(), with_entropy: bool = False,
                chunk_tokens: int = 0, share_prompts: bool | None = None, entropy_grad: bool = False):
        return _score_lm(self.lm, packed, dist, with_entropy=with_entropy, chunk_tokens=chunk_tokens,
                         share_prompts=share_prompts, entropy_grad=entropy_grad)


def response_logits(model, packed: Packed, dist: Dist = Dist()) -> torch.Tensor:
    """Filtered logits of the sampling distribution at every response position [B, T, V]
    (float32). For instruments on small models: unlike `score`, this holds all of them."""
    hidden = (_hidden_shared if can_share_prompts(model) else _hidden_full)(model, packed)
    return sampling.filter_logits(_output_layer(model)(hidden), dist.temperature, dist.top_p, dist.top_k)


def score(model, packed: Packed, dist: Dist = Dist(), *, with_entropy: bool = False,
          chunk_tokens: int = 0, share_prompts: bool | None = None,
          entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_s of every response token [B, T] (0 off the mask), and the sampling
    distribution's entropy there or None. The entropy is detached (a metric) unless
    `entropy_grad` (an entropy bonus in the loss).

    `model` is a causal LM, or a `ScoreModule` (bare, under DDP, or sharded by FSDP2),
    which is called through its forward so that the wrapper's hooks run.
    share_prompts: run each prompt once for all its rows (None = when the model allows it).
    The output layer sees response positions only, `chunk_tokens` at a time (0 = all); with
    more than one chunk and gradients on, each chunk is recomputed during backward.
    """
    if isinstance(getattr(model, "module", model), ScoreModule):  # DDP keeps it as .module
        return model(packed, dist, with_entropy=with_entropy, chunk_tokens=chunk_tokens,
                     share_prompts=share_prompts, entropy_grad=entropy_grad)
    return _score_lm(model, packed, dist, with_entropy=with_entropy, chunk_tokens=chunk_tokens,
                     share_prompts=share_prompts, entropy_grad=entropy_grad)


def _score_lm(model, packed: Packed, dist: Dist, *, with_entropy: bool, chunk_tokens: int,
              share_prompts: bool | None, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    if share_prompts is None:
        share_prompts = can_share_prompts(model)
    hidden = (_hidden_shared if share_prompts else _hidden_full)(model, packed)
    mask = packed.response_mask.bool()
    h = hidden[mask]                                   # [N, H]
    targets = packed.response_ids[mask]                # [N]
    n = h.shape[0]
    # The tiles give a detached entropy only; a differentiable one takes the plain path.
    weight = output_layer.usable_weight(model, dist) if n and not (with_entropy and entropy_grad) else None
    if weight is not None:  # tiles of the logits only, in forward and backward (opo.output_layer)
        flat, ent = output_layer.head_scores(h, weight, targets, dist.temperature, with_entropy)
        return _unflatten(flat, mask), (_unflatten(ent, mask) if with_entropy else None)
    head = _output_layer(model)

    def chunk_scores(h_c, t_c):
        # One output-layer product serves both the log-probs and the (detached) entropy.
        logits = head(h_c)
        if not with_entropy:
            return sampling.target_logprobs(logits, t_c, dist.temperature, dist.top_p, dist.top_k), None
        if entropy_grad:
            return (sampling.target_logprobs(logits, t_c, dist.temperature, dist.top_p, dist.top_k),
                    sampling.entropy(logits, dist.temperature, dist.top_p, dist.top_k, grad=True))
        return sampling.target_logprobs_and_entropy(logits, t_c, dist.temperature, dist.top_p, dist.top_k)

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
    flat = torch.cat(logp_parts) if logp_parts else h.new_zeros(0, dtype=torch.float32)
    entropy = None
    if with_entropy:
        entropy = _unflatten(torch.cat(ent_parts) if ent_parts else flat.new_zeros(0), mask)
    return _unflatten(flat, mask), entropy


def _unflatten(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N] of the N masked positions back to [B, T], 0 off the mask."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


@torch.no_grad()
def batched_logprobs(model, packed: Packed, dist: Dist = Dist(), *, max_rows: int = 0,
                     max_tokens: int = 0, chunk_tokens: int = 0, same_count=None) -> torch.Tensor:
    """log pi_s of every response token [B, T] without gradients, micro-batch by micro-batch.

    `same_count(plan) -> plan`, in data-parallel runs, gives every rank the same number of
    micro-batches (`opo.parallel.World.same_count`): FSDP2 gathers in every forward.
    """
    device = next(model.parameters()).device
    out = torch.zeros(packed.response_mask.shape, dtype=torch.float32)
    plan = packed.micro_batches(max_rows, max_tokens)
    for idx in same_count(plan) if same_count else plan:
        micro = packed.rows(torch.tensor(idx)).to(device)
        logp = score(model, micro, dist, chunk_tokens=chunk_tokens)[0].cpu()
        out[idx, :logp.shape[1]] = logp
    return out.to(packed.response_mask.device)


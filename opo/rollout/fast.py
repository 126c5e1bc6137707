"""A KV-cached sampler on the transformers model: the default engine.

Why not `generate`: for RL rollouts three things matter that `generate` does not do.
- The K samples of a prompt share one prefill: the prompt is run once and its keys and
  values are repeated K times, instead of K identical prompt passes.
- Finished rows leave the batch: once a quarter of the rows have emitted eos they are
  dropped from the cache, so a batch whose responses end early stops paying for them.
- Every token's log-probability under the sampling distribution is returned natively,
  through the same `opo.sampling` maths the trainer scores with.

The model runs in whatever mode the trainer keeps it in (dropout is off at load, see
`opo.models`), and the weights are the trainer's own, so syncing is free.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from opo.models import cache_kwarg
from opo.precision import autocast_low_dtype
from opo.rollout.base import LocalEngine, RolloutBatch, SamplingParams, pad_left, prompt_chunks
from opo.rollout.fused import FusedDecoder
from opo.sampling import sample


class FastEngine(LocalEngine):
    def __init__(self, model, tokenizer, eos_ids: list[int], batch_size: int = 0, fused: bool = True):
        super().__init__(model, tokenizer, eos_ids, batch_size)
        self.fused = fused  # decode supported models with opo.rollout.fused (rollout.fused_decode)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        rows, groups, responses, reasons, logprobs = [], [], [], [], []
        parts = prompt_chunks(len(prompt_ids), params.n, self.batch_size)
        # The weights are fixed for the whole call: fuse (and cast, and pack) them once.
        decoder = FusedDecoder.build(self.model, rows_hint=len(prompt_ids[parts[0]]) * params.n) \
            if self.fused and parts else None
        for part in parts:
            prompts = prompt_ids[part]
            resp, reas, lps = self._sample(prompts, params, decoder)
            responses += resp
            reasons += reas
            logprobs += lps
            rows += [p for p in prompts for _ in range(params.n)]
            groups += [part.start + g for g in range(len(prompts)) for _ in range(params.n)]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return RolloutBatch(prompt_ids=rows, response_ids=responses, finish_reasons=reasons,
                            group_ids=groups, policy_version=self.policy_version, texts=texts,
                            logprobs=logprobs)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """Last-position logits [B, V] of one forward pass that extends `cache`."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache})
        return out.logits[:, -1]

    def _sample(self, prompts: list[list[int]], params: SamplingParams, decoder: FusedDecoder | None = None):
        device = next(self.model.parameters()).device
        n, budget = params.n, params.max_new_tokens
        ids, mask = pad_left(prompts, self.tokenizer.pad_token_id, device)
        # Left padding: a row's positions count its real tokens only, as in training.
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        preallocated = all(type(layer) is DynamicLayer for layer in cache.layers)
        if preallocated:
            # Room for the whole response up front: the default layer re-copies its keys and
            # values into a new tensor at every token (a quarter of a SmolLM2 decode step).
            cache.layers = [PreallocatedLayer(ids.shape[1] + budget, _attention_dtype(device))
                            for _ in cache.layers]
        logits = self._forward(ids, mask, positions, cache)  # one prefill per prompt
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            positions = positions.repeat_interleave(n, 0)
        next_pos = positions[:, -1] + 1
        total = len(prompts) * n
        live = torch.arange(total, device=device)  # output row of each cache row
        running = torch.ones(total, dtype=torch.bool, device=device)  # cache rows still generating
        n_running = total
        eos = torch.tensor(self.eos_ids, device=device)
        tokens_by_step, logp_by_step, rows_by_step = [], [], []
        for t in range(budget):
            token, logp = sample(logits, params.temperature, params.top_p, params.top_k)
            kept = slice(None) if n_running == running.numel() else running.nonzero().squeeze(-1)
            tokens_by_step.append(token[kept])
            logp_by_step.append(logp[kept])
            rows_by_step.append(live[kept])
            done = torch.isin(token, eos) & running
            if t == budget - 1:
                break
            if bool(done.any()):
                running &= ~done
                n_running = int(running.sum())
                if n_running == 0:
                    break
                # A finished row stays in the batch (its tokens are dropped) until a quarter of
                # the batch has finished: a decode step reads every weight whatever the number of
                # rows, so a few rows more cost little, while dropping rows copies the whole cache.
                if n_running <= running.numel() * 3 // 4:
                    keep = running.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    live, token, mask, next_pos = live[keep], token[keep], mask[keep], next_pos[keep]
                    running = running[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            if decoder is not None and preallocated:
                logits = decoder.step(token, next_pos, mask.bool(), cache.layers)
            else:
                logits = self._forward(token[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        # Reassemble per-row sequences from the per-step (row, token, logp) triples.
        responses = [[] for _ in range(total)]
        logprobs = [[] for _ in range(total)]
        for live_rows, token, logp in zip(rows_by_step, tokens_by_step, logp_by_step):
            for r, tok, lp in zip(live_rows.tolist(), token.tolist(), logp.tolist()):
                responses[r].append(tok)
                logprobs[r].append(lp)
        # A row leaves the loop right after its eos, so it stopped iff its last token is one.
        eos_set = set(self.eos_ids)
        reasons = ["stop" if row[-1] in eos_set else "length" for row in responses]
        return responses, reasons, logprobs


def _attention_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype attention reads keys and values in: autocast's low-precision dtype, or None
    (as they come) outside autocast.

    Under bf16 autocast a Llama layer's rotated keys come out in fp32 (the rotary tables are
    fp32) and attention casts the whole cache to bf16 again at every token; storing them cast
    once gives attention the very same bf16 values without the per-token copy of the cache
    (copies fell from 14% to 9% of a bf16 SmolLM2 generation's CPU time)."""
    return autocast_low_dtype(device.type)


class PreallocatedLayer(DynamicLayer):
    """A cache layer with room for `capacity` positions, written in place.

    `keys`/`values` are views of the filled part, so everything transformers reads
    (sequence length, mask sizes) behaves as for its own growing layer; only `update`
    differs: it writes into the buffer instead of concatenating a new one. With `dtype`
    the buffer holds keys and values cast to it (see `_attention_dtype`).
    """

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity = capacity
        self.filled = 0
        self.store_dtype = dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._keys = key_states.new_empty(b, h, self.capacity, d, dtype=self.store_dtype or key_states.dtype)
        self._values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1],
                                              dtype=self.store_dtype or value_states.dtype)
        self._expose()
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys = self._keys[..., :self.filled, :]
        self.values = self._values[..., :self.filled, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"preallocated cache of {self.capacity} positions is full")
        self._keys[..., self.filled:end, :] = key_states
        self._values[..., self.filled:end, :] = value_states
        self.filled = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

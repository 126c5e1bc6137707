"""What every rollout engine returns, and the interface the trainer talks to.

    engine.generate(prompt_ids, params) -> RolloutBatch
    engine.sync_weights(model, version)   # after each optimiser step
    engine.close()                        # at the end of a run, before the process group goes
    engine.policy_version                 # optimiser steps behind the weights it samples from
    engine.samples_from_policy            # True: it runs the trainer's module (FSDP2 gathers it)

Each response carries, token by token, its log-probability under the distribution it
was actually drawn from (after temperature, top-k and top-p). The trainer scores the
same tokens under the same distribution and logs the difference (`logp_mismatch_*`):
that is how exact on-policy training is checked rather than assumed, for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                  # responses per prompt (K)
    temperature: float = 1.0    # 0 means greedy
    top_p: float = 1.0          # 1.0: no nucleus filtering
    top_k: int = 0              # 0: no top-k filtering
    max_new_tokens: int = 32


@dataclass
class RolloutBatch:
    """Responses for a batch of prompts; response i belongs to prompt group_ids[i].

    response_ids hold no padding and end with an eos token when finish_reason is "stop"
    (the eos is trained on: learning when to stop matters). logprobs[i][t] is log pi of
    response_ids[i][t] under the sampling distribution, as the sampler computed it.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finish_reasons: list[str]
    group_ids: list[int]
    policy_version: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    @property
    def truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reasons]

    def __len__(self) -> int:
        return len(self.response_ids)


class RolloutEngine(Protocol):
    policy_version: int
    samples_from_policy: bool

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module, version: int) -> None: ...

    def close(self) -> None: ...


class LocalEngine:
    """An engine that samples from the trainer's own module, so syncing weights is free:
    only the version moves. `fast` and `hf` share this."""

    samples_from_policy = True  # generates with the policy module: FSDP2 must gather it first

    def __init__(self, model, tokenizer, eos_ids: list[int], batch_size: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.policy_version = 0

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        self.model = model
        self.policy_version = version

    def close(self) -> None:
        """Nothing to release: the weights are the trainer's."""


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, L] and attention mask [B, L] (generation continues on the right)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(row: list[int], eos: set[int]) -> tuple[list[int], str]:
    """The response up to and including its first eos token, and why it ended."""
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    if cut is None:
        return row, "length"
    return row[:cut + 1], "stop"


def prompt_chunks(n_prompts: int, samples_per_prompt: int, batch_size: int) -> list[slice]:
    """Slices of prompts generated together; `batch_size` counts sequences (0 = all).

    Whole prompts only, so a group of K samples is always produced by one call.
    """
    per_call = max(1, batch_size // samples_per_prompt) if batch_size else n_prompts
    return [slice(i, min(i + per_call, n_prompts)) for i in range(0, n_prompts, per_call)]

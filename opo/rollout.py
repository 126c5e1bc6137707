"""Rollout engines: turn prompts into sampled responses, stamped with the policy version.

Every engine has the same small interface, so the trainer does not care whether
responses come from transformers' `generate` (here) or, later, a vLLM server:

    engine.generate(prompt_ids, params) -> RolloutBatch
    engine.sync_weights(model, version)   # after each optimiser step
    engine.policy_version                 # optimiser steps behind the weights it samples from
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    n: int = 1                  # responses per prompt (K)
    temperature: float = 1.0    # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 32


@dataclass
class RolloutBatch:
    """Responses for a batch of prompts; response i belongs to prompt group_ids[i].

    response_ids hold no padding and end with the eos token when finish_reason is
    "stop" (the eos is trained on: learning when to stop matters).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finish_reasons: list[str]
    group_ids: list[int]
    policy_version: int
    texts: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    def __len__(self) -> int:
        return len(self.response_ids)


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module, version: int) -> None: ...


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class HFEngine:
    """Sampling with transformers' `generate` on the training model itself.

    It shares the trainer's module, so syncing weights is free: only the version moves.
    """

    def __init__(self, model, tokenizer, eos_ids: list[int], batch_size: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.policy_version = 0

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        self.model = model
        self.policy_version = version

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        from transformers import GenerationConfig

        # A fresh config, so a model's shipped defaults (top_k=50, repetition penalties...)
        # never change the distribution we sample from: on-policy means sampling from pi.
        greedy = params.temperature <= 0
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=None if greedy else 0,
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        rows = [p for p in prompt_ids for _ in range(params.n)]
        groups = [g for g in range(len(prompt_ids)) for _ in range(params.n)]
        step = self.batch_size or len(rows)
        was_training = self.model.training
        self.model.eval()
        responses, reasons = [], []
        eos = set(self.eos_ids)
        device = next(self.model.parameters()).device
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            ids, mask = pad_left(chunk, self.tokenizer.pad_token_id, device)
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            for row in out[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in eos), None)
                if cut is None:
                    responses.append(row)
                    reasons.append("length")
                else:
                    responses.append(row[:cut + 1])
                    reasons.append("stop")
        self.model.train(was_training)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return RolloutBatch(prompt_ids=rows, response_ids=responses, finish_reasons=reasons,
                            group_ids=groups, policy_version=self.policy_version, texts=texts)


def make_engine(kind: str, model, tokenizer, eos_ids: list[int], batch_size: int = 0) -> RolloutEngine:
    if kind == "hf":
        return HFEngine(model, tokenizer, eos_ids, batch_size)
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; available: hf")

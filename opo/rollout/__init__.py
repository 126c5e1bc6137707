"""Rollout engines: turn prompts into sampled responses with their sampler log-probs.

One file per engine: `fast` (our KV-cached sampler on the transformers model, the
default), `hf` (transformers' own `generate`, kept as the reference), and `vllm`
(behind the `opo[vllm]` extra). All share `base.RolloutBatch` and `base.SamplingParams`.
"""

from __future__ import annotations

import dataclasses

from opo.models import eos_ids
from opo.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, pad_left
from opo.rollout.fast import FastEngine
from opo.rollout.hf import HFEngine

ENGINES = ("fast", "hf", "vllm")


def make_engine(kind: str, model, tokenizer, eos_ids: list[int], batch_size: int = 0,
                vllm_options: dict | None = None, fused: bool = True) -> RolloutEngine:
    """The rollout engine named `kind`, sampling from `model`; `vllm_options` go to VLLMEngine,
    `fused` to the fast engine (its fused decode step for Llama-family models).

    vLLM (an optional extra) is imported only when it is asked for, so opo works without it."""
    if kind == "fast":
        return FastEngine(model, tokenizer, eos_ids, batch_size, fused=fused)
    if kind == "hf":
        return HFEngine(model, tokenizer, eos_ids, batch_size)
    if kind == "vllm":
        from opo.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, eos_ids, batch_size, **(vllm_options or {}))
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; available: {', '.join(ENGINES)}")


def engine_from_config(cfg, model, tokenizer, log=print) -> RolloutEngine:
    """The engine `cfg.rollout` asks for, sampling from `model` in `cfg.model.dtype`
    (vLLM's own dtype and seed come from the same config as the trainer's)."""
    options = {**dataclasses.asdict(cfg.rollout.vllm), "dtype": cfg.model.dtype, "seed": cfg.trainer.seed,
               "log": log}
    return make_engine(cfg.rollout.engine, model, tokenizer, eos_ids(model, tokenizer), cfg.rollout.batch_size,
                       vllm_options=options, fused=cfg.rollout.fused_decode)


__all__ = ["ENGINES", "RolloutBatch", "RolloutEngine", "SamplingParams", "engine_from_config", "make_engine",
           "pad_left"]

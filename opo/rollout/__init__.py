"""Rollout engines: turn prompts into sampled responses with their sampler log-probs.

One file per engine: `fast` (our KV-cached sampler on the transformers model, the
default), `hf` (transformers' own `generate`, kept as the reference), and `vllm`
(behind the `opo[vllm]` extra). All share `base.RolloutBatch` and `base.SamplingParams`.
"""

from __future__ import annotations

from opo.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, pad_left

ENGINES = ("fast", "hf", "vllm")


def make_engine(kind: str, model, tokenizer, eos_ids: list[int], batch_size: int = 0,
                vllm_options: dict | None = None) -> RolloutEngine:
    """The rollout engine named `kind`, sampling from `model`; `vllm_options` go to VLLMEngine.

    vLLM is imported only when it is asked for, so opo works without it."""
    if kind == "fast":
        from opo.rollout.fast import FastEngine

        return FastEngine(model, tokenizer, eos_ids, batch_size)
    if kind == "hf":
        from opo.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, eos_ids, batch_size)
    if kind == "vllm":
        from opo.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, eos_ids, batch_size, **(vllm_options or {}))
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; available: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "RolloutBatch", "RolloutEngine", "SamplingParams", "make_engine", "pad_left"]

"""Engine-level checks of the real vLLM engine, run in a process of their own.

vLLM's in-process engine is built once per process (a second one fails its memory
sizing), so `tests/test_vllm.py` runs this script once and asserts on the JSON it
prints. Usage: python tests/vllm_engine_checks.py MODEL_DIR
"""

import json
import random
import sys

import numpy as np
import torch

from opo.models import load_policy
from opo.rollout import SamplingParams
from opo.rollout.vllm import VLLMEngine, VLLMUnavailable
from opo.sequences import Dist, pack, score

TEMPERATURE, TOP_P = 0.7, 0.9
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13], [5, 6, 7, 8]]  # the first prompt twice


def mismatch(model, tok, batch) -> float:
    """Largest |log pi_vLLM − log pi_trainer| over the batch's response tokens."""
    packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
    sampler = packed.spread(batch.logprobs)
    with torch.no_grad():
        trainer, _ = score(model, packed, Dist(TEMPERATURE, TOP_P, 0))
    mask = packed.response_mask.bool()
    return float((trainer - sampler)[mask].abs().max())


def perturb(model, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def main(model_dir: str) -> dict:
    torch.set_num_threads(1)
    model, tok = load_policy(model_dir, device="cpu")
    out = {}
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    engine = VLLMEngine(model, tok, [tok.eos_token_id], dtype="float32", enforce_eager=True,
                        max_model_len=64, kv_cache_gb=0.05, seed=0, log=lambda *a: None)
    out["rng_kept"] = (torch.equal(rng_before[0], torch.get_rng_state()) and rng_before[1] == random.getstate()
                       and np.array_equal(rng_before[2], np.random.get_state()[1]))
    out["threads_after_start"] = torch.get_num_threads()
    torch.set_num_threads(2)
    out["threads_settable"] = torch.get_num_threads() == 2
    torch.set_num_threads(1)

    params = SamplingParams(n=4, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=16)
    torch.manual_seed(1)
    first = engine.generate(PROMPTS, params)
    torch.manual_seed(1)
    again = engine.generate(PROMPTS, params)
    out["repeatable"] = first.response_ids == again.response_ids and first.logprobs == again.logprobs
    out["groups"] = [first.response_ids[g * 4:(g + 1) * 4] for g in range(len(PROMPTS))]
    out["mismatch_start"] = mismatch(model, tok, first)

    # More prompt tokens than vLLM schedules in one step: with chunked prefill, vLLM's CPU
    # backend crashed on seeded requests whose prefill was split.
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    long_prompts = [[5 + (i + j) % 10 for j in range(48)] for i in range(budget // 48 + 2)]
    big = engine.generate(long_prompts, SamplingParams(n=2, temperature=TEMPERATURE, top_p=TOP_P,
                                                      max_new_tokens=8))
    out["big_batch"] = {"prompt_tokens": 48 * len(long_prompts), "budget": budget, "responses": len(big)}

    perturb(model, 0.05, seed=1)
    engine.sync_weights(model, 1)
    pushed = engine.generate(PROMPTS, params)
    out["version_after_push"] = pushed.policy_version
    out["mismatch_after_push"] = mismatch(model, tok, pushed)

    # A push that leaves out the tied output layer's name (the bug that once left vLLM's output
    # layer stale) must be refused, not silently accepted.
    full = engine._named_tensors
    engine._named_tensors = lambda m: ((n, t) for n, t in full(m) if n != "lm_head.weight")
    try:
        engine.sync_weights(model, 2)
        out["push_without_lm_head"] = "accepted"
    except VLLMUnavailable as exc:
        out["push_without_lm_head"] = str(exc)
    engine._named_tensors = full
    engine.sync_weights(model, 1)

    perturb(model, 0.05, seed=2)  # the trainer moves on, the engine is not told
    stale = engine.generate(PROMPTS, params)
    out["mismatch_without_push"] = mismatch(model, tok, stale)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))

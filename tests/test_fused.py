"""The fast engine's fused decode step computes transformers' forward, token by token."""

import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from opo.models import eos_ids
from opo.precision import Precision
from opo.rollout import SamplingParams, make_engine
from opo.rollout.fast import PreallocatedLayer
from opo.rollout.fused import FusedDecoder, unsupported_reason


def _llama(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _qwen2():
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                        tie_word_embeddings=False)).eval()


def _mistral():
    torch.manual_seed(2)
    return MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            max_position_embeddings=128, sliding_window=None)).eval()


def _step_both_ways(model, steps=6):
    """Logits of `steps` decode steps after a left-padded prompt pass: transformers' forward
    on one cache, the fused step on a twin cache, fed the same tokens."""
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    caches = []
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        cache.layers = [PreallocatedLayer(width + steps) for _ in cache.layers]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        caches.append(cache)
    decoder = FusedDecoder.build(model, rows_hint=len(prompts))
    assert decoder is not None
    next_pos = pos[:, -1] + 1
    reference, fused = [], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        token = torch.multinomial(logits.float().softmax(-1), 1, generator=gen).squeeze(-1)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=caches[0], use_cache=True, logits_to_keep=1).logits[:, -1]
        reference.append(logits.float())
        fused.append(decoder.step(token, next_pos, mask.bool(), caches[1].layers).float())
        next_pos = next_pos + 1
    return torch.stack(reference), torch.stack(fused)


@pytest.mark.parametrize("build", [_llama, _qwen2, _mistral], ids=["llama-gqa-tied", "qwen2-bias-untied", "mistral"])
@torch.no_grad()
def test_fused_step_equals_transformers_forward_in_fp32(build):
    model = build()
    if build is _qwen2:  # zero biases would hide a bias left out of the fused q/k/v product
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    reference, fused = _step_both_ways(model)
    assert reference.abs().max() > 0.1  # the logits are not trivially small
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_step_follows_bf16_autocast_like_transformers():
    """Under bf16 autocast over fp32 weights (model.dtype=bfloat16) the fused step makes the
    same casts as the forward; only a matrix product's rounding may differ."""
    model = _llama()
    with Precision("bfloat16", "cpu").autocast():
        reference, fused = _step_both_ways(model)
    assert fused.dtype == reference.dtype
    gap = (fused.log_softmax(-1) - reference.log_softmax(-1)).abs().max()
    fp32_gap = (reference.log_softmax(-1) - _step_both_ways(model)[0].log_softmax(-1)).abs().max()
    assert gap <= 0.1 * fp32_gap, (gap, fp32_gap)  # far inside bf16's own distance from fp32


def test_unsupported_models_fall_back_to_transformers_forward():
    from peft import LoraConfig, get_peft_model

    assert unsupported_reason(_llama()) is None
    sliding = _llama()
    sliding.config.layer_types = ["sliding_attention"] * 2
    assert "sliding" in unsupported_reason(sliding)
    lora = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
    assert "Linear" in unsupported_reason(lora)
    assert FusedDecoder.build(lora) is None
    bias = _llama(mlp_bias=True)
    assert "bias" in unsupported_reason(bias)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_with_and_without_fusion_draws_the_same_responses(micro_policy, temperature):
    """Same seed, same tokens and sampler log-probs, with rows finishing at different steps."""
    model, tok = micro_policy
    assert FusedDecoder.build(model) is not None
    prompts = [tok("12+3=")["input_ids"], tok("7+45=")["input_ids"], tok("999+1=")["input_ids"]]
    params = SamplingParams(n=4, temperature=temperature, max_new_tokens=40)
    out = []
    for fused in (True, False):
        engine = make_engine("fast", model, tok, eos_ids(model, tok))
        engine.fused = fused
        torch.manual_seed(5)
        out.append(engine.generate(prompts, params))
    assert out[0].response_ids == out[1].response_ids
    if temperature:  # rows finished at different steps, and more than a quarter before the end
        lengths = sorted(len(r) for r in out[0].response_ids)
        assert lengths[len(lengths) // 4] < lengths[-1], lengths
    for a, b in zip(out[0].logprobs, out[1].logprobs):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_cache_holds_what_attention_reads(micro_policy, monkeypatch, fused):
    """Under bf16 autocast the cache stores keys cast once to bf16; attention, which casts them
    to bf16 itself, then reads the same values: identical tokens and log-probs to an fp32 cache."""
    import opo.rollout.fast as fast

    model, tok = micro_policy
    prompts = [tok("12+3=")["input_ids"], tok("999+1=")["input_ids"]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16)
    out = []
    for store in ("bf16", "as computed"):
        if store == "as computed":
            monkeypatch.setattr(fast, "_attention_dtype", lambda device: None)
        engine = make_engine("fast", model, tok, eos_ids(model, tok), fused=fused)
        torch.manual_seed(2)
        with Precision("bfloat16", "cpu").autocast():
            if store == "bf16":
                assert fast._attention_dtype(torch.device("cpu")) == torch.bfloat16
            out.append(engine.generate(prompts, params))
    assert fast._attention_dtype.__name__ == "<lambda>"  # the second run really stored fp32 keys
    assert out[0].response_ids == out[1].response_ids and out[0].logprobs == out[1].logprobs

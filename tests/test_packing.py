"""Scoring the responses as one packed batch computes what the bucketed decoder passes compute."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import opo.attention
import opo.packing
import opo.sequences
from opo.sequences import Dist, pack, score

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **SMALL))


def _qwen2():  # biases on q/k/v, one key/value head
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=False, **SMALL))


def _mistral():  # head_dim set apart from hidden_size / heads
    torch.manual_seed(2)
    return MistralForCausalLM(MistralConfig(num_key_value_heads=2, head_dim=8, sliding_window=None, **SMALL))


def _batch(seed=0):
    """Three prompts of different lengths, 3-4 responses each, lengths 1-9 (ones included)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for plen, lengths in ((5, (1, 7, 3)), (9, (9, 2, 1, 6)), (3, (4, 4, 8, 5))):
        prompt = torch.randint(3, 40, (plen,), generator=g).tolist()
        for n in lengths:
            prompts.append(prompt)
            responses.append(torch.randint(3, 40, (n,), generator=g).tolist())
    return pack(prompts, responses, 0)


def _score_and_grads(model, packed, bf16=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp, ent = score(model, packed, Dist(0.9), with_entropy=True)
    weights = torch.linspace(-1, 1, packed.num_rows)[:, None] * packed.response_mask
    (logp * weights).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}


def _bucketed(monkeypatch):
    monkeypatch.setattr(opo.packing, "unsupported_reason", lambda model: "bucketed passes, for comparison")


@pytest.mark.parametrize("make", [_llama, _qwen2, _mistral])
def test_packed_responses_equal_bucketed_passes(make, monkeypatch):
    model = make()
    assert opo.packing.unsupported_reason(model) is None
    packed = _batch()
    calls = []
    real = opo.packing.response_hidden
    monkeypatch.setattr(opo.packing, "response_hidden", lambda *a: calls.append(1) or real(*a))
    logp_a, ent_a, grads_a = _score_and_grads(model, packed)
    assert calls, "the packed path did not run"
    _bucketed(monkeypatch)
    logp_b, ent_b, grads_b = _score_and_grads(model, packed)
    mask = packed.response_mask.bool()
    assert logp_a[mask].abs().min() > 0                       # real log-probs on every real token
    assert torch.allclose(logp_a, logp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)
    for name, grad in grads_b.items():
        assert torch.allclose(grads_a[name], grad, atol=1e-5), name


def test_packed_responses_under_bf16_autocast_stay_close(monkeypatch):
    """Under bf16 the two paths round differently (their products see different row counts),
    so only closeness holds; the gradients go through opo.attention's float32 backward."""
    model = _llama()
    assert opo.attention.use_for(model)
    packed = _batch(1)
    logp_a, _, grads_a = _score_and_grads(model, packed, bf16=True)
    _bucketed(monkeypatch)
    logp_b, _, grads_b = _score_and_grads(model, packed, bf16=True)
    assert (logp_a - logp_b).abs().max() < 0.05
    for name, grad in grads_b.items():
        assert (grads_a[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


def test_every_response_of_length_one_needs_no_packed_tokens():
    model = _llama()
    packed = pack([[5, 6, 7], [5, 6, 7], [9, 10]], [[3], [4], [8]], 0)
    logp, _ = score(model, packed, Dist())
    full, _ = score(model, packed, Dist(), share_prompts=False)
    assert torch.allclose(logp, full, atol=1e-5)


def test_what_the_packed_path_leaves_to_the_bucketed_passes():
    model = _llama()
    handle = model.model.layers[1].register_forward_hook(lambda *a: None)
    assert "hooks" in opo.packing.unsupported_reason(model)
    handle.remove()
    model.config._attn_implementation = "eager"
    assert "attention implementation" in opo.packing.unsupported_reason(model)
    torch.manual_seed(3)
    windowed = MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=4, **SMALL))
    assert "sliding" in opo.packing.unsupported_reason(windowed)

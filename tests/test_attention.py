"""opo.attention: SDPA everywhere, float32 inside only for a CPU backward under bf16 autocast."""

import copy

import pytest
import torch

import transformers.integrations.sdpa_attention as sdpa_module
from opo import attention
from opo.rollout.fused import unsupported_reason


@pytest.fixture
def pair(micro_policy):
    """The loaded policy (opo's attention) and a copy switched back to transformers' SDPA."""
    model, _ = micro_policy
    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    return model, plain


def _ids():
    return torch.randint(3, 17, (3, 9), generator=torch.Generator().manual_seed(0))


def test_a_cpu_policy_loads_with_it_and_still_decodes_fused(micro_policy):
    model, _ = micro_policy
    assert model.config._attn_implementation == attention.NAME
    assert unsupported_reason(model) is None


@pytest.mark.parametrize("autocast", [False, True])
def test_without_gradients_or_autocast_it_is_sdpa_exactly(pair, autocast):
    model, plain = pair
    ids, mask = _ids(), torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a = model(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    if not autocast:  # float32 training too
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_bf16_training_keeps_the_forward_and_takes_the_backward_in_float32(pair, monkeypatch):
    model, plain = pair
    seen = []
    real = sdpa_module.sdpa_attention_forward

    def spy(module, q, k, v, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), q.dtype, torch.equal(q, q.to(torch.bfloat16).float())))
        return real(module, q, k, v, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
    ids = _ids()
    outs = []
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters()], list(seen)))
    (la, ga, seen_a), (lb, gb, _) = outs
    assert torch.equal(la, lb)  # the forward is SDPA's own: what the sampler computes
    forward, backward = seen_a[:1], seen_a[1:]  # one layer: one call each way
    assert forward == [(False, torch.float32, False)]  # run as given, autocast casts it (no graph)
    assert backward == [(True, torch.float32, True)]   # float32 kernel on bf16-rounded values
    # The gradient of the same function; only the kernel's internal rounding differs.
    for a, b in zip(ga, gb):
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-6
    assert any(a.norm() > 0 for a in ga)

"""opo.attention: SDPA everywhere, float32 inside only for a CPU backward under bf16 autocast."""

import copy

import pytest
import torch

import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


class _AtenLog(TorchDispatchMode):
    """Records (op name, dtypes of its tensor arguments) for every aten call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtypes = [a.dtype for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **kwargs)

    def named(self, op):
        return [dtypes for name, dtypes in self.calls if name == op]


def test_bf16_training_keeps_the_forward_and_takes_the_backward_in_float32(pair):
    model, plain = pair
    ids = _ids()
    outs = []
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=ids).logits
        log = _AtenLog()
        with log:
            logits.float().logsumexp(-1).sum().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters()], log))
    (la, ga, log), (lb, gb, plain_log) = outs
    assert torch.equal(la, lb)  # the forward is SDPA's own: what the sampler computes
    # One layer: one flash backward, on float32 inputs, and no forward recomputed for it.
    backward = log.named("_scaled_dot_product_flash_attention_for_cpu_backward")
    assert len(backward) == 1 and set(backward[0]) == {torch.float32}
    assert log.named("_scaled_dot_product_flash_attention_for_cpu") == []
    assert torch.bfloat16 in plain_log.named("_scaled_dot_product_flash_attention_for_cpu_backward")[0]  # what it replaces
    # The gradient of the same function; only the kernel's internal rounding differs.
    for a, b in zip(ga, gb):
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-6
    assert any(a.norm() > 0 for a in ga)


def _qkv(shape_q, shape_kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape_q, generator=g).requires_grad_(),
            torch.randn(shape_kv, generator=g).requires_grad_(),
            torch.randn(shape_kv, generator=g).requires_grad_())


def _float32_reference(q, k, v, grad_out, low, **kwargs):
    """Gradients of float32 SDPA on the inputs rounded to `low`, as the low-precision forward sees them."""
    rounded = [t.detach().to(low).float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*rounded, enable_gqa=True, **kwargs)
    return torch.autograd.grad(out, rounded, grad_out)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "boolean mask, padded row"])
def test_float_backward_sdpa_is_autocast_sdpa_forward_with_float32_gradients(case, low):
    # 4 query heads over 2 key/value heads, as grouped-query attention
    if case == "causal":
        (q, k, v), kwargs = _qkv((3, 4, 7, 16), (3, 2, 7, 16)), {"is_causal": True}
    else:
        (q, k, v) = _qkv((3, 4, 5, 16), (3, 2, 9, 16))
        mask = torch.ones(3, 1, 5, 9, dtype=torch.bool).tril(4)
        mask[0, :, :, :3] = False  # a left-padded row
        kwargs = {"attn_mask": mask}
    assert attention.flash_takes(q, k, v, kwargs.get("attn_mask"))
    with torch.autocast("cpu", dtype=low):
        grouped = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        repeated = F.scaled_dot_product_attention(q, *(t.repeat_interleave(2, dim=1) for t in (k, v)), **kwargs)
        out = attention.float_backward_sdpa(low, q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False))
    assert out.dtype == low
    assert torch.equal(out, grouped) and torch.equal(out, repeated)  # what transformers' SDPA computes
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(low)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference = _float32_reference(q, k, v, grad_out.float(), low, **kwargs)
    for got, want in zip(grads, reference):
        assert got.dtype == torch.float32  # the inputs' own dtype, not rounded to `low`
        assert (got - want).norm() <= 5e-3 * want.norm()


def test_calls_the_direct_path_does_not_take_go_to_transformers_sdpa(pair):
    model, _ = pair
    module = model.model.layers[0].self_attn
    q, k, v = _qkv((2, 4, 3, 8), (2, 4, 3, 8))
    bias = torch.zeros(2, 4, 3, 3)
    assert attention._float_backward_call(module, torch.bfloat16, q, k, v, None, position_bias=bias) is None
    assert attention._float_backward_call(module, torch.bfloat16, q, k, v, None, dropout=0.1) is None
    assert not attention.flash_takes(q[0], k[0], v[0])  # 3-D
    assert not attention.flash_takes(q, k, v, torch.ones(3, 3, dtype=torch.bool))  # a 2-D mask
    assert attention._float_backward_call(module, torch.bfloat16, q, k, v, None) is not None

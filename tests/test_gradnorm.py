import pytest
import torch

from opo.advantages import ESTIMATORS, compute_advantages, estimator_needs, register
from opo.gradnorm import (exact_grad_sq_norm, logit_grad_sq_norm, model_proxy_grad_sq_norm,
                          per_response_grads, proxy_grad_sq_norm, response_weights)
from opo.sequences import pack, score


# --- the proxy's maths ---------------------------------------------------------------
def test_logit_proxy_equals_autograd_norm():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64) * 3
    targets = torch.randint(0, 11, (3, 5))
    expected = torch.empty(3, 5, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            z = logits[b, t].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(torch.log_softmax(z, -1)[targets[b, t]], z)
            expected[b, t] = g.pow(2).sum()
    got = logit_grad_sq_norm(logits, targets)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_logit_proxy_limits():
    # A one-hot-confident correct token has zero gradient; a uniform distribution over V
    # gives 1 - 2/V + 1/V = 1 - 1/V; a confident wrong token gives 2.
    sure = torch.tensor([[50.0, 0.0, 0.0]])
    assert logit_grad_sq_norm(sure, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-12)
    assert logit_grad_sq_norm(sure, torch.tensor([1])).item() == pytest.approx(2.0, abs=1e-6)
    uniform = torch.zeros(1, 4)
    assert logit_grad_sq_norm(uniform, torch.tensor([2])).item() == pytest.approx(0.75)


def test_proxy_sums_only_masked_tokens():
    logits = torch.zeros(2, 3, 4)  # every token contributes 0.75
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert proxy_grad_sq_norm(logits, targets, mask).tolist() == pytest.approx([1.5, 1.5])


# --- on a model ----------------------------------------------------------------------
@pytest.fixture
def batch(micro_policy):
    model, tokenizer = micro_policy
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("12+34="), enc("5+6="), enc("123+456=")]
    responses = [enc("4,6>46") + [tokenizer.eos_token_id], enc(">11"), enc("9,7,5,1,2,3>579")]
    return model, pack(prompts, responses, tokenizer.pad_token_id)


def test_exact_norm_matches_a_batched_backward(batch):
    # The per-response loop scores one row at a time; the trainer scores padded batches.
    # Both must give the same gradient of Σ_t logπ(y_t) for each response.
    model, packed = batch
    params = [p for p in model.parameters() if p.requires_grad]
    got = exact_grad_sq_norm(model, packed)
    for i in range(packed.num_rows):
        logp, _ = score(model, packed)
        grads = torch.autograd.grad((logp[i] * packed.response_mask[i]).sum(), params)
        expected = sum(g.double().pow(2).sum() for g in grads)
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(p.grad is None for p in params)  # the trainer's .grad is left alone
    assert (got > 0).all()


def test_repeated_responses_share_one_backward_pass(micro_policy, monkeypatch):
    import opo.gradnorm as gn

    model, tokenizer = micro_policy
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("12+34=")] * 4 + [enc("5+6=")]
    responses = [enc(">46"), enc("4,6>46"), enc(">46"), enc(">46"), enc(">46")]
    packed = pack(prompts, responses, tokenizer.pad_token_id)
    calls = []
    real = gn.per_response_grads

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            calls.append(item[0])
            yield item

    monkeypatch.setattr(gn, "per_response_grads", counting)
    got = gn.exact_grad_sq_norm(model, packed)
    assert sorted(calls) == [0, 1, 4]  # rows 2 and 3 repeat row 0
    assert got[0] == got[2] == got[3] and got[0] != got[1]
    one = pack([prompts[3]], [responses[3]], tokenizer.pad_token_id)
    assert got[3].item() == pytest.approx(real_norm(model, one), rel=1e-5)


def real_norm(model, packed):
    return next(per_response_grads(model, packed))[1].double().pow(2).sum().item()


def test_model_proxy_matches_per_response_proxy(batch):
    model, packed = batch
    batched = model_proxy_grad_sq_norm(model, packed, micro_batch_size=2)
    rows = [proxy for _, _, proxy, _ in per_response_grads(model, packed)]
    torch.testing.assert_close(batched, torch.tensor(rows, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_response_weights_dispatch(batch):
    model, packed = batch
    assert response_weights("grad_sq_norm_proxy", model, packed).shape == (3,)
    torch.testing.assert_close(response_weights("grad_sq_norm_exact", model, packed),
                               exact_grad_sq_norm(model, packed))
    with pytest.raises(ValueError, match="unknown weight kind"):
        response_weights("length", model, packed)


# --- the estimators ------------------------------------------------------------------
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
L = torch.tensor([2, 1, 4, 3, 2])
G = torch.tensor([7, 3, 7, 3, 7])


def test_needs_declared():
    assert estimator_needs("opo_exact") == "grad_sq_norm_exact"
    assert estimator_needs("opo_proxy") == "grad_sq_norm_proxy"
    assert estimator_needs("opo") is None and estimator_needs("grpo") is None
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimator_needs("nope")
    with pytest.raises(ValueError, match="not a known weight kind"):
        register("x", needs="length")


@pytest.mark.parametrize("name", ["opo_exact", "opo_proxy"])
def test_weighted_baseline_hand_computed(name):
    # group 7 (indices 0, 2, 4): r 1, 0, 1 with w 1, 6, 3 -> b = 4/10; group 3: r 0, 1 with
    # w 2, 2 -> b = 1/2.
    w = torch.tensor([1.0, 2.0, 6.0, 2.0, 3.0])
    adv = compute_advantages(name, R, L, G, weights=w)
    torch.testing.assert_close(adv, torch.tensor([0.6, -0.5, -0.4, 0.5, 0.6]))


def test_weights_equal_to_lengths_reproduce_opo():
    adv = compute_advantages("opo_exact", R, L, G, weights=L.double())
    torch.testing.assert_close(adv, compute_advantages("opo", R, L, G))


def test_zero_weight_group_and_singleton():
    r, l = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([1, 1, 1])
    g = torch.tensor([0, 0, 1])
    adv = compute_advantages("opo_proxy", r, l, g, weights=torch.tensor([0.0, 0.0, 2.0]))
    assert adv.tolist() == [0.5, -0.5, 0.5]  # all-zero weights: plain mean; singleton: b = 0


def test_weights_validation():
    with pytest.raises(ValueError, match="needs weights=grad_sq_norm_exact"):
        compute_advantages("opo_exact", R, L, G)
    with pytest.raises(ValueError, match="'opo' takes no weights"):
        compute_advantages("opo", R, L, G, weights=torch.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        compute_advantages("opo_proxy", R, L, G, weights=torch.tensor([1.0, -1, 1, 1, 1]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        compute_advantages("opo_proxy", R, L, G, weights=torch.tensor([1.0, float("nan"), 1, 1, 1]))
    with pytest.raises(ValueError, match="rewards' shape"):
        compute_advantages("opo_proxy", R, L, G, weights=torch.ones(4))


def test_registry_keeps_needs_per_function():
    @register("test_needs_tmp", needs="grad_sq_norm_proxy")
    def tmp(rewards, lengths, group_index, num_groups, *, weights):
        return rewards * weights

    try:
        assert estimator_needs("test_needs_tmp") == "grad_sq_norm_proxy"
        assert compute_advantages("test_needs_tmp", R, L, G, weights=torch.full((5,), 2.0)).tolist() \
            == [2.0, 0.0, 0.0, 2.0, 2.0]
    finally:
        del ESTIMATORS["test_needs_tmp"]


def test_weights_use_the_truncated_sampling_distribution(micro_policy):
    """Under top-k the trainer samples from the k most likely tokens, renormalised; the
    proxy must use that π (computed here by hand from the full logits), not the full one."""
    from opo.sequences import Dist, response_logits

    model, tokenizer = micro_policy
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("12+34=")
    with torch.no_grad():
        full = response_logits(model, pack([prompt], [enc("4,6")], tokenizer.pad_token_id))[0]
    response = full.argmax(-1).tolist()  # tokens inside every top-k support
    packed = pack([prompt], [response], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, packed)[0].double()          # [T, V], untruncated
    k = 3
    kept = logits.topk(k, -1)
    probs = torch.zeros_like(logits).scatter(-1, kept.indices, torch.softmax(kept.values, -1))
    p_y = probs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    by_hand = float(((1 - p_y) ** 2 + (probs ** 2).sum(-1) - p_y ** 2).sum())
    truncated = float(model_proxy_grad_sq_norm(model, packed, Dist(top_k=k))[0])
    untruncated = float(model_proxy_grad_sq_norm(model, packed)[0])
    assert truncated == pytest.approx(by_hand, rel=1e-5)
    assert abs(truncated - untruncated) > 1e-3  # so the check above can tell them apart

"""The sampling distribution: our filter equals transformers' warpers, and sampling follows it."""

import pytest
import torch

from opo.sampling import entropy, filter_logits, sample, target_logprobs, target_logprobs_and_entropy


def _hf_processed(logits, temperature, top_p, top_k):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.clone())


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.9, 0), (0.6, 1.0, 5), (0.8, 0.75, 12), (1.0, 0.3, 3)])
def test_filter_matches_transformers_warpers(temperature, top_p, top_k):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    ours = torch.log_softmax(filter_logits(logits, temperature, top_p, top_k), -1)
    theirs = torch.log_softmax(_hf_processed(logits, temperature, top_p, top_k), -1)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same support, token for token
    finite = torch.isfinite(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-5)
    if top_p < 1 or top_k:
        assert torch.isinf(ours).any()  # the cases above really do cut tokens


def test_kept_target_stays_in_the_support():
    logits = torch.tensor([[5.0, 4.0, -3.0, -9.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 0.9)[0, 3])
    kept = filter_logits(logits, 1.0, 0.9, keep=torch.tensor([3]))
    assert torch.isfinite(kept[0, 3])
    assert torch.isfinite(target_logprobs(logits, torch.tensor([3]), 1.0, 0.9)).all()


def test_target_logprobs_and_entropy_of_the_filtered_distribution():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 20)
    targets = torch.randint(0, 20, (3, 7))
    for t, p, k in [(1.0, 1.0, 0), (0.5, 0.8, 6)]:
        z = filter_logits(logits, t, p, k, keep=targets)
        expect = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
        assert torch.allclose(target_logprobs(logits, targets, t, p, k), expect, atol=1e-6)
        probs = torch.softmax(filter_logits(logits, t, p, k), -1)
        logp = torch.log(probs.clamp_min(1e-30))
        assert torch.allclose(entropy(logits, t, p, k), -(probs * logp).sum(-1), atol=1e-5)


def test_sampling_follows_the_filtered_distribution():
    """Empirical frequencies of 40k draws match the filtered distribution; cut tokens never appear."""
    torch.manual_seed(2)
    logits = torch.randn(1, 12) * 2
    draws = 40_000
    tokens, logp = sample(logits.expand(draws, -1), 0.8, top_p=0.9, top_k=8)
    probs = torch.softmax(filter_logits(logits, 0.8, 0.9, 8), -1)[0]
    freq = torch.bincount(tokens, minlength=12).float() / draws
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.012  # ~5 standard errors at p = 0.5
    assert torch.allclose(logp, probs.log()[tokens])


def test_greedy_sampling_is_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    tokens, logp = sample(logits, 0.0)
    assert tokens.tolist() == [1, 0] and logp.tolist() == [0.0, 0.0]


def test_a_draw_at_the_top_of_the_cdf_stays_in_the_support(monkeypatch):
    """u rounding up to the total probability must pick the last token with mass, never a
    filtered-out token after it."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).expand(4, -1).clone()
    logits[:, 3] = float("-inf")
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape[0], dtype=kw.get("dtype")))
    tokens, logp = sample(logits, 1.0)
    assert tokens.tolist() == [2, 2, 2, 2]
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[:, 2])


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.9, 0), (0.8, 1.0, 5)])
def test_joint_logprobs_and_entropy_equal_the_separate_ones(temperature, top_p, top_k):
    torch.manual_seed(3)
    logits = (torch.randn(6, 50) * 3).requires_grad_(True)
    targets = torch.randint(0, 50, (6,))
    logp, ent = target_logprobs_and_entropy(logits, targets, temperature, top_p, top_k)
    assert not ent.requires_grad
    assert torch.allclose(ent, entropy(logits, temperature, top_p, top_k), atol=1e-5)
    expect = target_logprobs(logits, targets, temperature, top_p, top_k)
    assert torch.allclose(logp, expect, atol=1e-6)
    g1, = torch.autograd.grad(logp.sum(), logits)
    g2, = torch.autograd.grad(expect.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_two_level_draw_follows_the_weights_across_blocks():
    """Over a vocabulary of several blocks and a shorter last one, the two-level draw's
    frequencies match the weights, and entries of weight 0 (a whole block of them, and
    some beside the block borders) are never drawn."""
    from opo.sampling import SAMPLE_BLOCK, inverse_cdf_draw

    size = 2 * SAMPLE_BLOCK + 37
    torch.manual_seed(4)
    weights = torch.zeros(size)
    hot = torch.tensor([0, 5, SAMPLE_BLOCK - 1, SAMPLE_BLOCK + 1, 2 * SAMPLE_BLOCK + 3, size - 2])
    weights[hot] = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5, 2.0])
    weights[SAMPLE_BLOCK + 50:SAMPLE_BLOCK + 60] = 0.1  # a spread of small ones in block 1
    draws = 60_000
    idx, total = inverse_cdf_draw(weights.expand(draws, -1).contiguous())
    assert torch.allclose(total, weights.double().sum().expand(draws))
    freq = torch.bincount(idx, minlength=size).double() / draws
    probs = weights.double() / weights.double().sum()
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.011  # ~5 standard errors at p = 0.3


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_two_level_draw_at_both_ends_of_the_cdf(monkeypatch, u):
    """u = 0 draws the first entry with weight, u at the total the last one, whatever the
    zero-weight entries and blocks around them."""
    from opo.sampling import SAMPLE_BLOCK, inverse_cdf_draw

    weights = torch.zeros(3, 3 * SAMPLE_BLOCK)
    weights[:, SAMPLE_BLOCK + 7] = 1.0
    weights[:, 2 * SAMPLE_BLOCK - 1] = 2.0
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(*shape, u, dtype=kw.get("dtype")))
    idx, _ = inverse_cdf_draw(weights)
    assert idx.tolist() == [SAMPLE_BLOCK + 7 if u == 0 else 2 * SAMPLE_BLOCK - 1] * 3


def test_sampled_logprob_is_that_of_the_filtered_distribution():
    """The log-probability `sample` returns for each draw equals the filtered log-softmax at
    the drawn token, for bf16 and float32 logits, with and without filtering, and the
    logits passed in are not changed (the draw works in place only on its own copy)."""
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(16, 3 * 256 + 11) * 3).to(dtype)
        before = logits.clone()
        for t, p, k in [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 40)]:
            tokens, logp = sample(logits, t, p, k)
            assert torch.equal(logits, before)  # the caller's logits are left alone
            expect = torch.log_softmax(filter_logits(logits, t, p, k), -1).gather(-1, tokens[:, None]).squeeze(-1)
            assert torch.allclose(logp, expect, atol=1e-5)
            assert logits.dtype == dtype and torch.isfinite(logp).all()

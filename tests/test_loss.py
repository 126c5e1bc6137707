import math

import pytest
import torch
from torch import nn

from opo.loss import (AGG_MODES, aggregate, importance_ratio, policy_loss, token_entropy,
                      token_logprobs)


def batch(seed=0, B=4, T=6, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    return logits, targets, mask, adv


# --- log-probs and entropy -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_match_reference(dtype):
    logits, targets, _, _ = batch()
    logits = (logits * 3).to(dtype).requires_grad_()
    ref_logp = torch.log_softmax(logits.float(), -1)
    want_lp = ref_logp.gather(-1, targets[..., None]).squeeze(-1)
    want_h = -(ref_logp.exp() * ref_logp).sum(-1)
    lp, h = token_logprobs(logits, targets), token_entropy(logits)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == targets.shape
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)
    w = torch.randn(lp.shape)
    got = torch.autograd.grad(((lp + h) * w).sum(), logits)[0]
    want = torch.autograd.grad(((want_lp + want_h) * w).sum(), logits)[0]
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 gradients round to 8 bits
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=1e-4)


# --- aggregation -----------------------------------------------------------------
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 is empty, NaN is padding


@pytest.mark.parametrize("mode, total_tokens, total_seqs, expected", [
    ("token-mean", 3, 3, (1 + 2 + 4) / 3),
    ("token-mean", 10, 3, (1 + 2 + 4) / 10),
    ("seq-mean-token-mean", 3, 3, ((1 + 2) / 2 + 4 / 1 + 0) / 3),
    ("seq-mean-token-mean", 3, 5, ((1 + 2) / 2 + 4 / 1 + 0) / 5),
    ("seq-mean-token-sum", 3, 3, ((1 + 2) + 4 + 0) / 3),
])
def test_aggregate_hand_computed(mode, total_tokens, total_seqs, expected):
    got = aggregate(VALUES, MASK, mode, total_tokens, total_seqs)
    assert got.item() == pytest.approx(expected)


def test_aggregate_rejects_unknown_mode_and_bad_totals():
    with pytest.raises(ValueError, match="allowed: token-mean, seq-mean-token-mean"):
        aggregate(VALUES, MASK, "mean", 3, 3)
    with pytest.raises(ValueError, match="total_tokens must be > 0"):
        aggregate(VALUES, MASK, "token-mean", 0, 3)


def full_and_split_loss(agg, seed, **kw):
    """Loss and gradient of the whole batch, and of its two halves summed."""
    logits, targets, mask, adv = batch(seed, B=6)
    g = torch.Generator().manual_seed(seed + 100)
    base = token_logprobs(logits, targets)
    old = base + 0.3 * torch.randn(base.shape, generator=g)
    ref = base + 0.3 * torch.randn(base.shape, generator=g)
    ent = token_entropy(logits)
    totals = dict(total_tokens=float(mask.sum()), total_seqs=float(mask.shape[0]))
    results = []
    for parts in ([slice(0, 6)], [slice(0, 3), slice(3, 6)]):
        logp = base.clone().requires_grad_()
        loss = 0.0
        for s in parts:
            part, _ = policy_loss(logp[s], old[s] if kw.get("off") else None, adv[s], mask[s],
                                  agg=agg, clip_eps=0.2, entropy=ent[s], entropy_coef=0.01,
                                  ref_logp=ref[s], kl_coef=0.1, **totals)
            part.backward()
            loss += part.item()
        results.append((loss, logp.grad))
    return results


@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_add_up_to_full_batch(agg, off):
    (full, g_full), (split, g_split) = full_and_split_loss(agg, seed=3, off=off)
    assert split == pytest.approx(full, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(g_split, g_full, atol=1e-7, rtol=1e-6)


# --- on-policy ratio -------------------------------------------------------------
@pytest.mark.parametrize("agg", AGG_MODES)
def test_on_policy_ratio_is_exactly_one_with_logp_gradient(agg):
    logits, targets, mask, adv = batch(1)
    logp = token_logprobs(logits, targets).requires_grad_()
    ratio = importance_ratio(logp, None)
    assert torch.equal(ratio, torch.ones_like(ratio))
    w = torch.randn(ratio.shape)
    torch.testing.assert_close(torch.autograd.grad((ratio * w).sum(), logp)[0], w)

    totals = dict(total_tokens=float(mask.sum()), total_seqs=4.0)
    loss, stats = policy_loss(logp, None, adv, mask, agg=agg, clip_eps=0.2, **totals)
    assert stats["ratio_mean"] == stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0
    grad = torch.autograd.grad(loss, logp)[0]
    plain = aggregate(-adv[:, None] * logp, mask, agg, **totals)
    # The value is the advantage-weighted token count (ratio = 1), the gradient is ∇ of −A·logp.
    torch.testing.assert_close(loss, aggregate(-adv[:, None].expand_as(logp), mask, agg, **totals))
    torch.testing.assert_close(grad, torch.autograd.grad(plain, logp)[0], atol=0, rtol=1e-6)


# --- clipping --------------------------------------------------------------------
def test_clipping_zeroes_gradient_where_it_binds():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.5],    # A > 0: only the high ratio binds
                          [1.5, 0.5, 1.0, 0.3]])   # A < 0: only the low ratio binds
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])  # last column is padding
    adv = torch.tensor([1.0, -1.0])
    logp = torch.zeros(2, 4, requires_grad=True)
    old = -ratio.log()
    loss, stats = policy_loss(logp, old, adv, mask, agg="token-mean", total_tokens=6,
                              total_seqs=2, clip_eps=eps)
    loss.backward()
    binds = torch.tensor([[True, False, False, False], [False, True, False, False]])
    assert torch.all(logp.grad[binds] == 0)
    free = ~binds & mask.bool()
    # d(−A·ratio)/dlogp = −A·ratio, over 6 tokens.
    torch.testing.assert_close(logp.grad[free], (-adv[:, None] * ratio)[free] / 6)
    assert torch.all(logp.grad[~mask.bool()] == 0)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["ratio_max"] == pytest.approx(1.5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5 + 1.0) / 6)
    # Loss per token: max(−A r, −A clip(r)): row 0: −1.2, −0.5, −1.1; row 1: 1.5, 0.8, 1.0.
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 1.5 + 0.8 + 1.0) / 6)
    assert stats["pg_loss"] == pytest.approx(loss.item())


def test_off_policy_without_clip_is_plain_importance_weighting():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = -torch.tensor([[3.0, 0.1]]).log()
    loss, stats = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2),
                              agg="token-mean", total_tokens=2, total_seqs=1)
    assert loss.item() == pytest.approx(-2 * (3.0 + 0.1) / 2)
    assert stats["clip_frac"] == 0.0 and stats["ratio_max"] == pytest.approx(3.0)


# --- KL and entropy terms --------------------------------------------------------
def test_kl_term():
    logits, targets, mask, adv = batch(2)
    logp = token_logprobs(logits, targets)
    kw = dict(agg="token-mean", total_tokens=float(mask.sum()), total_seqs=4.0)
    base, _ = policy_loss(logp, None, adv, mask, **kw)
    same, stats = policy_loss(logp, None, adv, mask, ref_logp=logp.clone(), kl_coef=0.5, **kw)
    assert stats["kl"] == 0.0 and same.item() == base.item()
    ref = logp + torch.randn(logp.shape)
    moved, stats = policy_loss(logp, None, adv, mask, ref_logp=ref, kl_coef=0.5, **kw)
    assert stats["kl"] > 0
    assert moved.item() == pytest.approx(base.item() + 0.5 * stats["kl"], rel=1e-5)
    # k3 at ref − logp = 1 is e − 2.
    _, stats = policy_loss(torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1),
                           ref_logp=torch.ones(1, 1), kl_coef=1.0, **kw)
    assert stats["kl"] == pytest.approx(math.e - 2)
    assert "kl" not in policy_loss(logp, None, adv, mask, ref_logp=ref, **kw)[1]


def test_entropy_bonus():
    logits, targets, mask, adv = batch(4)
    logp, ent = token_logprobs(logits, targets), token_entropy(logits)
    kw = dict(agg="token-mean", total_tokens=float(mask.sum()), total_seqs=4.0)
    base, _ = policy_loss(logp, None, adv, mask, **kw)
    with_h, stats = policy_loss(logp, None, adv, mask, entropy=ent, entropy_coef=0.3, **kw)
    mean_h = ent[mask].mean().item()
    assert stats["entropy"] == pytest.approx(mean_h)
    assert with_h.item() == pytest.approx(base.item() - 0.3 * mean_h, rel=1e-5)
    assert "entropy" not in policy_loss(logp, None, adv, mask, entropy=ent, **kw)[1]


def test_shape_checks():
    with pytest.raises(ValueError, match="mask has shape"):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 4),
                    agg="token-mean", total_tokens=1, total_seqs=1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(3), torch.ones(2, 3),
                    agg="token-mean", total_tokens=1, total_seqs=1)


# --- a real update moves log-probs the right way ---------------------------------
class Bigram(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens):  # [B,T] -> logits [B,T,V] for the next token
        return self.out(torch.tanh(self.embed(tokens)))


def test_one_sgd_step_follows_advantage_sign():
    torch.manual_seed(0)
    model = Bigram()
    seqs = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])  # prompt token + 4 response tokens
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)

    def response_logprob():
        return token_logprobs(model(seqs[:, :-1]), seqs[:, 1:])

    before = response_logprob().sum(-1).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = policy_loss(response_logprob(), None, adv, mask, agg="token-mean",
                          total_tokens=8, total_seqs=2)
    loss.backward()
    opt.step()
    after = response_logprob().sum(-1).detach()
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


# --- rollout correction ----------------------------------------------------------------
from opo.loss import CORRECTIONS, rollout_correction  # noqa: E402


def _two_rows():
    """Row 0: tokens with ρ = 3, 1, 0.25 (log ρ = log 3, 0, log 0.25); row 1: ρ = 1.5 and a pad."""
    log_rho = torch.tensor([[math.log(3.0), 0.0, math.log(0.25)], [math.log(1.5), 0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return sampler + log_rho, sampler, mask


@pytest.mark.parametrize("mode, expected", [
    ("none", [[1, 1, 1], [1, 1, 0]]),
    ("token-tis", [[2, 1, 0.25], [1.5, 1, 0]]),         # min(ρ, 2)
    ("token-mask", [[0, 1, 0], [1, 1, 0]]),             # ρ = 3 and 0.25 lie outside [0.5, 2]
    # row 0: ρ̄ = (3 · 1 · 0.25)^(1/3) = 0.9086; row 1: ρ̄ = (1.5 · 1)^(1/2) = 1.2247
    ("sequence-tis", [[0.75 ** (1 / 3)] * 3, [1.5 ** 0.5] * 2 + [0]]),
    ("sequence-mask", [[1, 1, 1], [1, 1, 0]]),
])
def test_rollout_correction_weights_hand_computed(mode, expected):
    logp, sampler, mask = _two_rows()
    weights, st = rollout_correction(logp, sampler, mask, mode, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert float(st["tokens"]) == 5
    rho = torch.tensor([3.0, 1.0, 0.25, 1.5, 1.0])
    assert float(st["kl"]) == pytest.approx(float((rho - 1 - rho.log()).sum()), rel=1e-5)  # k3 per token
    assert float(st["weight"]) == pytest.approx(sum(map(sum, expected)), rel=1e-5)
    corrected = {"none": 0, "token-tis": 1, "token-mask": 2, "sequence-tis": 0, "sequence-mask": 0}[mode]
    assert float(st["corrected"]) == corrected


def test_sequence_mask_drops_a_whole_response_and_counts_it():
    logp, sampler, mask = _two_rows()
    logp[1, 0] = sampler[1, 0] + math.log(9.0)  # row 1: ρ̄ = 3 > C = 2
    weights, st = rollout_correction(logp, sampler, mask, "sequence-mask", cap=2.0)
    assert weights[1].tolist() == [0, 0, 0] and weights[0].tolist() == [1, 1, 1]
    assert float(st["seqs"]) == 2 and float(st["seqs_corrected"]) == 1


def test_token_tis_gradient_is_the_importance_weighted_gradient():
    """Samples drawn from a known q; with a cap above every ρ, the loss's gradient equals
    Σ_t (π_θ(y_t)/q(y_t)) · A · ∇log π_θ(y_t) / T, the importance-weighted policy gradient."""
    torch.manual_seed(0)
    z = torch.randn(4, 6, requires_grad=True)              # π_θ: a softmax per position
    q = torch.softmax(torch.randn(4, 6), -1)               # the sampler: another distribution
    y = torch.multinomial(q, 1).squeeze(-1)                # one sampled token per position
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1).view(1, 4)
    sampler = q.log().gather(-1, y[:, None]).squeeze(-1).view(1, 4)
    mask, adv = torch.ones(1, 4), torch.tensor([0.7])
    weights, _ = rollout_correction(logp, sampler, mask, "token-tis", cap=1e6)
    loss, _ = policy_loss(logp, None, adv, mask, agg="token-mean", total_tokens=4, total_seqs=1,
                          is_weights=weights)
    (got,) = torch.autograd.grad(loss, z, retain_graph=True)
    rho = (logp.detach() - sampler).exp()
    (expected,) = torch.autograd.grad(-(rho * adv * logp).sum() / 4, z, retain_graph=True)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, torch.autograd.grad(-(adv * logp).sum() / 4, z)[0])  # it did reweight


def test_config_names_the_same_corrections_as_the_loss():
    import typing

    from opo.config import AlgoConfig, ConfigError, load_config

    assert typing.get_args(typing.get_type_hints(AlgoConfig)["rollout_correction"]) == CORRECTIONS
    with pytest.raises(ConfigError, match="algo.rollout_correction"):
        load_config("tiny", ["algo.rollout_correction=tis"])
    with pytest.raises(ConfigError, match="algo.correction_cap"):
        load_config("tiny", ["algo.correction_cap=1"])

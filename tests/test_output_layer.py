"""The tiled output layer (opo.output_layer) against the plain logits path it replaces."""

import pytest
import torch

import opo.output_layer
from opo import sampling
from opo.output_layer import head_scores, usable_weight
from opo.sequences import Dist, pack, score


def _problem(n=37, hidden=24, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.6
    t = torch.randint(0, vocab, (n,), generator=g)
    t[:3] = torch.tensor([0, vocab - 1, 300])  # first, last and a tile boundary (300 = 2 x 150)
    coef = torch.randn(n, generator=g)
    return h, w, t, coef


def _plain(h, w, t, coef, temperature, dtype=torch.float64):
    """The reference: whole logits, log-softmax, autograd."""
    h = h.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    logp, ent = sampling.target_logprobs_and_entropy((h @ w.T).to(dtype), t, temperature)
    if dtype == torch.float64:  # target_logprobs_and_entropy computes in float32; redo in float64
        z = (h @ w.T) / temperature
        logp = torch.log_softmax(z, -1).gather(-1, t[:, None]).squeeze(-1)
        p = torch.softmax(z.detach(), -1)
        ent = -(p * torch.log_softmax(z.detach(), -1)).sum(-1)
    (logp * coef.to(logp.dtype)).sum().backward()
    return logp.detach().double(), ent.double(), h.grad.double(), w.grad.double()


def _tiled(h, w, t, coef, temperature, **blocks):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logp, ent = head_scores(h, w, t, temperature, with_entropy=True, **blocks)
    (logp * coef).sum().backward()
    return logp.detach().double(), ent.double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("blocks", [dict(token_block=8, vocab_block=150),   # 5 x 7 tiles, ragged
                                    dict(token_block=64, vocab_block=4096)])  # one tile
def test_tiles_equal_the_whole_logits_in_float32(temperature, blocks):
    """Log-probs, entropy and both gradients equal the plain path's (float64 reference)."""
    h, w, t, coef = _problem()
    ref = _plain(h, w, t, coef, temperature)
    got = _tiled(h, w, t, coef, temperature, **blocks)
    for name, a, b in zip(("logp", "entropy", "grad hidden", "grad weight"), got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
    assert (got[1] > 0).all()


def test_under_bf16_autocast_the_error_is_the_plain_paths():
    """Under bf16 autocast the products run in bf16 like the plain path's linear layer: the
    distance to float64 is of the plain bf16 path's own size, not larger."""
    h, w, t, coef = _problem(n=300, hidden=64, vocab=3000)
    exact = _plain(h, w, t, coef, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled = _tiled(h, w, t, coef, 1.0, token_block=128, vocab_block=512)

        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = sampling.target_logprobs_and_entropy(torch.nn.functional.linear(hp, wp), t)
    (logp * coef).sum().backward()
    plain = (logp.detach().double(), ent.double(), hp.grad.double(), wp.grad.double())
    for name, a, b, e in zip(("logp", "entropy", "grad hidden", "grad weight"), tiled, plain, exact):
        err_tiled, err_plain = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        assert err_plain > 1e-4, name  # bf16 products really ran
        assert err_tiled < 1.5 * err_plain, (name, err_tiled, err_plain)


def test_without_gradients_and_with_a_frozen_weight():
    h, w, t, coef = _problem()
    ref = _plain(h, w, t, coef, 1.0)
    with torch.no_grad():
        logp, ent = head_scores(h, w, t, with_entropy=False, token_block=8, vocab_block=150)
    assert ent is None and torch.allclose(logp.double(), ref[0], atol=1e-5)
    hg = h.clone().requires_grad_()
    (head_scores(hg, w, t, token_block=8, vocab_block=150)[0] * coef).sum().backward()
    assert torch.allclose(hg.grad.double(), ref[2], atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        head_scores(h, w, t, 0.0)


class _Cfg:
    final_logit_softcapping = None


class _LM(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.config, self.head = _Cfg(), head

    def get_output_embeddings(self):
        return self.head


def test_used_only_where_it_is_the_same_distribution():
    plain = _LM(torch.nn.Linear(8, 20, bias=False))
    assert usable_weight(plain, Dist()) is plain.head.weight
    assert usable_weight(plain, Dist(temperature=0.6)) is plain.head.weight
    assert usable_weight(plain, Dist(top_p=0.9)) is None        # the support needs whole rows
    assert usable_weight(plain, Dist(top_k=5)) is None
    assert usable_weight(_LM(torch.nn.Linear(8, 20)), Dist()) is None  # a bias

    class Wrapped(torch.nn.Linear):  # e.g. an adapter around the head
        pass

    assert usable_weight(_LM(Wrapped(8, 20, bias=False)), Dist()) is None
    capped = _LM(torch.nn.Linear(8, 20, bias=False))
    capped.config = type("C", (), {"final_logit_softcapping": 30.0})()
    assert usable_weight(capped, Dist()) is None


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_score_through_a_model_equals_the_plain_path(micro_policy, monkeypatch, temperature):
    """`score` on a real (tiny) causal LM takes the tiled path, and gives the plain path's
    log-probs, entropy and gradients of every parameter."""
    model, tok = micro_policy
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 17, (n,), generator=g).tolist() for n in (4, 7, 5, 3)]
    responses = [torch.randint(3, 17, (n,), generator=g).tolist() for n in (9, 2, 6, 11)]
    packed = pack(prompts, responses, tok.pad_token_id)
    assert usable_weight(model, Dist(temperature)) is not None
    calls = []
    real = opo.output_layer.head_scores
    monkeypatch.setattr(opo.output_layer, "head_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for tiled in (True, False):
        if not tiled:
            monkeypatch.setattr(opo.output_layer, "usable_weight", lambda model, dist: None)
        model.zero_grad(set_to_none=True)
        logp, ent = score(model, packed, Dist(temperature), with_entropy=True, chunk_tokens=5)
        (logp * packed.response_mask * torch.linspace(-1, 1, packed.num_rows)[:, None]).sum().backward()
        results.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 1
    (la, ea, ga), (lb, eb, gb) = results
    assert torch.allclose(la, lb, atol=1e-5) and torch.allclose(ea, eb, atol=1e-5)
    assert (la[packed.response_mask == 0] == 0).all() and (ea[packed.response_mask == 0] == 0).all()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb))

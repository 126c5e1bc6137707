import itertools
from math import comb

import pytest
import torch

from opo.metrics import KLProbe, maj_at_k, pass_at_k, repetition_rate
from opo.sequences import pack


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (4, 2), (5, 5), (6, 3)])
def test_pass_at_k_matches_enumeration(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_maj_at_k():
    assert maj_at_k(["5", "5", "3"], [True, True, False], 3) == 1.0
    assert maj_at_k(["3", "5", "3"], [False, True, False], 3) == 0.0
    assert maj_at_k(["3", "5", "5"], [False, True, True], 1) == 0.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    assert maj_at_k([None, "7"], [False, True], 2) == 1.0  # unanswered samples do not vote


def test_repetition_rate():
    assert repetition_rate([[1, 2, 3, 4, 5]], n=2) == 0.0
    assert repetition_rate([[1, 1, 1, 1]], n=2) == pytest.approx(2 / 3)
    assert repetition_rate([[1, 2, 1, 2], [7]], n=2) == pytest.approx(1 / 3)
    assert repetition_rate([], n=4) == 0.0


def test_kl_probe_is_zero_for_the_same_policy_and_positive_after_a_change(micro_policy):
    from opo.sequences import score

    model, tok = micro_policy
    packed = pack([[5, 6, 7], [8, 9]], [[4, 4, 1], [6, 1]], tok.pad_token_id)
    with torch.no_grad():
        logp0 = score(model, packed)[0]
    probe = KLProbe(packed, logp0)
    logprobs = lambda p: score(model, p)[0]  # noqa: E731
    assert probe.estimate(logprobs) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    assert probe.estimate(logprobs) > 1e-3
    again = KLProbe.from_state_dict(probe.state_dict())
    assert again.estimate(logprobs) == pytest.approx(probe.estimate(logprobs))

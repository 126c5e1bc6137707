import itertools
from math import comb

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    assert maj_at_k([None, "7"], [False, True], 2) == 1.0  # unanswered samples do not vote
    # Every sample counts, not only the first k: one draw of the three is right 2/3 of the time.
    assert maj_at_k(["3", "5", "5"], [False, True, True], 1) == pytest.approx(2 / 3)
    assert maj_at_k(["3", "5"], [False, True], 2) == 0.5  # a tie is a coin toss
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True], 1)


def _maj_brute(answers, correct, k):
    """Enumerate every k-subset; in each, the winner is drawn uniformly among tied answers and
    judged by the share of its *drawn* samples that were correct."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for subset in subsets:
        votes = {}
        for i in subset:
            if answers[i] is not None:
                votes.setdefault(answers[i], []).append(correct[i])
        if not votes:
            continue
        top = max(len(v) for v in votes.values())
        winners = [v for v in votes.values() if len(v) == top]
        total += sum(sum(v) / len(v) for v in winners) / len(winners)
    return total / len(subsets)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1", "2", "3", None]), st.booleans()), min_size=1, max_size=8),
       st.data())
def test_maj_at_k_matches_enumeration(samples, data):
    # Correctness usually follows the answer ("1" is right); sometimes it does not (a
    # truncated response zeroed, say), which the enumeration covers too.
    answers = [a for a, _ in samples]
    correct = [a == "1" if not flip else a == "2" for a, flip in samples]
    k = data.draw(st.integers(1, len(samples)))
    assert maj_at_k(answers, correct, k) == pytest.approx(_maj_brute(answers, correct, k), abs=1e-12)


def test_maj_at_k_with_many_distinct_answers_matches_enumeration():
    answers = ["a", "a", "a", "b", "b", "c", "d", "e", None, "a", "b", "f"]
    correct = [a == "b" for a in answers]
    for k in (1, 2, 5, 8, 12):
        assert maj_at_k(answers, correct, k) == pytest.approx(_maj_brute(answers, correct, k))


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

import math
import random
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opo.advantages import ESTIMATORS, compute_advantages, register

ALL = ["opo", "opo_batch", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
GROUPED = ["opo", "grpo", "dr_grpo", "rloo"]


def test_all_estimators_registered():
    assert set(ALL) <= set(ESTIMATORS)


# --- hand-computed example -------------------------------------------------------
# Three prompts with non-contiguous, interleaved ids:
#   group 7: r = 1, 0, 1  l = 2, 4, 2   (indices 0, 2, 4)
#   group 3: r = 0, 1     l = 1, 3      (indices 1, 3)
#   group 5: r = 0.5      l = 5         (index 5, a singleton)
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
L = torch.tensor([2, 1, 4, 3, 2, 5])
G = torch.tensor([7, 3, 7, 3, 7, 5])

# opo: b7 = (2+0+2)/8 = 0.5, b3 = 3/4 = 0.75, singleton baseline 0.
# opo_batch: b = Σlr/Σl = (2+0+0+3+2+2.5)/17 = 9.5/17.
# grpo: group 7 mean 2/3, deviations (1/3, -2/3, 1/3), unbiased var (6/9)/2 = 1/3, so
#   A = dev·√3; group 3 mean 1/2, var 0.5/1, A = ±0.5/√0.5 = ±√0.5; singleton r/1.
# dr_grpo: the deviations above.
# rloo: group 7 (1 - 1/2, 0 - 1, 1 - 1/2); group 3 (0 - 1, 1 - 0); singleton r.
# reinforce_pp: μ = 9.5/17, Σl(r-μ)² = Σlr² - (Σlr)²/Σl = 8.25 - 90.25/17 = 50/17,
#   σ² = (50/17)/16 = 50/272.
S3, H = math.sqrt(3), math.sqrt(0.5)
SIG = math.sqrt(50 / 272)
EXPECTED = {
    "opo": [0.5, -0.75, -0.5, 0.25, 0.5, 0.5],
    "opo_batch": [r - 9.5 / 17 for r in R.tolist()],
    "grpo": [S3 / 3, -H, -2 * S3 / 3, H, S3 / 3, 0.5],
    "dr_grpo": [1 / 3, -0.5, -2 / 3, 0.5, 1 / 3, 0.5],
    "rloo": [0.5, -1.0, -1.0, 1.0, 0.5, 0.5],
    "reinforce_pp": [(r - 9.5 / 17) / SIG for r in R.tolist()],
}


@pytest.mark.parametrize("name", ALL)
def test_hand_computed(name):
    adv = compute_advantages(name, R, L, G)
    assert adv.dtype == torch.float32 and adv.shape == R.shape
    torch.testing.assert_close(adv, torch.tensor(EXPECTED[name]), atol=1e-5, rtol=0)


def test_grpo_eps_option():
    # std + eps with eps = 0.5: group 7 std 1/√3, group 3 std √0.5, singleton std 1.
    a, b = 1 / (1 / S3 + 0.5), 1 / (H + 0.5)
    expected = [a / 3, -0.5 * b, -2 * a / 3, 0.5 * b, a / 3, 0.5 / 1.5]
    adv = compute_advantages("grpo", R, L, G, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_single_response_batch():
    r, l, g = torch.tensor([0.7]), torch.tensor([3]), torch.tensor([0])
    for name in ["opo", "opo_batch", "dr_grpo", "rloo"]:
        assert compute_advantages(name, r, l, g).item() == pytest.approx(0.7)
    assert compute_advantages("grpo", r, l, g).item() == pytest.approx(0.7 / (1 + 1e-6))
    assert compute_advantages("reinforce_pp", r, l, g).item() == 0.0


def test_input_dtypes_and_device():
    # Integer rewards and float lengths are accepted; the result is float32 on rewards' device.
    adv = compute_advantages("opo", torch.tensor([1, 0]), torch.tensor([2.0, 2.0]),
                             torch.tensor([4, 4], dtype=torch.int32))
    assert adv.dtype == torch.float32 and adv.device == torch.device("cpu")
    assert adv.tolist() == [0.5, -0.5]


# --- plain-loop references -------------------------------------------------------
def reference(name, rewards, lengths, groups, eps=1e-6):
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = [0.0] * len(rewards)
    if name in ("opo_batch", "reinforce_pp"):
        n = len(rewards)
        mu = sum(l * r for l, r in zip(lengths, rewards)) / sum(lengths)
        if name == "opo_batch":
            return [r - (mu if n > 1 else 0.0) for r in rewards]
        tokens = sum(lengths)
        var = sum(l * (r - mu) ** 2 for l, r in zip(lengths, rewards)) / max(tokens - 1, 1)
        return [(r - mu) / (math.sqrt(var) + eps) for r in rewards]
    for idx in members.values():
        rs = [rewards[i] for i in idx]
        ls = [lengths[i] for i in idx]
        n = len(idx)
        mean = sum(rs) / n if n > 1 else 0.0
        for j, i in enumerate(idx):
            if name == "opo":
                b = sum(l * r for l, r in zip(ls, rs)) / sum(ls) if n > 1 else 0.0
                out[i] = rewards[i] - b
            elif name == "dr_grpo":
                out[i] = rewards[i] - mean
            elif name == "grpo":
                std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (n - 1)) if n > 1 else 1.0
                out[i] = (rewards[i] - mean) / (std + eps)
            elif name == "rloo":
                others = (sum(rs) - rs[j]) / (n - 1) if n > 1 else 0.0
                out[i] = rewards[i] - others
    return out


def random_batch(rng: random.Random):
    ids = rng.sample(range(-1000, 1000), rng.randint(1, 8))  # non-contiguous, unsorted
    groups = [g for g in ids for _ in range(rng.choice([1, 1, 2, 3, 5, 8]))]
    rng.shuffle(groups)
    binary = rng.random() < 0.5
    rewards = [float(rng.random() < 0.4) if binary else rng.uniform(-3, 3) for _ in groups]
    lengths = [rng.randint(1, 64) for _ in groups]
    return rewards, lengths, groups


@pytest.mark.parametrize("name", ALL)
def test_against_loop_reference(name):
    rng = random.Random(name)
    for _ in range(30):
        rewards, lengths, groups = random_batch(rng)
        adv = compute_advantages(name, torch.tensor(rewards), torch.tensor(lengths),
                                 torch.tensor(groups))
        ref = torch.tensor(reference(name, rewards, lengths, groups), dtype=torch.float32)
        assert torch.allclose(adv, ref, atol=1e-5), (name, rewards, lengths, groups)


# --- properties ------------------------------------------------------------------
reward_st = st.one_of(st.sampled_from([0.0, 1.0]),
                      st.floats(-10, 10, allow_nan=False, width=32))
member_st = st.tuples(reward_st, st.integers(1, 200))
batch_st = st.lists(st.lists(member_st, min_size=1, max_size=6), min_size=1, max_size=6)


def flatten(groups, ids=None):
    rewards, lengths, gids = [], [], []
    for k, members in enumerate(groups):
        for r, l in members:
            rewards.append(r)
            lengths.append(l)
            gids.append(ids[k] if ids else 3 * k + 11)
    return torch.tensor(rewards), torch.tensor(lengths), torch.tensor(gids)


@settings(max_examples=60, deadline=None)
@given(batch=batch_st, data=st.data())
def test_permutation_invariance(batch, data):
    r, l, g = flatten(batch)
    perm = torch.tensor(data.draw(st.permutations(range(len(r)))))
    for name in ALL:
        a = compute_advantages(name, r, l, g)
        b = compute_advantages(name, r[perm], l[perm], g[perm])
        assert torch.allclose(b, a[perm], atol=1e-5, rtol=1e-5), name


@settings(max_examples=60, deadline=None)
@given(batch=batch_st)
def test_equal_rewards_give_zero_advantage(batch):
    # Every group gets a single reward value (its first member's).
    batch = [[(members[0][0], l) for _, l in members] for members in batch]
    r, l, g = flatten(batch)
    multi = torch.tensor([len(m) > 1 for m in batch for _ in m])
    for name in GROUPED:
        adv = compute_advantages(name, r, l, g)
        assert torch.allclose(adv[multi], torch.zeros(()), atol=1e-5), name


@settings(max_examples=60, deadline=None)
@given(batch=batch_st)
def test_opo_length_weighted_advantages_sum_to_zero(batch):
    r, l, g = flatten(batch)
    adv = compute_advantages("opo", r, l, g).double()
    start = 0
    for members in batch:
        end = start + len(members)
        if len(members) > 1:
            lw = l[start:end].double()
            weighted = (lw * adv[start:end]).sum().item()
            scale = (lw * (r[start:end].double().abs() + 1)).sum().item()
            assert abs(weighted) <= 1e-6 * scale, (members, weighted)
        start = end


# --- validation ------------------------------------------------------------------
@pytest.mark.parametrize("rewards, lengths, groups, match", [
    ([1.0, 0.0], [3, 0], [0, 0], "lengths must be finite and >= 1"),
    ([1.0, 0.0], [3, -2], [0, 0], "lengths must be finite and >= 1"),
    ([1.0, float("nan")], [3, 2], [0, 0], "rewards must be finite"),
    ([1.0, float("inf")], [3, 2], [0, 0], "rewards must be finite"),
    ([1.0, 0.0], [3, 2, 1], [0, 0], r"lengths \(3,\)"),
    ([1.0, 0.0], [3, 2], [0], r"group_ids \(1,\)"),
    ([], [], [], "empty batch"),
])
def test_invalid_inputs(rewards, lengths, groups, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("opo", torch.tensor(rewards), torch.tensor(lengths),
                           torch.tensor(groups, dtype=torch.long))


def test_invalid_shapes_and_ids():
    with pytest.raises(ValueError, match=r"1-D.*rewards \(2, 1\)"):
        compute_advantages("opo", torch.ones(2, 1), torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must be integers"):
        compute_advantages("opo", torch.ones(2), torch.ones(2), torch.tensor([0.0, 1.5]))


def test_unknown_estimator_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*dr_grpo.*opo"):
        compute_advantages("ppo", R, L, G)


def test_unknown_option():
    with pytest.raises(ValueError, match="bad option.*'opo'"):
        compute_advantages("opo", R, L, G, eps=0.1)
    with pytest.raises(ValueError, match="bad option.*'grpo'"):
        compute_advantages("grpo", R, L, G, epsilon=0.1)


# --- registry --------------------------------------------------------------------
@pytest.fixture
def scratch_estimator():
    name = "test_max_baseline"

    @register(name)
    def max_baseline(rewards, lengths, group_index, num_groups, *, shift=0.0):
        best = torch.full((num_groups,), -math.inf, dtype=rewards.dtype)
        best = best.scatter_reduce(0, group_index, rewards, reduce="amax")
        return rewards - best[group_index] + shift

    yield name
    del ESTIMATORS[name]


def test_registry_accepts_new_estimator(scratch_estimator):
    adv = compute_advantages(scratch_estimator, R, L, G, shift=1.0)
    assert adv.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="already registered"):
        register(scratch_estimator)(lambda *a: a[0])


def test_registry_cleaned_up():
    assert "test_max_baseline" not in ESTIMATORS

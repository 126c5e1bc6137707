import json

import numpy as np
import pytest
import torch

from opo.advantages import compute_advantages
from opo.variance import (TraceCovariance, group_baselines, group_estimates, length_spread, pearson,
                          spearman, trace_covariance, within_group_pearson)


def test_trace_covariance_known_diagonal_gaussian():
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64) * sigma + 7.0
    assert trace_covariance(x) == pytest.approx(float((sigma ** 2).sum()), rel=0.03)


def test_streaming_trace_matches_batch():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 100
    acc = TraceCovariance(6)
    for row in x:
        acc.update(row)
    assert acc.value == pytest.approx(trace_covariance(x), rel=1e-10)
    torch.testing.assert_close(acc.mean, x.mean(0))
    with pytest.raises(ValueError, match="at least two"):
        trace_covariance(x[:1])


def test_group_baselines_hand_computed():
    r = torch.tensor([[1.0, 0.0, 1.0]])
    w = torch.tensor([[1.0, 6.0, 3.0]])
    assert group_baselines(r, None).tolist() == [[0.0, 0.0, 0.0]]
    assert group_baselines(r, w).tolist()[0] == pytest.approx([0.4, 0.4, 0.4])
    # leave-one-out: i=0 -> (0*6 + 1*3)/9, i=1 -> (1 + 3)/4, i=2 -> 1/7
    assert group_baselines(r, w, leave_one_out=True).tolist()[0] == pytest.approx([3 / 9, 1.0, 1 / 7])
    zero = torch.zeros(1, 3)
    assert group_baselines(r, zero).tolist()[0] == pytest.approx([2 / 3] * 3)       # plain mean
    assert group_baselines(r, zero, True).tolist()[0] == pytest.approx([0.5, 1.0, 0.5])
    assert group_baselines(torch.tensor([[0.7]]), torch.ones(1, 1)).tolist() == [[0.0]]
    assert group_baselines(torch.tensor([[0.7]]), torch.ones(1, 1), True).tolist() == [[0.0]]


def test_in_group_mean_is_a_scaled_rloo_and_matches_the_estimators():
    gen = torch.Generator().manual_seed(2)
    r = (torch.rand(5, 6, generator=gen) < 0.4).double()
    lengths = torch.randint(1, 40, (5, 6), generator=gen).double()
    ones = torch.ones_like(r)
    in_group = r - group_baselines(r, ones)
    loo = r - group_baselines(r, ones, leave_one_out=True)
    torch.testing.assert_close(in_group, loo * 5 / 6)  # (K-1)/K
    groups = torch.arange(5).repeat_interleave(6)
    torch.testing.assert_close(loo.flatten().float(), compute_advantages("rloo", r.flatten(),
                               lengths.flatten(), groups))
    torch.testing.assert_close((r - group_baselines(r, lengths)).flatten().float(),
                               compute_advantages("opo", r.flatten(), lengths.flatten(), groups))


def synthetic_groups(groups: int, k: int, seed: int):
    """1-D score-function gradients g = ±s, s in {1, 3}, reward 1 exactly when s = 3.

    E[g] = 0 as for a real score function. Per sample, with a fixed baseline b,
    Var[(r - b) g] = E[(r - b)² s²] = ((1 - b)² 9 + b²) / 2: 4.5 at b = 0, and the minimum
    0.45 at b* = E[s² r] / E[s²] = 0.9.
    """
    gen = torch.Generator().manual_seed(seed)
    s = torch.where(torch.rand(groups, k, generator=gen) < 0.5, 1.0, 3.0).double()
    sign = torch.where(torch.rand(groups, k, generator=gen) < 0.5, -1.0, 1.0).double()
    return (s * sign).unsqueeze(-1), (s == 3).double(), s ** 2


def test_variance_of_fixed_baselines_has_the_known_value():
    k = 4
    grads, r, _ = synthetic_groups(40000, k, seed=3)
    for b, per_sample in [(0.0, 4.5), (0.9, 0.45), (0.5, 1.25)]:
        est = group_estimates(grads, r, torch.full_like(r, b))
        assert trace_covariance(est) == pytest.approx(per_sample / k, rel=0.04), b


def test_gradient_weighted_baseline_beats_the_mean_when_norms_track_reward():
    grads, r, norm2 = synthetic_groups(40000, 8, seed=4)
    var = {name: trace_covariance(group_estimates(grads, r, group_baselines(r, w, loo)))
           for name, w, loo in [("mean", torch.ones_like(r), True), ("exact", norm2, True),
                                ("none", None, False)]}
    # Leave-one-out baselines are unbiased: all three have mean ≈ 0 = E[r g].
    assert var["exact"] < 0.5 * var["mean"] < var["none"]
    # At large K the leave-one-out plug-in tends to the known optimum 0.45 / K.
    assert var["exact"] == pytest.approx(0.45 / 8, rel=0.25)


def test_correlations_and_spread():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert spearman([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)  # ties share a rank
    # Across groups x and y are anti-correlated; within each group they rise together.
    x, y, g = [0, 1, 10, 11], [11, 12, 1, 2], [0, 0, 1, 1]
    assert pearson(x, y) < -0.9 and within_group_pearson(x, y, g) == pytest.approx(1.0)
    spread = length_spread([[5, 30], [10, 10]])
    assert spread["mean_within_group_std"] == pytest.approx(6.25)
    assert spread["mean_max_min_ratio"] == pytest.approx(3.5)
    assert spread["share_groups_ratio_ge_2"] == 0.5
    with pytest.raises(ValueError):
        length_spread([[0, 3]])


def test_variance_cli_end_to_end(micro_model_dir, tmp_path, capsys):
    from opo.cli import main

    out = tmp_path / "v.json"
    rc = main(["variance", "--model", str(micro_model_dir), "--prompts", "2", "--groups", "2",
               "--k", "3", "--threads", "1", "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for key in ("var_ratio_opo_vs_mean", "var_ratio_exact_vs_mean", "var_ratio_proxy_vs_mean",
                "corr_gradnorm2_length", "var_ratio_opo_loo_vs_mean_loo", "baseline_handling"):
        assert key in result
    tc = result["trace_cov"]
    if tc["mean"] > 0:
        assert result["var_ratio_opo_vs_mean"] == pytest.approx(tc["opo"] / tc["mean"])
    assert all(np.isfinite(v) and v >= 0 for v in tc.values())
    printed = capsys.readouterr().out
    assert "baselines: in-group" in printed and "K-1 responses only" in result["baseline_handling"]


def test_variance_cli_rejects_one_group(micro_model_dir, capsys):
    from opo.cli import main

    assert main(["variance", "--model", str(micro_model_dir), "--prompts", "1", "--groups", "1",
                 "--threads", "1"]) == 2
    assert "at least 2 groups" in capsys.readouterr().err

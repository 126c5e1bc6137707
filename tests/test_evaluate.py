import json

import pytest

from opo.cli import main


def test_opo_eval_reports_pass_at_k_and_writes_json(micro_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(micro_model_dir), "--task", "toy_addition", "--n", "4",
                 "--k", "1,2,4", "--limit", "6", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4", "mean_length"):
        assert key in result
    assert 0.0 <= result["pass@1"] <= result["pass@2"] <= result["pass@4"] <= 1.0
    assert 1 <= result["mean_length"] <= 8
    assert result["problems"] == 6 and result["samples"] == 4
    assert "pass@4" in capsys.readouterr().out


def test_shipped_tiny_model_solves_some_but_not_all(tmp_path):
    """The warm start leaves room for RL: greedy accuracy is strictly between 0 and 1."""
    out = tmp_path / "tiny.json"
    assert main(["eval", "--model", "tiny", "--task", "toy_addition", "--limit", "50",
                 "--out", str(out)]) == 0
    acc = json.loads(out.read_text())["pass@1"]
    assert 0.1 < acc < 0.7


def test_eval_rejects_k_above_n(micro_model_dir):
    with pytest.raises(ValueError, match="between 1 and samples"):
        from opo.evaluate import evaluate
        evaluate(None, None, [], None, None, samples=2, k=[4])

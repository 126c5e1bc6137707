import pytest

from opo.tasks import scratchpad
from opo.config import DataConfig, load_config
from opo.data import load_examples
from opo.rewards import exact_match


def test_responses_direct_worked_and_slipped():
    assert scratchpad.response_text(457, 368, worked=True) == "7+8=15,5+6+1=12,4+3+1=8>825"
    assert scratchpad.response_text(457, 368, worked=False) == ">825"
    assert scratchpad.response_text(457, 368, worked=True, carry_in=False) == "7+8=15,5+6=11,4+3=7>715"
    assert scratchpad.response_text(99, 11, worked=True) == "9+1=10,9+1+1=11>110"
    assert scratchpad.response_text(12, 34, worked=False, carry_in=False) == ">46"


def test_both_formats_score_and_lengths_differ():
    examples = scratchpad.make_scratchpad_examples(300, seed=5)
    ratios = []
    for ex in examples:
        a, b = ex["question"][:-1].split("+")
        assert len(a) == len(b) and int(ex["answer"]) == int(a) + int(b)
        for key in ("worked", "direct"):
            assert exact_match(ex["question"], ex["meta"][key], ex) == 1.0
        ratios.append(len(ex["meta"]["worked"]) / len(ex["meta"]["direct"]))
    assert min(ratios) > 3  # the working is always several times longer


def test_demonstration_rates():
    demos = scratchpad.demonstrations(4000, seed=2)
    worked = [ex for ex in demos if ex["meta"]["worked"].split(">")[0]]
    assert 0.45 < len(worked) / len(demos) < 0.55

    def slipped(ex):
        return ex["meta"]["worked"].split(">")[1] != ex["answer"]

    def can_slip(ex):  # only problems with a carry show the slip
        a, b = map(int, ex["question"][:-1].split("+"))
        return scratchpad.digits_sum(a, b, carry_in=False)[1] != ex["answer"]

    direct = [ex for ex in demos if ex not in worked]
    rate = lambda exs: sum(map(slipped, exs)) / sum(map(can_slip, exs))  # noqa: E731
    assert 0.74 < rate(direct) < 0.86 and 0.44 < rate(worked) < 0.56


def test_registered_source_matches_toy_addition_problems():
    cfg = DataConfig(source="toy_scratchpad", train_size=50, eval_size=20)
    train, held_out = load_examples(cfg)
    toy_train, toy_held = load_examples(DataConfig(source="toy_addition", train_size=50, eval_size=20))
    assert [e["question"] for e in held_out] == [e["question"] for e in toy_held]
    assert [e["answer"] for e in train] == [e["answer"] for e in toy_train]
    assert all("direct" in e["meta"] and "worked" in e["meta"] for e in train)
    from opo.data import DataError

    with pytest.raises(DataError, match="toy_scratchpad"):
        load_examples(DataConfig(source="toy_scratchpad", task_config={"digits": 3}))


def test_preset_loads():
    cfg = load_config("scratchpad")
    assert cfg.data.source == "toy_scratchpad" and cfg.model.path == scratchpad.MODEL_NAME
    longest = max(len(scratchpad.response_text(a, b, worked=True)) for a in (9999, 9990, 5555)
                  for b in (9999, 9909, 4445))
    assert cfg.rollout.max_new_tokens >= longest + 1  # room for the longest working and eos


def test_shipped_weights_are_small():
    weights = scratchpad.ASSET_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 10_000_000


def test_builtin_model_name_resolves():
    from opo.models import resolve_model_dir

    assert resolve_model_dir(scratchpad.MODEL_NAME) == str(scratchpad.ASSET_DIR)


def test_describe_model_reports_formats_and_spread(micro_model_dir):
    from opo.variance import describe_scratchpad_model

    result = describe_scratchpad_model(micro_model_dir, problems=4, groups=2, group_size=3,
                                       max_new_tokens=6)
    for part in ("greedy", "sampled"):
        assert 0 <= result[part]["accuracy"] <= 1 and 0 <= result[part]["direct_share"] <= 1
    assert result["length_spread"]["groups"] == 2
    assert result["length_spread"]["mean_max_min_ratio"] >= 1

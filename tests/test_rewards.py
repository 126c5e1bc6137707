"""Tests for opo.rewards: extraction, built-in rewards, the isolated pool and the batch scorer."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opo.rewards import (AUTO_BARE_MAX_CHARS, REWARDS, IsolatedPool, RewardScorer, committed_answer,
                         exact_match, extract_boxed, extract_final_answer, format_reward,
                         load_user_reward, math_equivalent)

# Workers start with the parent's sys.path, so this makes tests/reward_fns.py importable there.
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

MEGABYTE = 1 << 20


def ex(answer, **meta):
    return {"question": "q", "answer": answer, "meta": meta}


# --------------------------------------------------------------------------- extraction

def test_boxed_handles_nested_braces_and_takes_the_last_box():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{ x^{2} }") == "x^{2}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"\boxed {3}") == "3"


def test_boxed_skips_an_unclosed_last_box_and_returns_none_without_a_box():
    assert extract_boxed(r"\boxed{5} and then \boxed{6") == "5"
    assert extract_boxed(r"\boxed{") is None
    assert extract_boxed("no box here {}") is None


@pytest.mark.parametrize("text, expected", [
    ("it is -3", "-3"),
    ("first 2 then 4.5", "4.5"),
    ("half is 1/2", "1/2"),
    ("total 1,234,567 apples", "1234567"),
    ("a list 1,2", "2"),  # not a thousands group
    ("5-3 is 2", "2"),
    ("7-3", "3"),  # a minus after a digit is subtraction, not a sign
    ("about .5", ".5"),
    (r"\boxed{x+1} but 3", "x+1"),  # the box wins over numbers
    (r"\boxed{} then 3", "3"),  # an empty box does not count
    ("no digits", None),
    ("", None),
])
def test_last_number_fallback(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("work\nAnswer: 42\nthanks", "42"),
    ("the answer: yes", "yes"),
    ("#### 7", "7"),
    ("x = 5", "5"),
    ("**Answer:** 4", "4"),
    ("answer: 1 and x = 9", "9"),  # the last marker wins
    ("Answer:", None),
    ("nothing to see", None),
])
def test_after_marker_fallback(text, expected):
    assert extract_final_answer(text, fallback="after_marker") == expected


def test_no_fallback_and_bad_fallback():
    assert extract_final_answer("it is 3", fallback="none") is None
    assert extract_final_answer(r"\boxed{3}", fallback="none") == "3"
    with pytest.raises(ValueError, match="fallback"):
        extract_final_answer("3", fallback="first_number")


@pytest.mark.parametrize("text", [
    "\\boxed{" * (MEGABYTE // 7),  # many unclosed boxes
    "\\boxed" + "{" * MEGABYTE,
    "\\boxed{" + "{}" * (MEGABYTE // 2),  # balanced pairs inside a box that never closes
    "1," * (MEGABYTE // 2),
    "9" * MEGABYTE,
    "-." * (MEGABYTE // 2),
    "answer:" * (MEGABYTE // 7),
    "a " * (MEGABYTE // 2),
])
def test_extraction_is_fast_on_a_megabyte(text):
    # A quadratic path on a megabyte is ~1e12 steps (hours); a linear one takes well under a
    # second. The bound is loose so that a busy machine cannot fail it, yet no quadratic
    # path could pass it.
    start = time.monotonic()
    for fallback in ("last_number", "after_marker"):
        extract_final_answer(text, fallback)
    assert time.monotonic() - start < 60.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="\\boxedfb{}0123456789.,-/=:answer #\n", max_size=200))
def test_extraction_never_raises(text):
    for fallback in ("last_number", "after_marker", "none"):
        answer = extract_final_answer(text, fallback)
        assert answer is None or isinstance(answer, str)


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_last_number_reads_back_any_integer_with_thousands_commas(n):
    assert extract_final_answer(f"So the total is {n:,}.") == str(n)


# --------------------------------------------------------------------------- exact_match, format

@pytest.mark.parametrize("response, gold, expected", [
    ("The answer is 5.0", "5", 1.0),
    ("it is 5", "5.0", 1.0),
    ("we get 1,234.", "1234", 1.0),
    ("we get 1234", "1,234", 1.0),
    (r"\boxed{ 1 / 2 }", "0.5", 1.0),
    (r"\boxed{42.}", "42", 1.0),
    ("it is 6", "5", 0.0),
    ("no number", "5", 0.0),
    ("Answer: yes", "yes", 1.0),  # a non-numeric gold answer is read after the marker
    ("Answer: no", "yes", 0.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    ("Answer: ", "", 0.0),
    (r"\boxed{1e999999999}", "1", 0.0),  # not expanded into a billion digits
    (r"\boxed{1.5/2}", "0.75", 0.0),
])
def test_exact_match(response, gold, expected):
    assert exact_match("p", response, ex(gold)) == expected


def test_format_reward():
    assert format_reward("p", r"\boxed{x}", ex("5")) == 1.0
    assert format_reward("p", "it is 3", ex("5")) == 1.0
    assert format_reward("p", "no idea", ex("5")) == 0.0
    assert format_reward("p", "Answer: blue", ex("red")) == 1.0


# --------------------------------------------------------------------------- math_equivalent

@pytest.fixture(scope="module")
def warm_math():
    # The first call starts the shared workers (interpreter start plus the math_verify
    # import); do it once so timing assertions measure checks, not start-up.
    assert math_equivalent(r"\boxed{1}", "1") == 1.0


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{\frac12}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{0.5}", "1/2"),
    ("so it is 1/2", r"$\frac{1}{2}$"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"\boxed{\dfrac{3}{4}}", r"\boxed{0.75}"),
])
def test_math_equivalent_accepts_equal_forms(warm_math, response, gold):
    assert math_equivalent(response, gold) == 1.0


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{0.4}", "1/2"),
    ("it is 3", "4"),
    ("no answer at all", "4"),
    (r"\boxed{???}", "???"),  # unparseable gold: never 1, even for an identical "answer"
    ("1", ""),
    (r"\boxed{}", ""),
])
def test_math_equivalent_rejects(warm_math, response, gold):
    assert math_equivalent(response, gold) == 0.0


@pytest.mark.parametrize("response", [
    r"\boxed{9^{9^{9^{9}}}}",
    "7 " * (MEGABYTE // 2),
    r"\boxed{" + "(" * (MEGABYTE // 4) + "1" + ")" * (MEGABYTE // 4) + "}",
])
def test_math_equivalent_bounds_hostile_output(warm_math, response):
    start = time.monotonic()
    assert math_equivalent(response, "1", timeout_s=2) == 0.0
    assert time.monotonic() - start < 2 + 3  # the timeout plus a margin for a busy machine


def test_math_equivalent_from_other_threads(warm_math):
    results = {}

    def check(i):
        results[i] = math_equivalent(rf"\boxed{{{i}}}", str(i if i % 2 else i + 1))

    threads = [threading.Thread(target=check, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}


# --------------------------------------------------------------------------- user rewards, pool

def test_load_user_reward_and_its_errors():
    assert load_user_reward("reward_fns:add")(2, 3) == 5
    with pytest.raises(ValueError, match="no_such_module"):
        load_user_reward("no_such_module:f")
    with pytest.raises(ValueError, match="reward_fns:nope.*no attribute"):
        load_user_reward("reward_fns:nope")
    with pytest.raises(ValueError, match="not a function"):
        load_user_reward("reward_fns:not_callable")
    with pytest.raises(ValueError, match="module:function"):
        load_user_reward("reward_fns")


def test_pool_runs_calls_in_order_and_contains_failures():
    with IsolatedPool(workers=2, timeout_s=1.0, preload=["reward_fns"]) as pool:
        outcomes = pool.map("reward_fns:add", [(i, 1) for i in range(20)])
        assert [o.value for o in outcomes] == list(range(1, 21))
        died, fine = pool.map("reward_fns:misbehaving", [("p", "die", {}), ("p", "a", ex("a"))])
        assert not died.ok and "worker died" in died.error and not died.timed_out
        assert fine.ok and fine.value == 1.0
        missing = pool.map("reward_fns:nope", [()])[0]
        assert "AttributeError" in missing.error
        with pytest.raises(TypeError, match="JSON"):
            pool.map("reward_fns:add", [(object(), 1)])
        assert pool.map("reward_fns:add", [("a", "b")])[0].value == "ab"
    with pytest.raises(RuntimeError, match="closed"):
        pool.map("reward_fns:add", [(1, 1)])


def test_pool_reports_a_worker_that_cannot_start():
    with IsolatedPool(workers=1, preload=["no_such_module_for_opo"]) as pool:
        with pytest.raises(RuntimeError, match="no_such_module_for_opo"):
            pool.map("reward_fns:add", [(1, 1)])


def test_pool_recovers_from_an_interrupted_map():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with IsolatedPool(workers=1, timeout_s=30, preload=["reward_fns"]) as pool:
            pool.map("reward_fns:add", [(1, 1)])
            signal.setitimer(signal.ITIMER_REAL, 0.3)  # Ctrl-C while a call hangs
            with pytest.raises(KeyboardInterrupt):
                pool.map("reward_fns:misbehaving", [("p", "hang", {})])
            # The worker holding the abandoned call was replaced, so no stale reply shows up.
            assert pool.map("reward_fns:add", [(2, 3)])[0].value == 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def user_scorer():
    with RewardScorer(kind="reward_fns:misbehaving", timeout_s=1.0, workers=2) as scorer:
        yield scorer


def test_scorer_contains_misbehaving_user_rewards(user_scorer):
    responses = ["good", "raise", "hang", "nan", "inf", "string", "none", "true", "bad", "good"]
    examples = [ex("good") for _ in responses]
    result = user_scorer.score(["p"] * len(responses), responses, examples)
    assert result.rewards == [1.0, 0, 0, 0, 0, 0, 0, 1.0, 0, 1.0]
    assert result.correct == [True, False, False, False, False, False, False, True, False, True]
    assert result.errors == 6  # raise, hang, nan, inf, string, none
    assert result.timeouts == 1
    messages = " | ".join(result.error_messages)
    assert len(result.error_messages) == 5  # only the first few are kept
    assert "ValueError: boom" in messages and "timed out" in messages
    assert all(len(m) <= 200 for m in result.error_messages)

    # The pool replaced the killed worker and keeps scoring.
    again = user_scorer.score(["p", "p"], ["good", "bad"], [ex("good"), ex("good")])
    assert again.rewards == [1.0, 0.0] and again.errors == 0


def test_scorer_isolated_calls_run_in_parallel(user_scorer):
    user_scorer.score(["p"], ["good"], [ex("good")])  # the pool is warm
    start = time.monotonic()
    result = user_scorer.score(["p", "p"], ["hang", "hang"], [ex("x"), ex("x")])
    assert result.timeouts == 2
    assert time.monotonic() - start < 1.9  # both deadlines ran side by side, not one after another


def test_scorer_exact_match_in_process_with_format_weight():
    scorer = RewardScorer(kind="exact_match", format_weight=0.1)
    assert not scorer.isolated
    result = scorer.score(["p"] * 4, ["it is 5", "it is 6", "no idea", "it is 5"],
                          [ex("5"), ex("5"), ex("5"), {"question": "q"}])
    assert result.rewards == pytest.approx([1.1, 0.1, 0.0, 0.0])
    assert result.correct == [True, False, False, False]
    assert result.errors == 1 and "KeyError" in result.error_messages[0]  # no "answer" key


def test_scorer_math_verify_kind_is_isolated():
    with RewardScorer(kind="math_verify", timeout_s=2.0, workers=2) as scorer:
        assert scorer.isolated
        result = scorer.score(["p"] * 3, [r"\boxed{\frac12}", r"\boxed{9^{9^{9^{9}}}}", "it is 3"],
                              [ex("0.5"), ex("1"), ex("4")])
    assert result.rewards == [1.0, 0.0, 0.0]
    assert result.timeouts == 1 and result.errors == 1


def test_scorer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown reward kind"):
        RewardScorer(kind="exactmatch")
    with pytest.raises(ValueError, match="no_such_module"):
        RewardScorer(kind="no_such_module:f")
    with pytest.raises(ValueError, match="isolate"):
        RewardScorer(isolate="sometimes")
    with pytest.raises(ValueError, match="must match"):
        RewardScorer().score(["p"], [], [])
    assert set(REWARDS) == {"exact_match", "math_verify", "reasoning_gym"}


# --------------------------------------------------------------------------- reasoning_gym

@pytest.fixture(scope="module")
def chain_sum_example():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=0)[0]
    return {"question": entry["question"], "answer": entry["answer"],
            "meta": {"rg_task": "chain_sum", "rg_entry": entry}}


def test_reasoning_gym_kind_uses_the_task_scorer(chain_sum_example):
    gold = chain_sum_example["answer"]
    wrong = str(int(gold) + 1)
    responses = [rf"\boxed{{{gold}}}", f"The answer is {gold}.", f"I think {wrong}", ""]
    scorer = RewardScorer(kind="reasoning_gym")
    result = scorer.score(["p"] * 4, responses, [chain_sum_example] * 4)
    assert result.rewards == [1.0, 1.0, 0.0, 0.0]
    assert result.errors == 0


def test_reasoning_gym_kind_needs_its_metadata():
    with pytest.raises(ValueError, match="rg_task"):
        RewardScorer(kind="reasoning_gym").score(["p"], ["1"], [ex("1")])



# --------------------------------------------------------------------------- reward semantics

LONG_REASONING = "Let me think. " * 20  # 280 characters: past the auto format's bare-answer limit


@pytest.mark.parametrize("response, fmt, truncated, expected", [
    ("it is 5", "auto", False, "5"),                 # short and complete: a bare number counts
    ("it is 5", "auto", True, None),                 # cut off: the number may be mid-thought
    (LONG_REASONING + "so 5", "auto", False, None),  # long: the last number may be a step
    (LONG_REASONING + r"\boxed{5}", "auto", True, "5"),  # a box always counts
    ("it is 5", "boxed", False, None),
    (r"so \boxed{5} then 6", "boxed", False, "5"),
    ("it is 5", "last_number", True, "5"),           # today's behaviour: anything goes
    (LONG_REASONING + "so 5", "last_number", False, "5"),
])
def test_committed_answer_follows_the_answer_format(response, fmt, truncated, expected):
    assert committed_answer(response, "last_number", fmt, truncated) == expected


def test_auto_format_limit_is_on_characters_of_the_stripped_response():
    short = "x" * (AUTO_BARE_MAX_CHARS - 1) + "5"
    assert committed_answer("  \n" + short + "\n\n", "last_number") == "5"
    assert committed_answer(short + "7", "last_number") is None
    with pytest.raises(ValueError, match="answer_format"):
        committed_answer("5", "last_number", "anything")


@pytest.mark.parametrize("kind", ["exact_match", "reasoning_gym"])
def test_answer_format_applies_to_string_kinds(kind, chain_sum_example):
    gold = chain_sum_example["answer"]
    responses = [f"The sum is {gold}.", LONG_REASONING + f"the sum is {gold}", rf"\boxed{{{gold}}}"]
    expected = {"auto": [1.0, 0.0, 1.0], "boxed": [0.0, 0.0, 1.0], "last_number": [1.0, 1.0, 1.0]}
    for fmt, rewards in expected.items():
        scorer = RewardScorer(kind=kind, answer_format=fmt)
        result = scorer.score(["p"] * 3, responses, [chain_sum_example] * 3)
        assert result.rewards == rewards, fmt
        assert result.correct == [r == 1.0 for r in rewards]
    # Truncation takes away a bare answer under auto, not under last_number.
    assert RewardScorer(kind=kind).score(["p"], [f"it is {gold}"], [chain_sum_example],
                                         truncated=[True]).rewards == [0.0]
    assert RewardScorer(kind=kind, answer_format="last_number").score(
        ["p"], [f"it is {gold}"], [chain_sum_example], truncated=[True]).rewards == [1.0]


def test_answer_format_applies_to_math_verify():
    responses = ["so x = 1/2", LONG_REASONING + "so x = 1/2", LONG_REASONING + r"\boxed{\frac12}", "1/2"]
    truncated = [False, False, False, True]
    expected = {"auto": [1.0, 0.0, 1.0, 0.0], "boxed": [0.0, 0.0, 1.0, 0.0],
                "last_number": [1.0, 1.0, 1.0, 1.0]}
    for fmt, rewards in expected.items():
        # In-process: these checks are quick, and isolation is tested elsewhere.
        scorer = RewardScorer(kind="math_verify", answer_format=fmt, isolate="never")
        result = scorer.score(["p"] * 4, responses, [ex("0.5")] * 4, truncated=truncated)
        assert result.rewards == rewards, fmt
        assert result.errors == 0


def test_the_result_carries_the_answer_the_kind_read(chain_sum_example):
    gold = chain_sum_example["answer"]
    result = RewardScorer(kind="reasoning_gym").score(
        ["p"] * 3, [f"it is {gold}", LONG_REASONING + "7", "Answer:\nnothing"], [chain_sum_example] * 3)
    assert result.answers == [gold, None, "nothing"]  # the last non-empty line is the fallback


def test_partial_credit_is_binarised_unless_asked_for(chain_sum_example):
    gold = chain_sum_example["answer"]
    near = "1" + gold  # reasoning-gym gives len(gold) / len(answer) when the gold is inside
    for partial, expected in [(False, 0.0), (True, len(gold) / len(near))]:
        result = RewardScorer(kind="reasoning_gym", partial_credit=partial).score(
            ["p"] * 2, [rf"\boxed{{{near}}}", rf"\boxed{{{gold}}}"], [chain_sum_example] * 2)
        assert result.rewards == pytest.approx([expected, 1.0])
        assert result.correct == [False, True]  # accuracy counts full scores only, either way


def test_partial_credit_for_user_functions():
    responses = ["0.25", "1.0", "-1"]
    for partial, expected in [(False, [0.0, 1.0, 0.0]), (True, [0.25, 1.0, -1.0])]:
        scorer = RewardScorer(kind="reward_fns:graded", isolate="never", partial_credit=partial)
        assert scorer.score(["p"] * 3, responses, [ex("")] * 3).rewards == expected


def test_truncated_responses_score_zero_when_asked(chain_sum_example):
    gold = chain_sum_example["answer"]
    responses = [rf"\boxed{{{gold}}}"] * 3
    flags = [True, False, True]
    kept = RewardScorer(kind="reasoning_gym").score(["p"] * 3, responses, [chain_sum_example] * 3,
                                                    truncated=flags)
    assert kept.rewards == [1.0, 1.0, 1.0] and kept.truncated_zeroed == 0
    scorer = RewardScorer(kind="reasoning_gym", truncated="zero", format_weight=0.5)
    zeroed = scorer.score(["p"] * 3, responses, [chain_sum_example] * 3, truncated=flags)
    assert zeroed.rewards == [0.0, 1.5, 0.0]  # no format bonus either
    assert zeroed.correct == [False, True, False] and zeroed.truncated_zeroed == 2
    assert zeroed.answers == [gold] * 3  # still shown, for reading samples
    with pytest.raises(ValueError, match="truncated=zero"):
        scorer.score(["p"], ["1"], [chain_sum_example])
    with pytest.raises(ValueError, match="truncated flags"):
        scorer.score(["p"], ["1"], [chain_sum_example], truncated=[True, False])


@pytest.mark.parametrize("isolate", ["never", "always"])
def test_user_functions_receive_the_options_they_name(isolate):
    with RewardScorer(kind="reward_fns:sees_options", isolate=isolate, workers=1) as scorer:
        result = scorer.score(["p"] * 2, ["a", "b"], [ex("a")] * 2, truncated=[True, False])
    assert result.rewards == [1.0, 0.0] and result.errors == 0
    # A function that names no option is called with the three arguments only.
    assert RewardScorer(kind="reward_fns:misbehaving", isolate="never").score(
        ["p"], ["a"], [ex("a")], truncated=[True]).rewards == [1.0]


def test_scorer_from_config_uses_every_reward_field():
    from opo.config import load_config

    cfg = load_config("tiny", ["reward.partial_credit=true", "reward.answer_format=boxed",
                               "reward.truncated=zero", "reward.format_weight=0.2"])
    scorer = RewardScorer.from_config(cfg.reward)
    assert (scorer.partial_credit, scorer.answer_format, scorer.truncated_policy,
            scorer.format_weight) == (True, "boxed", "zero", 0.2)
    with pytest.raises(ValueError, match="answer_format"):
        RewardScorer(answer_format="box")
    with pytest.raises(ValueError, match="truncated"):
        RewardScorer(truncated="drop")

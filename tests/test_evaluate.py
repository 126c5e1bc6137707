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
        from opo.evaluation import evaluate
        evaluate(None, None, [], None, None, samples=2, k=[4])


# --------------------------------------------------------------------------- samples, seeds, flags

def _eval_args(*argv):
    from opo.cli import build_parser

    return build_parser().parse_args(["eval", *argv])


def test_eval_samples_out_and_show(micro_model_dir, tmp_path, capsys):
    samples, out = tmp_path / "samples.jsonl", tmp_path / "eval.json"
    code = main(["eval", "--model", str(micro_model_dir), "--task", "toy_addition", "--n", "3",
                 "--limit", "4", "--max-new-tokens", "6", "--samples-out", str(samples),
                 "--show", "2", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 12
    assert [(r["problem"], r["sample"]) for r in records] == [(p, s) for p in range(4) for s in range(3)]
    for r in records:
        assert {"question", "prompt", "response", "answer", "gold", "reward", "correct",
                "finish_reason", "length"} <= r.keys()
        assert r["prompt"].endswith(r["question"]) and 1 <= r["length"] <= 6
    result = json.loads(out.read_text())
    assert result["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 12)
    assert result["truncated_rate"] == pytest.approx(
        sum(r["finish_reason"] == "length" for r in records) / 12)
    printed = capsys.readouterr().out
    assert printed.count("--- problem") == 2 and "answer read:" in printed


def test_eval_seed_makes_sampling_repeatable(micro_model_dir, tmp_path):
    def run(seed, name):
        path = tmp_path / name
        assert main(["eval", "--model", str(micro_model_dir), "--task", "toy_addition", "--n", "4",
                     "--limit", "3", "--max-new-tokens", "6", "--seed", str(seed),
                     "--samples-out", str(path)]) == 0
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]

    assert run(1, "a.jsonl") == run(1, "b.jsonl")
    assert run(1, "a.jsonl") != run(2, "c.jsonl")


def test_preset_task_settings_do_not_leak_into_another_task():
    from opo.cli import eval_config

    same = eval_config(_eval_args("--preset", "smollm2"))
    assert same.data.task == "chain_sum" and same.data.task_config["max_terms"] == 2
    assert same.reward.kind == "reasoning_gym" and same.prompt.template == "chat"

    other = eval_config(_eval_args("--preset", "smollm2", "--task", "basic_arithmetic"))
    assert other.data.task == "basic_arithmetic" and other.data.task_config == {}
    assert other.model.path == "smollm2-135m-instruct"  # the model and eval settings stay

    tiny = eval_config(_eval_args("--preset", "tiny", "--model", "smollm2-135m-instruct"))
    assert tiny.prompt.template == "auto"  # the tiny preset's plain template is for its own model
    assert eval_config(_eval_args("--preset", "tiny")).prompt.template == "plain"

    champ = eval_config(_eval_args("--preset", "smollm2", "--task", "champ"))
    assert (champ.data.source, champ.reward.kind) == ("champ", "math_verify")
    assert "boxed" in champ.prompt.instruction


def test_eval_flags_and_source_defaults():
    from opo.cli import eval_config

    cfg = eval_config(_eval_args("--task", "champ"))
    assert cfg.reward.kind == "math_verify" and cfg.eval.samples == 1 and cfg.eval.temperature == 0
    cfg = eval_config(_eval_args("--task", "champ", "--reward", "exact_match", "--k", "1,8",
                                 "--top-p", "0.9", "--set", "reward.answer_format=boxed"))
    assert cfg.reward.kind == "exact_match" and cfg.reward.answer_format == "boxed"
    assert cfg.eval.samples == 8 and cfg.eval.temperature == 1.0 and cfg.eval.top_p == 0.9
    cfg = eval_config(_eval_args("--task", "chain_sum", "--task-config", '{"min_terms": 2}', "--n", "2",
                                 "--temperature", "0.5", "--max-new-tokens", "64"))
    assert (cfg.data.source, cfg.data.task, cfg.data.task_config) == ("reasoning_gym", "chain_sum",
                                                                      {"min_terms": 2})
    assert (cfg.reward.kind, cfg.eval.temperature, cfg.eval.max_new_tokens) == ("reasoning_gym", 0.5, 64)


def test_eval_n_keeps_only_the_preset_k_values_it_can_report():
    from opo.cli import eval_config

    # smollm2's preset evaluates 4 samples with k = [1, 4]; greedy (--n 1) used to be refused.
    greedy = eval_config(_eval_args("--preset", "smollm2", "--n", "1", "--temperature", "0"))
    assert (greedy.eval.samples, greedy.eval.k, greedy.eval.temperature) == (1, [1], 0.0)
    assert eval_config(_eval_args("--preset", "smollm2", "--n", "2")).eval.k == [1]
    assert eval_config(_eval_args("--preset", "smollm2", "--n", "8")).eval.k == [1, 4]
    assert eval_config(_eval_args("--preset", "smollm2", "--n", "2", "--k", "1,2")).eval.k == [1, 2]


def test_eval_token_limit_follows_source_and_prompt():
    from types import SimpleNamespace

    from opo.config import load_config
    from opo.evaluation import eval_max_new_tokens

    chat, plain = SimpleNamespace(chat_template="{{ x }}"), SimpleNamespace(chat_template=None)
    cfg = load_config("tiny", ["prompt.template=auto"])
    assert eval_max_new_tokens(cfg, plain) == 32
    assert eval_max_new_tokens(cfg, chat) == 256
    assert eval_max_new_tokens(cfg, chat, training=True) == cfg.rollout.max_new_tokens
    cfg = load_config("tiny", ["data.source=champ", "prompt.template=auto"])
    assert eval_max_new_tokens(cfg, chat) == 512
    cfg = load_config("tiny", ["eval.max_new_tokens=48"])
    assert eval_max_new_tokens(cfg, chat) == eval_max_new_tokens(cfg, chat, training=True) == 48


class _FixedEngine:
    """Returns given responses and finish reasons, to test the scoring side of evaluate."""

    def __init__(self, texts, reasons):
        self.texts, self.reasons = texts, reasons

    def generate(self, prompt_ids, params):
        from opo.rollout import RolloutBatch

        n = params.n
        return RolloutBatch(prompt_ids=[p for p in prompt_ids for _ in range(n)],
                            response_ids=[[1] * (i + 1) for i in range(len(self.texts))],
                            finish_reasons=self.reasons, group_ids=[g for g in range(len(prompt_ids))
                                                                    for _ in range(n)],
                            policy_version=0, texts=self.texts)


def test_evaluate_passes_truncation_to_the_reward(micro_policy):
    from opo.config import PromptConfig
    from opo.evaluation import evaluate
    from opo.rewards import RewardScorer

    _, tokenizer = micro_policy
    examples = [{"question": "1+1=", "answer": "2", "meta": {}}]
    engine = _FixedEngine(["2", r"\boxed{2}", "2", "3", "2"], ["stop", "length", "stop", "stop", "length"])
    prompt = PromptConfig(template="plain")
    for policy, pass1, maj in [("score", 0.6, 1.0), ("zero", 0.4, 2 / 3)]:
        # Under "score" the truncated box still counts, the truncated bare "2" does not
        # (answer_format=auto); "zero" refuses both. maj@5 takes all five votes: "2" wins with
        # three, judged right 3/3 or 2/3 of the time.
        records = []
        scorer = RewardScorer(kind="exact_match", truncated=policy)
        result = evaluate(engine, tokenizer, examples, scorer, prompt, samples=5, k=[5],
                          on_sample=records.append)
        assert result["pass@1"] == pytest.approx(pass1)
        assert result["maj@5"] == pytest.approx(maj)
        assert result["truncated_rate"] == pytest.approx(0.4)
        assert [r["answer"] for r in records] == ["2", "2", "2", "3", None]

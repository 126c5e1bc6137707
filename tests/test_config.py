import pytest

from opo.config import Config, ConfigError, dump_yaml, field_docs, from_dict, list_presets, load_config


def test_default_preset_is_tiny_opo_on_policy():
    cfg = load_config("tiny")
    assert cfg.preset == "tiny"
    assert cfg.model.path == "tiny"
    assert cfg.algo.estimator == "opo"
    assert cfg.algo.updates_per_batch == 1
    assert cfg.algo.kl_coef == 0.0 and cfg.algo.entropy_coef == 0.0
    assert "tiny" in list_presets()


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["algo.estimator=grpo", "trainer.steps=50", "optim.lr=5e-4",
                               "trainer.progress=false", "data.task_config.max_digits=3"])
    assert cfg.algo.estimator == "grpo"
    assert cfg.trainer.steps == 50
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.trainer.progress is False
    assert cfg.data.task_config == {"min_digits": 2, "max_digits": 3}


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("trainer:\n  steps: 7\nalgo:\n  estimator: rloo\n")
    cfg = load_config(path, ["trainer.steps=9"])
    assert (cfg.trainer.steps, cfg.algo.estimator, cfg.preset) == (9, "rloo", "my")


@pytest.mark.parametrize("override, expected", [
    ("trainer.stepz=3", "trainer.stepz"),             # unknown key, with a suggestion
    ("trainer.steps=many", "trainer.steps"),          # wrong type
    ("algo.estimator=ppo", "algo.estimator"),         # not registered
    ("algo.loss_agg=sum", "algo.loss_agg"),           # not in the Literal
    ("nonsense.key=1", "nonsense"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("trainer.progress=3", "trainer.progress"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)


def test_errors_list_what_is_allowed():
    with pytest.raises(ConfigError, match="did you mean trainer.steps"):
        load_config("tiny", ["trainer.stepz=3"])
    with pytest.raises(ConfigError, match="'token-mean'"):
        load_config("tiny", ["algo.loss_agg=sum"])
    with pytest.raises(ConfigError, match="grpo"):
        load_config("tiny", ["algo.estimator=ppo"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_round_trip():
    cfg = load_config("tiny", ["algo.estimator=dr_grpo", "eval.k=[1, 2]", "eval.samples=2"])
    import yaml
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_every_field_is_documented():
    rows = field_docs(Config())
    assert len(rows) > 40
    undocumented = [key for key, text, _ in rows if not text.strip()]
    assert undocumented == []


from hypothesis import given, settings, strategies as st  # noqa: E402

KEYS = [key for key, _, _ in field_docs()] + ["trainer.nope", "algo", "x.y.z", ""]
VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(),
                   st.text(max_size=12), st.just("[1, 2]"), st.just("{a: 1}"), st.just("null"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_fuzzed_overrides_give_a_config_or_a_config_error(pairs):
    """Whatever the overrides, parsing ends in a valid Config or a ConfigError, nothing else."""
    try:
        cfg = load_config("tiny", [f"{k}={v}" for k, v in pairs])
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("key", ["algo.micro_batch_size", "rollout.batch_size", "eval.batch_size",
                                 "algo.max_tokens_per_micro_batch", "metrics.kl_probe_size",
                                 "rollout.top_k", "checkpoint.every"])
def test_negative_sizes_and_counts_are_config_errors(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [f"{key}=-1"])


def test_fields_list_allowed_values_and_version(capsys):
    from opo.cli import main

    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "optim.schedule = 'constant'    [one of 'constant', 'cosine', 'linear']" in out
    assert "model.dtype" in out and "'bfloat16'" in out and "algo.loss_agg" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("opo ")

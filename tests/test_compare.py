import json
import math

import pytest
import yaml

from opo import compare
from opo.cli import main


def fake_run(root, name, estimator, seed, accs, updates=1, step0_row=False, entropy=1.0,
             summary_extra=None):
    """A run folder like `opo train` writes: eval every 2 steps, `accs` at steps 0, 2, 4..."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"algo": {"estimator": estimator, "updates_per_batch": updates}, "trainer": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 0, "eval_accuracy": accs[0]}] if step0_row else []
    steps = 2 * (len(accs) - 1)
    for step in range(1, steps + 1):
        row = {"step": step, "reward_mean": 0.1 * step, "entropy": entropy - 0.01 * step,
               "kl_to_init": 0.01 * step, "response_length_mean": 10 + step,
               "repetition_rate": 0.001 * step, "seconds": 0.5}
        if step % 2 == 0:
            row["eval_accuracy"] = accs[step // 2]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"initial_accuracy": accs[0], "final_accuracy": accs[-1], "steps": steps,
               "wall_seconds": 12.0 + seed, "estimator": estimator, **(summary_extra or {})}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    for seed, (a, b) in enumerate([(0.5, 0.6), (0.6, 0.6), (0.7, 0.9)]):
        fake_run(root, f"opo-{seed}", "opo", seed, [0.3, a, a], step0_row=seed == 0)
        fake_run(root, f"grpo-{seed}", "grpo", seed, [0.3, b, b], entropy=1.2)
    fake_run(root, "off-0", "grpo", 0, [0.3, 0.4, 0.5], updates=4)
    return root


def test_step0_row_or_summary_give_the_same_curve(tmp_path):
    a = compare.load_run(fake_run(tmp_path, "a", "opo", 0, [0.2, 0.4, 0.8], step0_row=True))
    b = compare.load_run(fake_run(tmp_path, "b", "opo", 0, [0.2, 0.4, 0.8]))
    assert a.accuracy_curve == b.accuracy_curve == [(0, 0.2), (2, 0.4), (4, 0.8)]
    # trapezoids: (0.3*2 + 0.6*2) / 4
    assert compare.curve_auc(a.accuracy_curve) == pytest.approx(0.45)
    figures = compare.run_figures(a)
    assert figures["final_accuracy"] == 0.8 and figures["initial_accuracy"] == 0.2
    assert figures["kl_to_init"] == pytest.approx(0.04)        # the last step's
    assert figures["entropy"] == pytest.approx(1.0 - 0.04)     # mean over the last tenth (1 row)


def test_table_pairs_by_seed(grid):
    runs = [compare.load_run(d) for d in compare.find_runs([grid])]
    table = compare.build_table(runs)
    by = {row["variant"]: row for row in table["variants"]}
    assert [row["variant"] for row in table["variants"]] == ["opo", "grpo", "grpo_offpolicy"]
    assert by["opo"]["final_accuracy"]["mean"] == pytest.approx(0.6)
    assert by["opo"]["final_accuracy"]["std"] == pytest.approx(0.1)
    diff = by["grpo"]["final_accuracy_vs_reference"]
    # grpo - opo by seed: +0.1, 0.0, +0.2 -> mean 0.1, sample std 0.1, SE 0.1/sqrt(3)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.1)
    assert diff["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert diff["ci95"][0] <= 0.1 <= diff["ci95"][1]
    # entropy: opo runs 1.0 - 0.01 step, grpo 1.2 - 0.01 step: paired difference 0.2, SE 0
    assert by["grpo"]["paired_vs_reference"]["entropy"]["mean"] == pytest.approx(0.2)
    assert by["grpo"]["paired_vs_reference"]["entropy"]["se"] == pytest.approx(0.0, abs=1e-12)
    assert by["grpo"]["paired_vs_reference"]["wall_seconds"]["mean"] == pytest.approx(0.0)
    off = by["grpo_offpolicy"]["final_accuracy_vs_reference"]
    assert off["n"] == 1 and off["mean"] == pytest.approx(0.5 - 0.5) and math.isnan(off["se"])
    text = compare.format_table(table)
    assert "Δ final acc vs opo" in text and "grpo_offpolicy" in text


def test_paired_difference_ignores_unpaired_seeds():
    d = compare.paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 7: 0.0})
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(0.75)


def test_duplicate_seed_is_an_error(tmp_path):
    fake_run(tmp_path, "a", "opo", 0, [0.1, 0.2])
    fake_run(tmp_path, "b", "opo", 0, [0.1, 0.3])
    runs = [compare.load_run(d) for d in compare.find_runs([tmp_path])]
    with pytest.raises(compare.CompareError, match="several runs with seed"):
        compare.build_table(runs)


def test_bad_run_folders_name_the_file(tmp_path):
    d = fake_run(tmp_path, "a", "opo", 0, [0.1, 0.2])
    (d / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(compare.CompareError, match=r"metrics.jsonl: line 2"):
        compare.load_run(d)
    (d / "summary.json").unlink()
    with pytest.raises(compare.CompareError, match="no summary.json"):
        compare.load_run(d)
    with pytest.raises(compare.CompareError, match="no run folders"):
        compare.find_runs([tmp_path / "a"])


def test_report_is_self_contained(grid, tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"model": "tiny", "pass@1": 0.3, "pass@4": 0.6, "pass@16": 0.8,
                                "maj@1": 0.3, "maj@4": 0.35, "maj@16": 0.4}))
    trained = tmp_path / "trained.json"
    trained.write_text(json.dumps({"model": "/data/grid/runs/opo-seed0/final", "pass@1": 0.7, "pass@4": 0.75,
                                   "pass@16": 0.8, "maj@1": 0.7, "maj@4": 0.72, "maj@16": 0.75}))
    out = tmp_path / "report"
    rc = main(["compare", "--runs", str(grid), "--passk", str(base), str(trained), "--out", str(out)])
    assert rc == 0
    page = (out / "report.html").read_text()
    for png in ("eval_accuracy", "entropy", "kl_to_init", "response_length_mean", "reward_mean", "passk"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count(str(grid)) == 7  # the runs table lists every run folder
    assert "Paired differences from opo" in page
    table = json.loads((out / "table.json").read_text())
    assert {v["variant"] for v in table["variants"]} == {"opo", "grpo", "grpo_offpolicy"}
    assert table["passk"][0]["k"] == [1, 4, 16] and table["passk"][1]["label"] == "opo-seed0/final"
    assert "grpo_offpolicy" in capsys.readouterr().out


def test_passk_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"accuracy": 0.3}))
    with pytest.raises(compare.CompareError, match="no pass@K fields"):
        compare.load_passk(bad)
    assert main(["compare", "--passk", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2


def test_missing_matplotlib_is_a_clear_error(grid, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["compare", "--runs", str(grid), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'opo[evidence]'" in capsys.readouterr().err


def test_grid_plan_and_commands(tmp_path):
    jobs = compare.plan_grid(tmp_path, [0, 1], compare.select_variants("opo,grpo_offpolicy"))
    assert [(j.variant.name, j.seed) for j in jobs] == [("opo", 0), ("opo", 1),
                                                        ("grpo_offpolicy", 0), ("grpo_offpolicy", 1)]
    cmd = jobs[3].command("tiny", ["trainer.steps=5"], threads=1)
    assert cmd[-9:] == ["tiny", "trainer.steps=5", "algo.estimator=grpo", "algo.updates_per_batch=4",
                        "algo.clip_eps=0.2", f"run.dir={jobs[3].run_dir}", "trainer.seed=1",
                        "trainer.threads=1", "trainer.progress=false"][-9:]
    (jobs[0].run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    assert jobs[0].command("tiny", [], 1)[-2:] == ["--resume", str(jobs[0].run_dir)]
    with pytest.raises(compare.CompareError, match="unknown variant 'ppo'"):
        compare.select_variants("opo,ppo")
    names = {v.name for v in compare.DEFAULT_GRID}
    assert {"opo", "grpo", "grpo_offpolicy", "dr_grpo", "rloo", "opo_exact", "opo_proxy"} == names


def test_precision_and_distill_grid_names_match_the_runs_they_produce():
    # A run is grouped by the name variant_name derives from its resolved config, so each
    # precision variant's overrides must produce exactly its own name (else the table would
    # split or merge variants).
    from opo.config import load_config, to_dict

    for variant in compare.PRECISION_GRID:
        cfg = to_dict(load_config("tiny", list(variant.overrides)))
        assert compare.variant_name(cfg) == variant.name
    assert compare.variant_name({"algo": {"estimator": "grpo", "updates_per_batch": 2,
                                          "rollout_correction": "sequence-mask"},
                                 "model": {"dtype": "float16"}}) == "grpo_offpolicy_u2_fp16_sequence-mask"
    for variant in compare.DISTILL_GRID:
        cfg = to_dict(load_config("tiny", ["algo.teacher=tiny", *variant.overrides]))
        assert compare.variant_name(cfg) == variant.name
    chosen = compare.select_variants("opo,opo_bf16_token-tis", "precision")
    assert [v.name for v in chosen] == ["opo", "opo_bf16_token-tis"]
    with pytest.raises(compare.CompareError, match="unknown variant 'grpo' in the precision grid"):
        compare.select_variants("grpo", "precision")
    with pytest.raises(compare.CompareError, match="unknown grid 'speed'"):
        compare.select_variants("", "speed")


def test_grid_runs_real_trainings_and_resumes(micro_model_dir, tmp_path, capsys):
    from conftest import micro_overrides

    out = tmp_path / "grid"
    # Two one-seed runs of two steps at once: the cost is mostly two interpreters starting.
    overrides = [o for o in micro_overrides(micro_model_dir, "x", **{"trainer.steps": 2,
                 "trainer.eval_every": 1, "metrics.kl_probe_size": 4})
                 if not o.startswith(("run.dir", "trainer.threads"))]
    args = ["compare", *overrides, "--seeds", "1", "--jobs", "2", "--variants", "opo,dr_grpo", "--out", str(out)]
    assert main(args) == 0
    table = json.loads((out / "table.json").read_text())
    assert [v["variant"] for v in table["variants"]] == ["opo", "dr_grpo"]
    assert all(r["steps"] == 2 for r in table["runs"])
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing runs again
    assert "skipping 2 finished run(s)" in capsys.readouterr().out

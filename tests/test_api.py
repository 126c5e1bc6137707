"""The Python API the README shows: load_config, train, evaluate, compute_advantages."""

import json
import subprocess
import sys

import torch

import opo
from conftest import micro_overrides


def test_importing_opo_does_not_import_torch():
    code = "import sys, opo; assert 'torch' not in sys.modules; print(opo.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == opo.__version__


def test_train_then_evaluate_from_python(micro_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = opo.load_config("tiny", micro_overrides(micro_model_dir, run, **{"trainer.steps": 2}))
    summary = opo.train(cfg, log=lambda *a: None)
    assert summary["steps"] == 2 and json.loads((run / "summary.json").read_text())["steps"] == 2

    samples = tmp_path / "samples.jsonl"
    result = opo.evaluate(str(run / "final"), task="toy_addition", samples=2, k=[1, 2], limit=5,
                          max_new_tokens=8, samples_out=str(samples))
    assert result["problems"] == 5 and 0 <= result["pass@1"] <= result["pass@2"] <= 1
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 10 and {"prompt", "response", "answer", "gold", "reward"} <= records[0].keys()

    more = opo.train(str(run), ["trainer.steps=3"], resume=True, log=lambda *a: None)
    assert more["steps"] == 3


def test_compute_advantages_is_exported():
    adv = opo.compute_advantages("opo", torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0]),
                                 torch.tensor([0, 0]))
    assert torch.allclose(adv, torch.tensor([0.75, -0.25]))

"""On-policy distillation: the per-token reverse-KL advantage, its gradient, and `opo train
algo.teacher=...` on micro models built here."""

import json

import pytest
import torch
from conftest import micro_overrides

from opo.distill import reverse_kl_advantage, reverse_kl_sum, same_tokenizer, token_advantages
from opo.loss import policy_loss


def test_reverse_kl_advantage_by_hand():
    student = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    teacher = torch.tensor([[-0.5, -2.5, -0.5], [-1.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = reverse_kl_advantage(student, teacher, mask, coef=2.0)
    assert torch.equal(adv, torch.tensor([[1.0, -1.0, 0.0], [4.0, 0.0, 0.0]]))
    # Σ (s − q) over the masked tokens: -0.5 + 0.5 + 0 − 2 = −2.
    assert reverse_kl_sum(student, teacher, mask) == pytest.approx(-2.0)
    combined = token_advantages(torch.tensor([0.5, -1.0]), adv, reward_coef=0.5)
    assert torch.equal(combined, torch.tensor([[1.25, -0.75, 0.25], [3.5, -0.5, -0.5]]))
    assert torch.equal(token_advantages(torch.tensor([0.5, -1.0]), None, 2.0), torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="one shape"):
        reverse_kl_advantage(student, teacher[:, :2], mask)


def test_policy_loss_takes_per_token_advantages():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0], [2.0, 5.0]])
    loss, _ = policy_loss(logp, None, adv, mask, agg="token-mean", total_tokens=3.0, total_seqs=2.0)
    loss.backward()
    # d/dlogp of −Σ A·ratio / 3, ratio = exp(logp − sg(logp)): −A/3 on the mask.
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, 1 / 3], [-2 / 3, 0.0]]))
    with pytest.raises(ValueError, match=r"\[B\] or \[B,T\]"):
        policy_loss(logp, None, adv[:, :1], mask, agg="token-mean", total_tokens=3.0, total_seqs=2.0)


def test_the_distillation_gradient_is_the_reverse_kl_gradient():
    # One-token responses from a softmax over 6 tokens: with samples from the student, the
    # loss's gradient must estimate ∇ KL(student ‖ teacher), computed here exactly.
    torch.manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6, dtype=torch.float64), -1)
    student = torch.log_softmax(logits, -1)
    kl = (student.exp() * (student - teacher)).sum()
    (exact,) = torch.autograd.grad(kl, logits)

    n = 400_000
    tokens = torch.multinomial(student.detach().exp(), n, replacement=True)
    logp = torch.log_softmax(logits, -1)[tokens].unsqueeze(-1)  # [n, 1]
    mask = torch.ones(n, 1, dtype=torch.float64)
    adv = reverse_kl_advantage(logp, teacher[tokens].unsqueeze(-1), mask)
    loss, _ = policy_loss(logp, None, adv.double(), mask, agg="token-mean", total_tokens=float(n),
                          total_seqs=float(n))
    (estimate,) = torch.autograd.grad(loss, logits)
    # Minimising the loss follows −∇KL: its gradient estimates +∇KL (Monte-Carlo error ~1/√n).
    assert torch.allclose(estimate, exact, atol=0.01), (estimate, exact)
    assert exact.abs().max() > 0.05  # the check is not trivially met by zeros


def test_same_tokenizer_names_what_differs(micro_policy):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, tok = micro_policy
    assert same_tokenizer(tok, tok) is None
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", *"abcdefghij"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>",
                                    unk_token="<unk>")
    assert "vocabularies differ" in same_tokenizer(tok, other)


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in x]


def test_a_teacher_equal_to_the_student_gives_no_gradient(micro_model_dir, tmp_path):
    # Distillation alone from the start model itself: every token's advantage is exactly
    # 0 in fp32, so the weights must not move and the reverse KL stays 0.
    from opo.cli import main

    run = tmp_path / "self"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 2, "algo.teacher": str(micro_model_dir), "algo.reward_coef": 0,
        "optim.grad_clip": 0})]) == 0
    rows = _rows(run)
    assert [r["teacher_kl"] for r in rows] == [0.0, 0.0]
    assert all(r["grad_norm"] == 0.0 for r in rows)


def test_distillation_alone_moves_the_student_towards_the_teacher(micro_model_dir, tmp_path):
    from opo.cli import main

    # The shipped `tiny` model: larger, trained, and with the micro model's tokenizer.
    run = tmp_path / "distil"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{
        "trainer.steps": 120, "trainer.eval_every": 0, "algo.teacher": "tiny",
        "algo.reward_coef": 0, "optim.lr": 1e-2})]) == 0
    kls = [r["teacher_kl"] for r in _rows(run)]
    assert all(k is not None for k in kls)
    # The student (30k parameters) is far smaller than the teacher, so the KL falls slowly and
    # noisily: ~7 nats/token at the start; the mean of the last 5 steps over the first 5 was
    # 0.64-0.80 after 120 steps for trainer seeds 0-3, but 0.76-0.99 after 60 steps (Xeon).
    first, last = sum(kls[:5]) / 5, sum(kls[-5:]) / 5
    assert first > 1.0 and last < 0.85 * first, kls


def test_a_teacher_at_coefficient_0_only_monitors(micro_model_dir, tmp_path):
    # RL alone, and RL with the teacher at distill_coef 0: the same updates, bit for bit;
    # only the second run measures its KL to the teacher.
    from safetensors.torch import load_file

    from opo.cli import main

    runs = {name: tmp_path / name for name in ("rl", "monitored")}
    assert main(["train", *micro_overrides(micro_model_dir, runs["rl"], **{"trainer.steps": 2})]) == 0
    assert main(["train", *micro_overrides(micro_model_dir, runs["monitored"], **{
        "trainer.steps": 2, "algo.teacher": "tiny", "algo.distill_coef": 0})]) == 0
    assert [r["teacher_kl"] for r in _rows(runs["rl"])] == [None, None]
    assert all(r["teacher_kl"] > 0.1 for r in _rows(runs["monitored"]))
    a, b = (load_file(str(runs[n] / "final" / "model.safetensors")) for n in ("rl", "monitored"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(runs["rl"])] == [r["loss"] for r in _rows(runs["monitored"])]


def test_a_teacher_with_another_tokenizer_is_refused(micro_model_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from opo.cli import main

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", *"0123456789+=,>x"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    other = tmp_path / "other"
    model.save_pretrained(other, safe_serialization=True)
    tok.save_pretrained(other)
    run = tmp_path / "run"
    assert main(["train", *micro_overrides(micro_model_dir, run, **{"algo.teacher": str(other)})]) == 2
    err = capsys.readouterr().err
    assert "algo.teacher" in err and "tokenizer" in err and "vocabularies differ" in err
    assert "Traceback" not in err


def test_distillation_settings_are_checked():
    from opo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algo.reward_coef.*algo.teacher"):
        load_config("tiny", ["algo.reward_coef=0"])
    with pytest.raises(ConfigError, match="algo.distill_coef"):
        load_config("tiny", ["algo.distill_coef=-1"])
    assert load_config("tiny", ["algo.teacher=tiny", "algo.reward_coef=0"]).algo.teacher == "tiny"

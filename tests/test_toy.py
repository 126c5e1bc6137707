import torch
from safetensors.torch import load_file

from opo.tasks import addition as toy
from opo.rewards import exact_match


def test_worked_answers_and_the_carry_slip():
    assert toy.worked_answer(457, 368) == ("15,12,8>825", "825")
    assert toy.worked_answer(99, 11) == ("10,11>110", "110")
    # The slip forgets every carry and reads the answer off the wrong totals.
    assert toy.worked_answer(457, 368, carry_in=False) == ("15,11,7>715", "715")
    assert toy.worked_answer(12, 34, carry_in=False) == toy.worked_answer(12, 34)


def test_examples_have_equal_width_operands_and_score_with_exact_match():
    examples = toy.make_addition_examples(200, seed=3, min_digits=2, max_digits=4)
    for ex in examples:
        a, b = ex["question"][:-1].split("+")
        assert len(a) == len(b) and 2 <= len(a) <= 4
        assert int(ex["answer"]) == int(a) + int(b)
        assert exact_match(ex["question"], ex["meta"]["worked"], ex) == 1.0
    lengths = {len(ex["meta"]["worked"]) for ex in examples}
    assert len(lengths) > 4  # worked steps make response lengths vary


def test_demonstrations_slip_at_the_given_rate():
    demos = toy.demonstrations(2000, seed=1, slip_rate=0.7)
    slipped = sum(ex["meta"]["worked"].split(">")[1] != ex["answer"] for ex in demos)
    carries = sum(toy.worked_answer(*map(int, ex["question"][:-1].split("+")), carry_in=False)[1]
                  != ex["answer"] for ex in demos)
    assert 0.6 < slipped / carries < 0.8  # only problems with a carry can show the slip


def test_toy_base_is_deterministic(tmp_path):
    a = toy.build_toy_base(tmp_path / "a", iters=3, batch_size=8, log=lambda *x: None)
    b = toy.build_toy_base(tmp_path / "b", iters=3, batch_size=8, log=lambda *x: None)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tokenizer_round_trips_characters():
    tok = toy.build_tokenizer()
    ids = tok("457+368=15,12,8>825", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("457+368=15,12,8>825")
    assert tok.decode(ids) == "457+368=15,12,8>825"
    assert tok.eos_token_id not in ids and tok.pad_token_id != tok.eos_token_id

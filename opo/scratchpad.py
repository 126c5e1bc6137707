"""A built-in task whose responses vary widely in length within a group: addition with
optional working.

The prompt is the toy task's ("457+368="). A response either answers at once, or writes
every column out in full before the answer:

    direct   ">825"                                  (4 tokens + eos)
    worked   "7+8=15,5+6+1=12,4+3+1=8>825"           (27 tokens + eos)

The warm-started model (`python -m opo.scratchpad build`) imitates demonstrations in
which half the answers are direct and half are worked, and both kinds are imperfect the
way a hurried person is: a direct answer is a guess that forgets the carries
`direct_slip` (80%) of the time, and the working forgets to write a carry
`worked_slip` (50%) of the time. A group of 8 samples therefore mixes responses of
about 5 and about 30 tokens, and length goes with correctness: the long ones are
right more often. RL can raise held-out accuracy in two ways, by choosing to work and
by carrying, and the length-weighted OPO baseline differs from the plain group mean
exactly when lengths and rewards vary together, which is what this task is for.
"""

from __future__ import annotations

import random
from pathlib import Path

from opo.toy import make_addition_examples

ASSET_DIR = Path(__file__).parent / "assets" / "scratchpad"
MODEL_NAME = "tiny-scratchpad"  # the preset's model.path; resolves to ASSET_DIR


def digits_sum(a: int, b: int, carry_in: bool = True) -> tuple[list[str], str]:
    """(column steps written out, final answer) for a+b, least significant column first.

    A step reads "x+y=t" or, with a carry from the previous column, "x+y+1=t".
    carry_in=False is the slip: no carry is ever added, and the answer is read off the
    wrong column totals.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
        digits.append(total % 10)
        carry = total // 10 if carry_in else 0
        last = total
    if last >= 10:
        digits.append(last // 10)
    return steps, str(int("".join(map(str, reversed(digits)))))


def response_text(a: int, b: int, worked: bool, carry_in: bool = True) -> str:
    """The response for a+b: ">answer" when not worked, else the column steps then ">answer"."""
    steps, answer = digits_sum(a, b, carry_in)
    return (",".join(steps) if worked else "") + ">" + answer


def make_scratchpad_examples(n: int, seed: int, min_digits: int = 2, max_digits: int = 4) -> list[dict]:
    """n problems `a+b=` (operands of equal width, as in toy_addition); meta holds the worked
    and the direct correct responses."""
    out = []
    for ex in make_addition_examples(n, seed, min_digits, max_digits):
        a, b = map(int, ex["question"][:-1].split("+"))
        out.append({**ex, "meta": {"worked": response_text(a, b, worked=True),
                                   "direct": response_text(a, b, worked=False)}})
    return out


def demonstrations(n: int, seed: int, direct_rate: float = 0.5, direct_slip: float = 0.8,
                   worked_slip: float = 0.5) -> list[dict]:
    """Warm-start demonstrations: `direct_rate` of them answer directly; a direct answer
    forgets the carries with probability `direct_slip`, worked steps with `worked_slip`.
    The text to imitate is in meta["worked"] (the field `toy.build_toy_base` trains on)."""
    rng = random.Random(seed + 11)
    out = []
    for ex in make_addition_examples(n, seed):
        a, b = map(int, ex["question"][:-1].split("+"))
        worked = rng.random() >= direct_rate
        slip = rng.random() < (worked_slip if worked else direct_slip)
        out.append({**ex, "meta": {"worked": response_text(a, b, worked, carry_in=not slip)}})
    return out


def build_scratchpad_base(out_dir: str | Path = ASSET_DIR, iters: int = 800, seed: int = 0,
                          log=print) -> Path:
    """Warm-start the scratchpad model (same architecture and recipe as the tiny model)."""
    from opo.toy import build_toy_base

    examples = demonstrations(iters * 64, seed=seed + 1)
    return build_toy_base(out_dir, iters=iters, batch_size=64, seed=seed, log=log, examples=examples)



def describe_model(path: str | Path, problems: int = 200, groups: int = 64, group_size: int = 8,
                   max_new_tokens: int = 48, seed: int = 1234) -> dict:
    """What a scratchpad model does on held-out problems (data.seed = `seed`): greedy and
    sampled (T = 1) accuracy, the share of direct answers and each format's accuracy, and
    the within-group spread of sampled response lengths (groups of `group_size`)."""
    import torch

    from opo.data import derive_seed
    from opo.models import eos_ids, load_policy
    from opo.rewards import exact_match
    from opo.rollout import SamplingParams, make_engine
    from opo.variance import length_spread

    model, tok = load_policy(str(path), device="cpu")
    model.eval()
    engine = make_engine("hf", model, tok, eos_ids(model, tok), 0)
    examples = make_scratchpad_examples(problems, derive_seed(seed, "held_out"))
    ids = [tok(ex["question"], add_special_tokens=False)["input_ids"] for ex in examples]

    def by_format(batch, exs):
        correct = [exact_match(exs[g]["question"], text, exs[g]) for g, text in zip(batch.group_ids, batch.texts)]
        direct = [not text.split(">")[0] for text in batch.texts]
        n_direct = sum(direct)
        return {"accuracy": sum(correct) / len(correct), "direct_share": n_direct / len(correct),
                "accuracy_direct": sum(c for c, d in zip(correct, direct) if d) / max(n_direct, 1),
                "accuracy_worked": sum(c for c, d in zip(correct, direct) if not d)
                / max(len(correct) - n_direct, 1)}, correct

    torch.manual_seed(0)
    greedy, _ = by_format(engine.generate(ids, SamplingParams(n=1, temperature=0.0,
                                                              max_new_tokens=max_new_tokens)), examples)
    sampled_batch = engine.generate(ids[:groups], SamplingParams(n=group_size, temperature=1.0,
                                                                 max_new_tokens=max_new_tokens))
    sampled, correct = by_format(sampled_batch, examples[:groups])
    lengths = [sampled_batch.lengths[g * group_size:(g + 1) * group_size] for g in range(groups)]
    mixed = sum(0 < sum(correct[g * group_size:(g + 1) * group_size]) < group_size for g in range(groups))
    return {"greedy": greedy, "sampled": {**sampled, "groups_with_mixed_rewards": mixed / groups},
            "length_spread": length_spread(lengths), "problems": problems, "groups": groups,
            "group_size": group_size}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m opo.scratchpad",
                                     description="Build or describe the scratchpad task's model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="rebuild the warm-started weights")
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the shipped weights were built with 1")
    p = sub.add_parser("describe", help="accuracy by format and within-group length spread")
    p.add_argument("--model", default=str(ASSET_DIR))
    p.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.command == "build":
        import torch

        torch.set_num_threads(args.threads)
        print(f"wrote {build_scratchpad_base(args.out, iters=args.iters)}")
        return 0
    result = describe_model(args.model)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

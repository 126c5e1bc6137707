"""A built-in task whose responses vary widely in length within a group: addition with
optional working.

The prompt is the toy task's ("457+368="). A response either answers at once, or writes
every column out in full before the answer:

    direct   ">825"                                  (4 tokens + eos)
    worked   "7+8=15,5+6+1=12,4+3+1=8>825"           (27 tokens + eos)

The warm-started model (`python -m opo.tasks.scratchpad build`) imitates demonstrations in
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

from opo.tasks.addition import build_toy_base, make_addition_examples

ASSET_DIR = Path(__file__).parent.parent / "assets" / "scratchpad"
MODEL_NAME = "tiny-scratchpad"  # the preset's model.path; resolves to ASSET_DIR
REWARD = "exact_match"
PLAIN_MAX_NEW_TOKENS = 48      # room for 4-digit working written in full


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
    examples = demonstrations(iters * 64, seed=seed + 1)
    return build_toy_base(out_dir, iters=iters, batch_size=64, seed=seed, log=log, examples=examples)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="python -m opo.tasks.scratchpad",
                                     description="Rebuild the scratchpad task's warm-started model "
                                     "(`python -m opo.variance scratchpad` describes it).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="rebuild the warm-started weights")
    p.add_argument("--out", default=str(ASSET_DIR))
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the shipped weights were built with 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"wrote {build_scratchpad_base(args.out, iters=args.iters)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

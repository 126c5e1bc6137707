"""`PromptSampler`: the endless, deterministic stream of training-example indices."""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- sampling


class PromptSampler:
    """Endless, deterministic stream of example indices.

    Epoch e visits every index once, in a permutation drawn from a generator seeded
    by (seed, e), so the order depends on nothing but these two numbers: not on the
    global RNG, and not on how the stream was cut into batches. That is what lets a
    resumed run draw exactly the indices an uninterrupted run would have drawn.
    """

    def __init__(self, n_examples: int, seed: int):
        if n_examples < 1:
            raise ValueError(f"PromptSampler needs at least one example, got {n_examples}")
        self.n_examples = n_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None  # the current epoch's permutation, cached

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            # A seed sequence of (seed, epoch) keeps epochs of nearby seeds unrelated,
            # unlike seed + epoch, where seed 0's epoch 1 would be seed 1's epoch 0.
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])
            self._order = rng.permutation(self.n_examples).tolist()
        return self._order

    def next_batch(self, batch_size: int) -> list[int]:
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        batch: list[int] = []
        while len(batch) < batch_size:
            order = self._epoch_order()
            take = min(batch_size - len(batch), self.n_examples - self.position)
            batch.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == self.n_examples:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_examples:
            raise ValueError(f"sampler state {state!r} does not fit {self.n_examples} examples")
        self.epoch, self.position, self._order = epoch, position, None
        if position == self.n_examples:  # normalise a state saved exactly at an epoch's end
            self.epoch, self.position = epoch + 1, 0

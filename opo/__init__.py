"""opo: on-policy RL with the optimal reward baseline."""

__version__ = "0.1.0"

"""reward.kind checked against the reward registry when a config is built (opo.config runs it).

Kept out of the package's ``__init__`` on purpose: it needs the config schema (and so
PyYAML), while a reward worker process imports only the standard library.
"""

from __future__ import annotations

import difflib

from opo.rewards.kinds import REWARDS, load_user_reward
from opo.schema import Config, ConfigError


def check_config(cfg: Config) -> None:
    """reward.kind is a built-in kind, or a `module:function` that imports now (before any
    model loads)."""
    kind = cfg.reward.kind
    if ":" in kind:
        try:
            load_user_reward(kind)
        except ValueError as exc:
            raise ConfigError(f"reward.kind: {exc}") from None
    elif kind not in REWARDS:
        close = difflib.get_close_matches(kind, sorted(REWARDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"reward.kind: {kind!r} is not a reward kind; {hint}use one of "
                          + ", ".join(sorted(REWARDS)) + ", or module:function for your own")

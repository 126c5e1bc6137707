"""Training and held-out problems, prompt formatting, and the prompt sampler.

    base.py      the example type, `DataError`, derived seeds, the deterministic split
    sources.py   the `SOURCES` registry, the built-in sources, `load_examples`
    files.py     .jsonl / .json / .parquet files and `datasets.save_to_disk` folders
    prompts.py   prompt templates (`format_prompt`, `encode_prompts`)
    sampler.py   `PromptSampler`, the resumable stream of training indices

An *example* is a plain dict ``{"question": str, "answer": str, "meta": dict}``; ``meta`` is
always JSON-serialisable. Adding a source is one function ``f(cfg) -> (train, held_out)``
plus ``@source("name")``.
"""

from opo.data.base import AUTO_EVAL_FRACTION, DEFAULT_EVAL_SIZE, DataError, Example, Split, derive_seed, held_out_size
from opo.data.files import FILE_FORMATS
from opo.data.prompts import encode_prompts, format_prompt, uses_chat_template
from opo.data.sampler import PromptSampler
from opo.data.sources import (SOURCE_DEFAULTS, SOURCES, SourceDefaults, check_config, check_task, load_examples, load_split, source,
                              source_defaults, unknown_source_message)

__all__ = ["DataError", "Example", "Split", "SOURCES", "SOURCE_DEFAULTS", "SourceDefaults", "FILE_FORMATS",
           "DEFAULT_EVAL_SIZE", "AUTO_EVAL_FRACTION", "source", "source_defaults", "load_examples", "load_split",
           "held_out_size", "unknown_source_message", "check_config", "check_task", "derive_seed", "format_prompt", "encode_prompts",
           "uses_chat_template", "PromptSampler"]

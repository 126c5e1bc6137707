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

from opo.data.base import DataError, Example, derive_seed
from opo.data.files import FILE_FORMATS
from opo.data.prompts import encode_prompts, format_prompt
from opo.data.sampler import PromptSampler
from opo.data.sources import SOURCES, load_examples, source

__all__ = ["DataError", "Example", "SOURCES", "FILE_FORMATS", "source", "load_examples", "derive_seed",
           "format_prompt", "encode_prompts", "PromptSampler"]

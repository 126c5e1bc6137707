"""Prompt templates: the text the policy sees for a question, and its token ids."""

from __future__ import annotations

from typing import Any

from opo.schema import PromptConfig
from opo.data.base import DataError

# --------------------------------------------------------------------------- prompts


def uses_chat_template(tokenizer: Any, cfg: PromptConfig) -> bool:
    """Whether prompts for this tokenizer go through its chat template under `cfg`."""
    return cfg.template == "chat" or (cfg.template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def format_prompt(tokenizer: Any, question: str, cfg: PromptConfig) -> str:
    """The text the policy sees for `question`, ending where the response starts."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    template = cfg.template
    if template == "auto":
        template = "chat" if has_template else "plain"
    if template == "chat":
        if not has_template:
            raise DataError("prompt.template=chat, but this tokenizer has no chat template; "
                            "use prompt.template=plain (or auto)")
        return _chat_prompt(tokenizer, question, cfg)
    if template == "plain":
        return _plain_prompt(question, cfg)
    raise DataError(f"prompt.template: {template!r} is not allowed; use auto, chat or plain")


def encode_prompts(tokenizer: Any, questions: list[str], cfg: PromptConfig) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids. Chat templates already carry their own special
    tokens; plain prompts get the tokenizer's usual ones (a base model's BOS, say)."""
    texts = [format_prompt(tokenizer, q, cfg) for q in questions]
    ids = tokenizer(texts, add_special_tokens=not uses_chat_template(tokenizer, cfg))["input_ids"]
    return texts, [list(row) for row in ids]


def _chat_prompt(tokenizer: Any, question: str, cfg: PromptConfig) -> str:
    user = question + ("\n\n" + cfg.instruction if cfg.instruction else "")
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _plain_prompt(question: str, cfg: PromptConfig) -> str:
    instruction = "\n" + cfg.instruction if cfg.instruction else ""
    try:
        return cfg.plain_format.format(question=question, instruction=instruction)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"prompt.plain_format {cfg.plain_format!r} is not a valid format: "
                        f"only {{question}} and {{instruction}} may appear ({exc!r}); "
                        f"write literal braces as {{{{ and }}}}") from None

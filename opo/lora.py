"""LoRA adapters through peft (`pip install 'opo[lora]'`).

The adapters are injected *in place* into the transformers model (peft's
`inject_adapter_in_model`), so the trainer, the scorer and every engine keep calling the
very same module class they call without LoRA: `fast` and `hf` sample through the
adapters, and the loss differentiates them. Only the adapter weights train; the base
weights are frozen and stay bit-identical to `model.path`.

Saving:
- checkpoints hold the trainable (adapter) weights and their optimiser state; on resume
  the base comes from `model.path` again (see `opo.checkpoint`), plus an `adapter/`
  folder in peft's format;
- `final/` holds, with `model.lora.merge_on_save=true`, a plain model whose weights are
  base + (alpha / r) B A (`from_pretrained` loads it like any model), or else the adapter
  folder (adapter_config.json + adapter_model.safetensors), which
  `peft.PeftModel.from_pretrained(base_model, folder)` puts on top of `model.path`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from opo.models import ModelError

ADAPTER = "default"           # peft's name for the single adapter we train
PEFT_PREFIX = "base_model.model."  # how peft's own adapter files name the wrapped model's keys


class LoraError(ModelError):
    """LoRA cannot be set up; the message says what to do (the CLI prints it without a traceback)."""


def available() -> bool:
    return importlib.util.find_spec("peft") is not None


def is_lora(model: torch.nn.Module) -> bool:
    """True when `model` carries peft adapters (injected by `attach`)."""
    return bool(getattr(model, "peft_config", None))


def attach(model: torch.nn.Module, r: int, alpha: float, target_modules: list[str]) -> torch.nn.Module:
    """Inject rank-`r` LoRA adapters into `target_modules` of `model` in place; freeze the rest.

    Dropout is 0: the sampler and the scorer must compute the same function (see
    opo.models.disable_dropout). B starts at zero, so the adapted model starts as the base.
    """
    if not available():
        raise LoraError("model.lora.r > 0 needs peft; run: pip install 'opo[lora]'  (or: pip install peft)")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    config.base_model_name_or_path = getattr(model, "name_or_path", None)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise LoraError(f"model.lora.target_modules={list(target_modules)} matches no layer of this model "
                        f"({exc}); its linear layers are named: {', '.join(names)}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, named as peft's own adapter files name them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: torch.nn.Module, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors: a folder peft.PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(str(folder))
    save_file(adapter_state_dict(model), str(folder / "adapter_model.safetensors"))


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in: W + (alpha / r) B A.

    Computed into a new dict; the live model (its adapters and frozen base) is untouched.
    """
    from peft.tuners.lora import LoraLayer

    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
              for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}
    merged = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    return merged


def save_final(model: torch.nn.Module, folder: Path, merge: bool) -> None:
    """The model part of `final/`: merged weights (a plain HF folder) or the adapter folder."""
    if merge:
        model.save_pretrained(folder, state_dict=merged_state_dict(model), safe_serialization=True)
        model.generation_config.save_pretrained(folder)
    else:
        save_adapter(model, folder)


__all__ = ["LoraError", "adapter_state_dict", "attach", "available", "is_lora", "merged_state_dict",
           "save_adapter", "save_final"]

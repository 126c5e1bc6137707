"""vLLM as the rollout engine (`rollout.engine=vllm`, `pip install 'opo[vllm]'`, CUDA only).

NOT RUN YET: written against vLLM's documented API (0.10.2 and later) on machines
without a GPU; no test of it has run. The trainer's checks (policy version, log-prob
mismatch against the trainer's own scoring) apply to it exactly as to `fast` and `hf`,
so a first GPU run tells at step 1 whether it samples the policy being trained.

How it sits in the run:
- Colocated: the engine lives in the trainer's process and GPU (vLLM's engine core is
  kept in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0), so new weights are handed over
  as tensors, not files. Under torchrun every rank builds its own engine
  (`distributed_executor_backend="external_launcher"`, tensor parallel size 1) and
  samples its own prompt groups.
- Weights: after every optimiser step `sync_weights` streams the policy's parameters
  (merged, for LoRA) in vLLM's dtype into the engine's model with its `load_weights`,
  then drops the prefix cache, whose keys and values belong to the old weights.
- Memory: with `rollout.vllm.sleep_mode` (vLLM's `enable_sleep_mode`) the engine sleeps
  at level 1 (weights to CPU, KV cache freed) while the trainer computes gradients,
  and wakes for the weight push and the next rollout.
- Distribution: `logprobs_mode="processed_logprobs"` makes vLLM report each sampled
  token's log-probability under the distribution it was drawn from (after temperature,
  top-k and top-p); its default, `raw_logprobs`, would describe the untempered model.
  `generation_config="vllm"` stops vLLM from taking sampling defaults from the model
  folder, and every penalty is set to neutral, as for the other engines.
- The trainer's autocast is switched off around vLLM calls: vLLM runs its own kernels in
  its own dtype (`model.dtype`, so sampler and trainer compute in the same precision).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from opo.models import ModelError
from opo.rollout.base import RolloutBatch, SamplingParams

PIP_LINE = "pip install 'opo[vllm]'"


class VLLMUnavailable(ModelError):
    """vLLM cannot run here or misbehaved; the message says why (not installed, no CUDA GPU...)."""


def unavailable_reason() -> str | None:
    """Why the vLLM engine cannot run on this machine, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed ({PIP_LINE}; it needs a CUDA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: vLLM cannot run on a CPU-only machine"
    return None


class VLLMEngine:
    def __init__(self, model, tokenizer, eos_ids: list[int], batch_size: int = 0, *,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.4, sleep_mode: bool = True,
                 max_model_len: int = 0, enforce_eager: bool = False, seed: int = 0):
        reason = unavailable_reason()
        if reason:
            raise VLLMUnavailable(f"rollout.engine=vllm: {reason}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
        from vllm import LLM

        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.batch_size = batch_size
        self.dtype = getattr(torch, dtype)
        self.policy_version = 0
        self.sleep_mode = sleep_mode
        kwargs = dict(model=model.name_or_path, tokenizer=model.name_or_path, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode,
                      logprobs_mode="processed_logprobs", generation_config="vllm",
                      enforce_eager=enforce_eager, seed=seed, tensor_parallel_size=1)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank
        self.llm = LLM(**kwargs)
        self._sleeping: set[str] = set()  # the parts vLLM has released: "weights", "kv_cache"
        self._sleep()

    # ---- phases

    def _sleep(self) -> None:
        if self.sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)  # level 1: weights kept in CPU memory, KV cache dropped
            self._sleeping = {"weights", "kv_cache"}

    def _wake(self, parts: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        todo = [p for p in parts if p in self._sleeping]  # never wake a part twice
        if todo:
            torch.cuda.empty_cache()  # hand torch's cached (freed) activation memory back first
            self.llm.wake_up(tags=todo)
            self._sleeping -= set(todo)

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Push the policy's current weights into vLLM; the engine then samples `version`."""
        with torch.autocast("cuda", enabled=False), torch.no_grad():
            self._wake(("weights",))  # weights only: the KV cache is allocated for generation
            target = self._engine_model()
            target.load_weights(self._named_tensors(model))
            self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights
        self.policy_version = version

    def _named_tensors(self, model):
        """(name, tensor) pairs with Hugging Face names, on the GPU in vLLM's dtype."""
        from opo import lora

        state = lora.merged_state_dict(model) if lora.is_lora(model) else model.state_dict()
        for name, tensor in state.items():
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole tensor
                tensor = tensor.full_tensor()
            yield name, tensor.detach().to("cuda", self.dtype)

    def _engine_model(self):
        """The torch module vLLM runs, reachable because its engine core is in this process."""
        paths = ("llm_engine.model_executor.driver_worker.worker.model_runner.model",
                 "llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model")
        for path in paths:
            obj = self.llm
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise VLLMUnavailable("could not reach the model inside this vLLM version's in-process engine "
                              f"(tried {', '.join(paths)}); weights cannot be pushed")

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        from vllm import SamplingParams as VSamplingParams

        greedy = params.temperature <= 0
        # One seed per call drawn from torch's generator: runs with one seed sample alike.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        sampling = VSamplingParams(
            n=params.n, temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p, top_k=-1 if greedy or params.top_k <= 0 else params.top_k,
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            min_tokens=0, max_tokens=params.max_new_tokens, stop_token_ids=self.eos_ids,
            logprobs=0, seed=seed, skip_special_tokens=True)
        with torch.autocast("cuda", enabled=False):
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

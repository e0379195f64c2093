"""Which models the lean forward (:mod:`offpolicy.rollout.lean`) covers, and what ``model.forward_impl=auto``
picks, from a model's ``config.json`` alone: the config is resolved when it is read, before torch is imported."""

from __future__ import annotations

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

# model.forward_impl=auto picks the lean forward on a CPU up to this hidden size: measured 1.10-1.34x faster than
# transformers' sdpa path at hidden 64-256 on the demo's shapes, about even with 256-token prompts, and no faster at
# hidden 512-1024
# (benchmarks/forward_impl.py, docs/benchmarks.md). Not on a GPU, where it is not measured.
AUTO_MAX_HIDDEN = 256


def unsupported_config(cfg: dict) -> str | None:
    """Why a model with this ``config.json`` content cannot run the lean forward (None: it can)."""
    name = (cfg.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        return f"{name} is not one of {', '.join(ARCHITECTURES)}"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act={cfg['hidden_act']!r} (only silu)"
    if cfg.get("use_sliding_window") or (cfg.get("sliding_window") and name == "MistralForCausalLM"):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (cfg.get("layer_types") or ())):
        return f"layer types {sorted(set(cfg['layer_types']))} (only full_attention)"
    if cfg.get("attention_dropout"):
        return f"attention_dropout={cfg['attention_dropout']} (dropout is not applied)"
    if cfg.get("pretraining_tp", 1) != 1:
        return f"pretraining_tp={cfg['pretraining_tp']}"
    return None


def auto_choice(cfg: dict, *, device: str, clash: str | None = None) -> str:
    """What ``model.forward_impl=auto`` runs for a model with this ``config.json`` content on ``device``: 'lean'
    for a supported architecture of hidden size <= :data:`AUTO_MAX_HIDDEN` on a CPU when no setting ``clash``-es
    with it (LoRA, gradient checkpointing, ...), else 'transformers'."""
    small = (cfg.get("hidden_size") or AUTO_MAX_HIDDEN + 1) <= AUTO_MAX_HIDDEN
    ok = clash is None and device == "cpu" and small and unsupported_config(cfg) is None
    return "lean" if ok else "transformers"

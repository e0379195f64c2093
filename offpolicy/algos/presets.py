"""Named algorithm presets: an advantage estimator, a per-token policy loss and an aggregation.

``PRESETS[name]`` is a :class:`Preset`; :func:`resolve_preset` binds it (with overrides) into the three
callables the trainer uses. The parameter dicts inside a preset are templates: resolve_preset copies them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .registry import bind, lookup, register

Spec = tuple[str, dict[str, Any]]


class Preset(NamedTuple):
    """A named combination. ``advantage``, ``loss``, ``aggregation``: ``(registered name, params)``.

    ``kl_coef`` / ``kl_estimator``: an optional KL-to-reference penalty ``kl_coef * KL`` per token,
    aggregated like the loss (0 = off; the trainer then needs no ``ref_logp``).
    ``extra``: settings outside the three functions that the sampler / trainer may read (e.g. ReMix's
    mixing probability, SPEAR's replay loss and schedules); None when there are none. ``note``: one line.
    """

    advantage: Spec
    loss: Spec
    aggregation: Spec
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    extra: dict[str, Any] | None = None
    note: str = ""


def resolve_preset(name: str, advantage_params: dict[str, Any] | None = None,
                   loss_params: dict[str, Any] | None = None,
                   aggregation_params: dict[str, Any] | None = None) -> tuple[Callable, Callable, Callable]:
    """``(adv_fn, loss_fn, agg_fn)`` for preset ``name``, overrides merged over the preset's parameters.

    Parameter names are checked against each function's signature here, before any compute.
    """
    preset = lookup("preset", name)
    parts = []
    for family, (fn_name, params), override in (("advantage", preset.advantage, advantage_params),
                                                 ("policy_loss", preset.loss, loss_params),
                                                 ("aggregation", preset.aggregation, aggregation_params)):
        parts.append(bind(family, fn_name, {**params, **(override or {})}))
    return parts[0], parts[1], parts[2]


def _preset(name: str, advantage: Spec, loss: Spec, aggregation: Spec, **extra: Any) -> None:
    register("preset", name, Preset(advantage, loss, aggregation, **extra))


_TOKEN_MEAN: Spec = ("token_mean", {})
_GRPO_ADV: Spec = ("grpo", {})

_preset("reinforce", ("group_mean", {}), ("reinforce", {}), _TOKEN_MEAN,
        note="REINFORCE with the group-mean baseline (REC paper's REINFORCE: no clip, no weight).")
_preset("grpo", _GRPO_ADV, ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}), _TOKEN_MEAN,
        note="GRPO: std-normalised group advantages, PPO-clip 0.2 against old_logp, token mean.")
_preset("dr_grpo", ("group_mean", {}), ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}),
        ("seq_mean_token_sum_norm", {}), note="Dr. GRPO: no std, no length normalisation.")
_preset("dapo", _GRPO_ADV, ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.28}), _TOKEN_MEAN,
        note="DAPO: clip-higher (0.2, 0.28) with token-mean aggregation.")
_preset("rloo", ("rloo", {}), ("reinforce", {}), ("seq_mean_token_sum", {}),
        note="RLOO: leave-one-out baseline, the whole response as one action.")
_preset("gspo", _GRPO_ADV, ("gspo", {"eps_low": 3e-4, "eps_high": 4e-4}), ("seq_mean_token_mean", {}),
        note="GSPO: clipped sequence-level ratio (length-normalised).")
_preset("cispo", _GRPO_ADV, ("cispo", {"eps_low": 1.0, "eps_high": 0.28}), _TOKEN_MEAN,
        note="CISPO: truncated, detached IS weight on REINFORCE; every token keeps its gradient.")

# The REC family (arXiv 2509.24203; Trinity-RFT examples/rec_gsm8k): group-mean advantages (no std),
# rec loss with the denominator behav_logp, token-mean aggregation.
_GM: Spec = ("group_mean", {})
_REC = {"eps_low": 0.2, "eps_high": 0.2, "regularizer": "none"}
_preset("rec_oneside_nois", _GM, ("rec", {**_REC, "clip_mode": "one_side", "weight": "none"}), _TOKEN_MEAN,
        note="REC-OneSide-NoIS, the REC paper's default.")
_preset("rec_oneside_is", _GM, ("rec", {**_REC, "clip_mode": "one_side", "weight": "importance_sampling"}),
        _TOKEN_MEAN, note="REC-OneSide-IS: the PPO-clip gradient against behav_logp.")
_preset("rec_twoside_is", _GM, ("rec", {**_REC, "clip_mode": "two_side", "weight": "importance_sampling"}),
        _TOKEN_MEAN, note="REC-TwoSide-IS: drop tokens outside [1-eps_low, 1+eps_high], IS-weighted.")
_preset("rec_ring_nois", _GM, ("rec", {**_REC, "clip_mode": "ring", "weight": "none", "eps_low_outer": 0.6,
                                       "eps_high_outer": 2.0}), _TOKEN_MEAN,
        note="REC-Ring-NoIS: two-side window plus the outer ring where the sign of A pulls rho back.")
_preset("asymre", _GM, ("rec", {"clip_mode": "none", "weight": "none", "regularizer": "forward_kl",
                                "reg_coef": 0.1}), _TOKEN_MEAN,
        note="AsymRE: REINFORCE - 0.1*logp, i.e. the baseline lowered by 0.1 (= asymre advantages, shift -0.1).")
_preset("opmd", _GM, ("rec", {"clip_mode": "none", "weight": "none", "regularizer": "k2", "reg_coef": 0.1}),
        _TOKEN_MEAN, note="Kimi OPMD: REINFORCE + 0.1*(logp - behav_logp)^2.")
_preset("red_drop", ("group_mean", {"drop": "balance"}), ("rec", {"clip_mode": "none", "weight": "none"}),
        _TOKEN_MEAN, note="RED-Drop: balance each group by dropping surplus negatives, then REINFORCE.")
_preset("red_weight", _GM, ("rec", {"clip_mode": "none", "weight": "advantage", "temp": 1.0}), _TOKEN_MEAN,
        note="RED-Weight: REINFORCE with per-sample weight exp(A / temp).")

_preset("decoupled_ppo", _GRPO_ADV, ("decoupled_ppo", {"eps_low": 0.2, "eps_high": 0.2, "cap": 3.0,
                                                      "level": "token", "mode": "truncate"}), _TOKEN_MEAN,
        note="AReaL decoupled PPO: clip vs old_logp, truncated behaviour weight min(old/behav, 3).")
_preset("bapo", _GRPO_ADV, ("bapo", {"rho0": 0.4, "low_range": (0.6, 0.9), "high_range": (1.2, 3.0),
                                    "step_low": 0.02, "step_high": 0.05, "search": "paper"}), _TOKEN_MEAN,
        note="BAPO: PPO-clip with per-update adaptive bounds balancing positive/negative contributions.")
_preset("remix", _GRPO_ADV, ("mix_ppg", {"eps": 0.2}), _TOKEN_MEAN,
        extra={"mix_prob": 0.4, "num_past_policies": 2, "update_to_data": 2, "kl_convex": True,
               "kl_convex_schedule": {"start": 50, "every": 10, "drop": 0.1, "floor": 0.5},
               "reincarnation_step": 50},
        note="ReMix: Mix-PPG with the clip window centred at pi_k/pi_{k-i}; replay of the last 2 policies.")
_preset("spear", _GRPO_ADV, ("sil", {"ratio_to": "old", "cov_ratio": 2e-4}), ("seq_mean_token_sum_norm", {}),
        extra={"replay_loss": ("sil", {"ratio_to": "behav", "cov_ratio": 0.02}), "tool_horizon": 200,
               "sil_horizon": 100, "tool_reward_coef": 0.1, "max_tool_calls": 10, "tolerate_steps": 10,
               "replay_factor": 1.5},
        note="SPEAR: Clip-Cov PPO on-policy plus a self-imitation replay pass weighted by sil_weight(t).")

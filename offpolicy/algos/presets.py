"""Named algorithm presets: an advantage estimator, a per-token policy loss and an aggregation, plus the
typed settings of the recipes that reach beyond those three functions (replay, KL-Convex, reincarnation,
self-imitation, tool-call reward).

``PRESETS[name]`` is a :class:`Preset`; :func:`resolve_preset` binds it (with overrides) into the three
callables the trainer uses. The parameter dicts inside a preset are templates: resolve_preset copies them.
Which settings the pipeline acts on is the pipeline's business (``offpolicy.train.plan``): a preset
whose recipe is not wired there is refused at start-up, never run in part.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .registry import bind, lookup, register

Spec = tuple[str, dict[str, Any]]


class ReplaySettings(NamedTuple):
    """ReMix replay: each batch draws a fraction ``mix_prob`` of its groups from the data of the last
    ``num_past_policies`` policies (the rest fresh), and feeds ``update_to_data`` optimiser passes."""

    mix_prob: float = 0.4
    num_past_policies: int = 2
    update_to_data: int = 2


class KLConvexSettings(NamedTuple):
    """ReMix KL-Convex schedule: ``lam(t) = max(1 - drop * ceil(max(t - start, 0) / every), floor)``
    weighs KL to the base policy against KL to the previous policy (strength: the preset's ``kl_coef``)."""

    start: int = 50
    every: int = 10
    drop: float = 0.1
    floor: float = 0.5


class SelfImitationSettings(NamedTuple):
    """SPEAR self-imitation: a replay buffer of positive-advantage trajectories, replayed with ``loss``
    against their stored behaviour log-probs, weighted by ``sil_weight(t)`` with horizon ``horizon``."""

    loss: Spec = ("sil", {"ratio_to": "behav", "cov_ratio": 0.02})
    horizon: int = 100
    tolerate_steps: int = 10
    replay_factor: float = 1.5
    history: int = 100  # group means kept for the P50 baseline
    batch_size: int | None = None  # replay batch size (None: the rows of a training batch)


class ToolRewardSettings(NamedTuple):
    """SPEAR intrinsic tool-call reward ``coef * min(calls, max_calls) * w_tool(t)``, w_tool decaying over ``horizon``."""

    coef: float = 0.1
    max_calls: int = 10
    horizon: int = 200


SETTINGS: dict[str, type] = {"replay": ReplaySettings, "kl_convex": KLConvexSettings,
                             "self_imitation": SelfImitationSettings, "tool_reward": ToolRewardSettings}


class Preset(NamedTuple):
    """A named combination. ``advantage``, ``loss``, ``aggregation``: ``(registered name, params)``.

    ``kl_coef`` / ``kl_estimator``: a KL-to-reference penalty ``kl_coef * KL`` per token, aggregated like
    the loss (0 = off; the trainer then needs no ``ref_logp``). The recipe settings (None = not part of
    this preset): ``replay``, ``kl_convex`` (the KL term becomes KL-Convex), ``reincarnation_step``
    (ReMix: base := pi_T at step T, replay stops), ``self_imitation``, ``tool_reward``.
    ``note``: one line; ``paper``: where it comes from.
    """

    advantage: Spec
    loss: Spec
    aggregation: Spec
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    replay: ReplaySettings | None = None
    kl_convex: KLConvexSettings | None = None
    reincarnation_step: int | None = None
    self_imitation: SelfImitationSettings | None = None
    tool_reward: ToolRewardSettings | None = None
    note: str = ""
    paper: str = ""

    def settings(self) -> dict[str, Any]:
        """The recipe settings this preset has (name -> value), in a fixed order."""
        names = (*SETTINGS, "reincarnation_step")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def resolve_preset(name: str, advantage_params: dict[str, Any] | None = None,
                   loss_params: dict[str, Any] | None = None,
                   aggregation_params: dict[str, Any] | None = None) -> tuple[Callable, Callable, Callable]:
    """``(adv_fn, loss_fn, agg_fn)`` for preset ``name``, overrides merged over the preset's parameters.

    Parameter names and ``Literal`` values are checked against each function's signature here, before
    any compute.
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
# verl applies a dual clip of c = 3 to every PPO-style loss: under staleness a token with A < 0 and a
# ratio above 3 would otherwise keep a -A * ratio gradient. On fresh data (ratio ~ 1) it never acts.
_PPO = {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 3.0}

_preset("reinforce", ("group_mean", {}), ("reinforce", {}), _TOKEN_MEAN,
        note="REINFORCE with the group-mean baseline (REC paper's REINFORCE: no clip, no weight).",
        paper="Williams 1992; arXiv 2509.24203")
_preset("grpo", _GRPO_ADV, ("ppo_clip", _PPO), _TOKEN_MEAN,
        note="GRPO: std-normalised group advantages, PPO-clip 0.2 (dual clip 3) against old_logp, token mean.",
        paper="DeepSeekMath, arXiv 2402.03300")
_preset("dr_grpo", ("group_mean", {}), ("ppo_clip", _PPO), ("seq_mean_token_sum_norm", {}),
        note="Dr. GRPO: no std, no length normalisation.", paper="arXiv 2503.20783")
_preset("dapo", _GRPO_ADV, ("ppo_clip", {**_PPO, "eps_high": 0.28}), _TOKEN_MEAN,
        note="DAPO: clip-higher (0.2, 0.28), dual clip 3, token-mean aggregation.", paper="arXiv 2503.14476")
_preset("rloo", ("rloo", {}), ("reinforce", {}), ("seq_mean_token_sum", {}),
        note="RLOO: leave-one-out baseline, the whole response as one action.", paper="arXiv 2402.14740")
_preset("gspo", _GRPO_ADV, ("gspo", {"eps_low": 3e-4, "eps_high": 4e-4}), ("seq_mean_token_mean", {}),
        note="GSPO: clipped sequence-level ratio (length-normalised).", paper="arXiv 2507.18071")
_preset("cispo", _GRPO_ADV, ("cispo", {"eps_low": 1.0, "eps_high": 0.28}), _TOKEN_MEAN,
        note="CISPO: truncated, detached IS weight on REINFORCE; every token keeps its gradient.",
        paper="MiniMax-M1, arXiv 2506.13585")

# The REC family (arXiv 2509.24203; Trinity-RFT examples/rec_gsm8k): group-mean advantages (no std),
# rec loss with the denominator behav_logp, token-mean aggregation.
_GM: Spec = ("group_mean", {})
_REC = {"eps_low": 0.2, "eps_high": 0.2, "regularizer": "none"}
_REC_PAPER = "Group-relative REINFORCE is off-policy, arXiv 2509.24203"
_preset("rec_oneside_nois", _GM, ("rec", {**_REC, "clip_mode": "one_side", "weight": "none"}), _TOKEN_MEAN,
        note="REC-OneSide-NoIS, the REC paper's default.", paper=_REC_PAPER)
_preset("rec_oneside_is", _GM, ("rec", {**_REC, "clip_mode": "one_side", "weight": "importance_sampling"}),
        _TOKEN_MEAN, note="REC-OneSide-IS: the PPO-clip gradient against behav_logp.", paper=_REC_PAPER)
_preset("rec_twoside_is", _GM, ("rec", {**_REC, "clip_mode": "two_side", "weight": "importance_sampling"}),
        _TOKEN_MEAN, note="REC-TwoSide-IS: drop tokens outside [1-eps_low, 1+eps_high], IS-weighted.",
        paper=_REC_PAPER)
_preset("rec_ring_nois", _GM, ("rec", {**_REC, "clip_mode": "ring", "weight": "none", "eps_low_outer": 0.6,
                                       "eps_high_outer": 2.0}), _TOKEN_MEAN,
        note="REC-Ring-NoIS: two-side window plus the outer ring where the sign of A pulls rho back.",
        paper=_REC_PAPER)
_preset("asymre", _GM, ("rec", {"clip_mode": "none", "weight": "none", "regularizer": "forward_kl",
                                "reg_coef": 0.1}), _TOKEN_MEAN,
        note="AsymRE: REINFORCE - 0.1*logp, i.e. the baseline lowered by 0.1 (= asymre advantages, shift -0.1).",
        paper="Asymmetric REINFORCE, Arnal et al. 2025, arXiv 2506.20520")
_preset("opmd", _GM, ("rec", {"clip_mode": "none", "weight": "none", "regularizer": "k2", "reg_coef": 0.1}),
        _TOKEN_MEAN, note="Kimi OPMD: REINFORCE + 0.1*(logp - behav_logp)^2.", paper="Kimi k1.5, arXiv 2501.12599")
_preset("red_drop", ("group_mean", {"drop": "balance"}), ("rec", {"clip_mode": "none", "weight": "none"}),
        _TOKEN_MEAN, note="RED-Drop: balance each group by dropping surplus negatives, then REINFORCE.",
        paper=_REC_PAPER)
_preset("red_weight", _GM, ("rec", {"clip_mode": "none", "weight": "advantage", "temp": 1.0}), _TOKEN_MEAN,
        note="RED-Weight: REINFORCE with per-sample weight exp(A / temp).", paper=_REC_PAPER)

_preset("decoupled_ppo", _GRPO_ADV, ("decoupled_ppo", {"eps_low": 0.2, "eps_high": 0.2, "cap": 3.0,
                                                      "level": "token", "mode": "truncate"}), _TOKEN_MEAN,
        note="AReaL decoupled PPO: clip vs the proximal old_logp, truncated behaviour weight min(old/behav, 3).",
        paper="AReaL, arXiv 2505.24298")
_preset("bapo", _GRPO_ADV, ("bapo", {"rho0": 0.4, "low_range": (0.6, 0.9), "high_range": (1.2, 3.0),
                                    "step_low": 0.02, "step_high": 0.05, "search": "paper"}), _TOKEN_MEAN,
        note="BAPO: PPO-clip with per-update adaptive bounds balancing positive/negative contributions.",
        paper="arXiv 2510.18927")
_preset("remix", _GRPO_ADV, ("mix_ppg", {"eps": 0.2}), _TOKEN_MEAN, kl_coef=0.001,
        replay=ReplaySettings(), kl_convex=KLConvexSettings(), reincarnation_step=50,
        note="ReMix: Mix-PPG (clip centred at pi_k/pi_{k-i}) on replay of the last 2 policies, m=2, KL-Convex "
             "(beta 0.001), reincarnation at step 50.", paper="arXiv 2507.06892")
_preset("dpo", ("identity", {}), ("dpo", {"beta": 0.1, "loss_type": "sigmoid"}), ("seq_mean_token_sum", {}),
        note="DPO on preference pairs (tasks.name=pairs): -log sigmoid(beta (delta_chosen - delta_rejected)), "
             "reference = the initial policy.", paper="Rafailov et al. 2023, arXiv 2305.18290")
_preset("ipo", ("identity", {}), ("dpo", {"beta": 0.1, "loss_type": "ipo"}), ("seq_mean_token_sum", {}),
        note="IPO on preference pairs: (mean delta_chosen - mean delta_rejected - 1/(2 beta))^2.",
        paper="Azar et al. 2023, arXiv 2310.12036")
_preset("online_dpo", ("identity", {}), ("dpo", {"beta": 0.1, "loss_type": "sigmoid"}), ("seq_mean_token_sum", {}),
        note="Online DPO: DPO on pairs built from each task's scored on-policy samples (workflow.name=online_pairs, "
             "best vs worst by default), reference = the initial policy.",
        paper="Guo et al. 2024, arXiv 2402.04792")
_preset("spear", _GRPO_ADV, ("sil", {"ratio_to": "old", "cov_ratio": 2e-4}), ("seq_mean_token_sum_norm", {}),
        self_imitation=SelfImitationSettings(), tool_reward=ToolRewardSettings(),
        note="SPEAR: Clip-Cov PPO on-policy plus a self-imitation replay pass weighted by sil_weight(t).",
        paper="arXiv 2509.22601")

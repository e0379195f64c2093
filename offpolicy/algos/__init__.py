"""offpolicy.algos: the pure tensor math of off-policy RL fine-tuning (torch only).

Families (plain dicts, see :mod:`.registry`): ``ADVANTAGES``, ``POLICY_LOSSES``, ``AGGREGATIONS``,
``REGULARIZERS``, ``KL_ESTIMATORS``, ``PRESETS``. Shape suffixes: ``_N`` flat samples, ``_B`` sequences, ``_BT`` tokens.
"""

from . import advantages, aggregation, bapo, kl, losses_pg, preference, rec, regularizers, remix, spear  # noqa: F401
from .advantages import group_stats, red_drop_keep
from .bapo import bapo_bounds, bapo_search_path
from .dpo import PAIR_BUILDERS, DPOOut, all_pairs, best_vs_worst, bradley_terry_loss, dpo_loss, ipo_loss
from .kl import entropy_from_logits
from .losses_pg import clipped_surrogate
from .remix import kl_convex, kl_convex_lambda
from .spear import (clip_cov_mask, recalibrate_advantages, replay_ready, replay_sample_size, sil_weight,
                    tool_call_reward, tool_call_reward_weight)
from .presets import (KLConvexSettings, Preset, ReplaySettings, SelfImitationSettings, ToolRewardSettings,
                      resolve_preset)
from .registry import (ADVANTAGES, AGGREGATIONS, FAMILIES, KL_ESTIMATORS, LOGPROBS, POLICY_LOSSES, PRESETS,
                       REGULARIZERS, bind, check_params, reads_of, register)
from .types import LossInputs, LossOut

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "FAMILIES", "KL_ESTIMATORS", "LOGPROBS", "PAIR_BUILDERS", "POLICY_LOSSES", "PRESETS",
    "REGULARIZERS",
    "DPOOut", "KLConvexSettings", "LossInputs", "LossOut", "Preset", "ReplaySettings", "SelfImitationSettings",
    "ToolRewardSettings",
    "all_pairs", "bapo_bounds", "bapo_search_path", "best_vs_worst", "bind", "bradley_terry_loss", "check_params",
    "clip_cov_mask", "clipped_surrogate", "dpo_loss", "entropy_from_logits", "group_stats", "ipo_loss", "kl_convex",
    "kl_convex_lambda",
    "recalibrate_advantages", "reads_of", "red_drop_keep", "register", "replay_ready", "replay_sample_size",
    "resolve_preset", "sil_weight", "tool_call_reward", "tool_call_reward_weight",
]

"""offpolicy.algos: the pure tensor math of off-policy RL fine-tuning (torch only).

Families (plain dicts, see :mod:`.registry`): ``ADVANTAGES``, ``POLICY_LOSSES``, ``AGGREGATIONS``,
``KL_ESTIMATORS``, ``PRESETS``. Shape suffixes: ``_N`` flat samples, ``_B`` sequences, ``_BT`` tokens.
"""

from . import advantages, aggregation, kl, losses_pg  # noqa: F401  (modules register their functions)
from .advantages import group_stats, red_drop_keep
from .kl import entropy_from_logits
from .presets import Preset, resolve_preset
from .registry import (ADVANTAGES, AGGREGATIONS, FAMILIES, KL_ESTIMATORS, POLICY_LOSSES, PRESETS, bind,
                       check_params, register)
from .types import LossInputs, LossOut

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "FAMILIES", "KL_ESTIMATORS", "POLICY_LOSSES", "PRESETS",
    "LossInputs", "LossOut", "Preset", "bind", "check_params", "entropy_from_logits", "group_stats",
    "red_drop_keep", "register", "resolve_preset",
]

"""Named algorithm presets: an advantage estimator, a per-token policy loss and an aggregation.

``PRESETS[name]`` is a :class:`Preset`; :func:`resolve_preset` binds it (with overrides) into the three
callables the trainer uses. The parameter dicts inside a preset are templates: resolve_preset copies them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from .registry import PRESETS, bind, lookup, register

Spec = tuple[str, dict[str, Any]]


class Preset(NamedTuple):
    """A named combination. ``advantage``, ``loss``, ``aggregation``: ``(registered name, params)``.

    ``kl_coef`` / ``kl_estimator``: an optional KL-to-reference penalty ``kl_coef * KL`` per token,
    aggregated like the loss (0 = off; the trainer then needs no ``ref_logp``). ``note``: one line.
    """

    advantage: Spec
    loss: Spec
    aggregation: Spec
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
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
_preset("rloo", ("rloo", {}), ("reinforce", {}), _TOKEN_MEAN, note="RLOO leave-one-out baseline.")

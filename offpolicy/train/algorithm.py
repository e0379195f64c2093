"""The algorithm a run trains with: a preset's bound functions, its regularisers and its recipe settings.

Built once from ``algorithm.*`` by :meth:`Algorithm.from_config`: every name, parameter and ``Literal``
value is checked there (before any model is loaded), the preset's typed recipe settings are merged with
the config's (a setting for a recipe the preset does not have is an error naming the key), and the KL /
entropy terms become members of the regulariser family.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from offpolicy.algos import AGGREGATIONS, PRESETS, bind, reads_of
from offpolicy.algos.presets import SETTINGS, Preset
from offpolicy.algos.registry import check_params, lookup


@dataclass(frozen=True)
class Algorithm:
    """Bound pieces: advantage, policy loss, aggregation (``functools.partial``s of registered
    functions) and the regularisers added to the loss; ``settings``: the recipe settings in force
    (name -> typed settings, see :meth:`Preset.settings`)."""

    adv_fn: Callable
    loss_fn: Callable
    agg_fn: Callable
    regularizers: tuple[Callable, ...] = ()
    preset: str = "custom"
    settings: dict[str, Any] = field(default_factory=dict)
    # a preference loss (bound ``dpo``) on the pair rows of a mixed batch, and its weight (0: none)
    pair_fn: Callable | None = None
    pair_coef: float = 0.0

    @property
    def loss_reads(self) -> frozenset[str]:
        """The log-probs the policy loss declares it reads (with its bound parameters)."""
        return _reads("policy_loss", self.loss_fn)

    @property
    def reads(self) -> frozenset[str]:
        """Everything the loss and the regularisers read."""
        out = set(self.loss_reads)
        for reg in self.regularizers:
            out |= _reads("regularizer", reg)
        if self.pair_fn is not None:
            out |= _reads("policy_loss", self.pair_fn)
        return frozenset(out)

    @classmethod
    def from_config(cls, algo_cfg, *, max_len: int | None = None) -> "Algorithm":
        """Bind the preset named in ``algo_cfg`` with its overrides; raises ValueError naming the key.

        ``max_len`` (the generation limit) fills an aggregation's ``max_len`` parameter when neither
        the preset nor the overrides set it, so Dr. GRPO's constant normaliser is the real L_max.
        """
        from offpolicy.algos import resolve_preset

        preset: Preset = lookup("preset", algo_cfg.preset)
        agg_params = dict(algo_cfg.aggregation_params)
        agg_name, preset_agg_params = preset.aggregation
        if (max_len is not None and "max_len" in inspect.signature(AGGREGATIONS[agg_name]).parameters
                and "max_len" not in {**preset_agg_params, **agg_params}):
            agg_params["max_len"] = max_len
        adv_fn, loss_fn, agg_fn = resolve_preset(algo_cfg.preset, algo_cfg.advantage_params,
                                                 algo_cfg.loss_params, agg_params)
        settings = resolve_settings(preset, algo_cfg)
        kl_coef = preset.kl_coef if algo_cfg.kl_coef is None else algo_cfg.kl_coef
        estimator = algo_cfg.kl_estimator or preset.kl_estimator
        lookup("kl", estimator)
        regs = []
        if kl_coef > 0 and "kl_convex" in settings:
            regs.append(bind("regularizer", "kl_convex",
                             {"coef": kl_coef, "estimator": estimator, **settings["kl_convex"]._asdict()}))
        elif kl_coef > 0:
            regs.append(bind("regularizer", "kl_ref", {"coef": kl_coef, "estimator": estimator}))
        elif "kl_convex" in settings:
            if _given(algo_cfg.kl_convex):
                raise ValueError(f"algorithm.kl_convex shapes the KL term, but algorithm.kl_coef={kl_coef} turns it "
                                 "off; set kl_coef > 0 or algorithm.kl_convex.enabled=false")
            del settings["kl_convex"]
        if algo_cfg.entropy_coef:
            regs.append(bind("regularizer", "entropy_bonus", {"coef": algo_cfg.entropy_coef}))
        pair_fn = None
        if algo_cfg.preference_coef:
            if getattr(loss_fn.func, "pairwise", False):
                raise ValueError(f"algorithm.preference_coef: preset {algo_cfg.preset!r} already trains on pairs "
                                 "only; the DPO term is for a policy-gradient preset on a mixed batch")
            params = dict(algo_cfg.preference_params)
            check_params(lookup("policy_loss", "dpo"), params, "algorithm.preference_params")
            pair_fn = bind("policy_loss", "dpo", params)
        return cls(adv_fn, loss_fn, agg_fn, tuple(regs), algo_cfg.preset, settings, pair_fn,
                   float(algo_cfg.preference_coef))


def _reads(family: str, bound: Callable) -> frozenset[str]:
    table = {"policy_loss": "POLICY_LOSSES", "regularizer": "REGULARIZERS"}[family]
    import offpolicy.algos as algos

    names = [n for n, fn in getattr(algos, table).items() if fn is bound.func]
    if not names:  # an unregistered function: it may read anything
        return frozenset({"behav_logp", "old_logp"})
    return reads_of(family, names[0], bound.keywords)


def _given(section) -> dict[str, Any]:
    """The fields of a recipe section that the config sets (None means "the preset's")."""
    return {k: v for k, v in section.model_dump().items() if v is not None}


def resolve_settings(preset: Preset, algo_cfg) -> dict[str, Any]:
    """The preset's recipe settings with ``algorithm.<recipe>.*`` merged in; refuses a setting for a
    recipe the preset does not have (naming the key and the presets that have it)."""
    out: dict[str, Any] = {}
    for name in SETTINGS:
        given = _given(getattr(algo_cfg, name))
        enabled = given.pop("enabled", None)
        base = getattr(preset, name)
        if base is None and (enabled or given):
            have = sorted(n for n, p in PRESETS.items() if getattr(p, name, None) is not None)
            key = f"algorithm.{name}.{next(iter(given), 'enabled')}"
            raise ValueError(f"{key}: preset {algo_cfg.preset!r} has no {name} recipe (presets with one: {have})")
        if base is None or enabled is False:
            if enabled is False and given:
                raise ValueError(f"algorithm.{name}.enabled=false, but algorithm.{name}.{next(iter(given))} is set")
            continue
        out[name] = base._replace(**given)
    step = preset.reincarnation_step if algo_cfg.reincarnation_step is None else algo_cfg.reincarnation_step
    if step and preset.reincarnation_step is None:
        raise ValueError(f"algorithm.reincarnation_step={step}: preset {algo_cfg.preset!r} has no reincarnation "
                         "recipe (presets with one: remix)")
    if step:
        out["reincarnation_step"] = step
    return out

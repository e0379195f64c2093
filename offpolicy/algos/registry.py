"""Registries: one plain dict per family, ``register`` for user code, ``bind`` to fix parameters.

Families and their call signatures (hyperparameters are keyword-only and bound once at setup):

- ``advantage``:   ``fn(rewards_N, group_ids_N, **params) -> adv_N``
- ``policy_loss``: ``fn(logp_BT, inputs: LossInputs, **params) -> LossOut``
- ``aggregation``: ``fn(loss_BT, mask_BT, *, num_tokens=None, num_seqs=None, **params) -> scalar``
- ``kl``:          ``fn(logp_BT, ref_logp_BT) -> kl_BT``
- ``preset``:      a :class:`~offpolicy.algos.presets.Preset` (not a function)
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
PRESETS: dict[str, Any] = {}

FAMILIES: dict[str, dict[str, Any]] = {
    "advantage": ADVANTAGES,
    "policy_loss": POLICY_LOSSES,
    "aggregation": AGGREGATIONS,
    "kl": KL_ESTIMATORS,
    "preset": PRESETS,
}

# Every family's functions take two tensors at call time (rewards/groups, logp/inputs, loss/mask,
# logp/ref_logp); those two are never bound as hyperparameters.
_NUM_CALL_ARGS = 2


def _family(family: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[family]


def _hint(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def register(family: str, name: str, fn: Any) -> Any:
    """Add ``fn`` to ``family`` under ``name``; refuse a name that is already taken. Returns ``fn``."""
    table = _family(family)
    if name in table:
        raise ValueError(f"{family} {name!r} is already registered; pick another name")
    table[name] = fn
    return fn


def builtin(family: str, name: str) -> Callable[[Any], Any]:
    """Decorator form of :func:`register` used by the modules of this package."""
    return lambda fn: register(family, name, fn)


def lookup(family: str, name: str) -> Any:
    """``FAMILIES[family][name]`` with an error that lists the valid names."""
    table = _family(family)
    if name not in table:
        valid = sorted(table)
        raise ValueError(f"unknown {family} {name!r}{_hint(name, valid)}; valid: {valid}")
    return table[name]


def check_params(fn: Callable, params: dict[str, Any], where: str) -> None:
    """Raise ValueError naming any key of ``params`` that ``fn`` does not accept as a keyword."""
    params_all = list(inspect.signature(fn).parameters.values())
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params_all)
    valid = [p.name for p in params_all[_NUM_CALL_ARGS:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in params:
        if key not in valid and not accepts_any:
            raise ValueError(f"{where}: unknown parameter {key!r}{_hint(key, valid)}; valid: {valid}")


def bind(family: str, name: str, params: dict[str, Any] | None = None) -> Callable:
    """``functools.partial`` of a registered function with checked keyword parameters."""
    fn = lookup(family, name)
    params = dict(params or {})
    check_params(fn, params, f"{family} {name!r}")
    return functools.partial(fn, **params)

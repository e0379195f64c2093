"""Registries: one plain dict per family, ``register`` for user code, ``bind`` to fix parameters.

Families and their call signatures (hyperparameters are keyword-only and bound once at setup):

- ``advantage``:   ``fn(rewards_N, group_ids_N, **params) -> adv_N``
- ``policy_loss``: ``fn(logp_BT, inputs: LossInputs, **params) -> LossOut``
- ``regularizer``: ``fn(logp_BT, inputs: LossInputs, **params) -> LossOut`` (a per-token term added to
  the policy loss and aggregated with it: KL to the reference, KL-Convex, entropy bonus, ...)
- ``aggregation``: ``fn(loss_BT, mask_BT, *, num_tokens=None, num_seqs=None, **params) -> scalar``
- ``kl``:          ``fn(logp_BT, ref_logp_BT) -> kl_BT``
- ``preset``:      a :class:`~offpolicy.algos.presets.Preset` (not a function)

Policy losses and regularisers **declare** the log-probs they read (``reads``): a tuple of
:class:`~offpolicy.algos.types.LossInputs` fields, or a function of the bound parameters returning one
(e.g. ``ppo_clip`` reads ``old_logp`` or ``behav_logp`` depending on ``ratio_to``). The trainer plans
which log-probs to compute from these declarations; it never probes a function.

String parameters are ``Literal`` types; :func:`bind` checks every value against them (and names the
valid ones), so a wrong value fails at set-up, before any model is loaded.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from typing import Any, Callable, Iterable, Literal, Union

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
REGULARIZERS: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
PRESETS: dict[str, Any] = {}

FAMILIES: dict[str, dict[str, Any]] = {
    "advantage": ADVANTAGES,
    "policy_loss": POLICY_LOSSES,
    "regularizer": REGULARIZERS,
    "aggregation": AGGREGATIONS,
    "kl": KL_ESTIMATORS,
    "preset": PRESETS,
}

# The log-prob fields of LossInputs a policy loss or regulariser may declare it reads.
LOGPROBS = ("behav_logp", "old_logp", "ref_logp", "center_logp", "prev_logp", "entropy")
# Families whose members read LossInputs, and must say which fields.
_DECLARING = ("policy_loss", "regularizer")
Reads = Union[Iterable[str], Callable[[dict[str, Any]], Iterable[str]]]
_READS: dict[tuple[str, str], Reads] = {}

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


def register(family: str, name: str, fn: Any, *, reads: Reads | None = None) -> Any:
    """Add ``fn`` to ``family`` under ``name``; refuse a name that is already taken. Returns ``fn``.

    ``reads`` (policy losses and regularisers only): the :data:`LOGPROBS` fields ``fn`` reads, or a
    function of its bound parameters (a dict, defaults included) that returns them. Omitted for a
    policy loss, it means ``("behav_logp", "old_logp")``: the trainer then provides both.
    """
    table = _family(family)
    if name in table:
        raise ValueError(f"{family} {name!r} is already registered; pick another name")
    if reads is not None and family not in _DECLARING:
        raise ValueError(f"{family} {name!r}: only {_DECLARING} declare the log-probs they read")
    if family in _DECLARING:
        reads = ("behav_logp", "old_logp") if reads is None else reads
        if not callable(reads):
            _check_reads(family, name, reads)
        _READS[(family, name)] = reads
    table[name] = fn
    return fn


def _check_reads(family: str, name: str, fields: Iterable[str]) -> frozenset[str]:
    fields = frozenset(fields)
    unknown = sorted(fields - set(LOGPROBS))
    if unknown:
        raise ValueError(f"{family} {name!r} declares unknown inputs {unknown}; valid: {list(LOGPROBS)}")
    return fields


def builtin(family: str, name: str, *, reads: Reads | None = None) -> Callable[[Any], Any]:
    """Decorator form of :func:`register` used by the modules of this package."""
    return lambda fn: register(family, name, fn, reads=reads)


def lookup(family: str, name: str) -> Any:
    """``FAMILIES[family][name]`` with an error that lists the valid names."""
    table = _family(family)
    if name not in table:
        valid = sorted(table)
        raise ValueError(f"unknown {family} {name!r}{_hint(name, valid)}; valid: {valid}")
    return table[name]


def bound_params(fn: Callable, params: dict[str, Any]) -> dict[str, Any]:
    """Every keyword parameter of ``fn`` with its value once ``params`` are bound (defaults filled in)."""
    sig = inspect.signature(getattr(fn, "func", fn))
    out = {p.name: p.default for p in list(sig.parameters.values())[_NUM_CALL_ARGS:]
           if p.default is not p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {**out, **getattr(fn, "keywords", {}), **params}


def reads_of(family: str, name: str, params: dict[str, Any] | None = None) -> frozenset[str]:
    """The log-probs member ``name`` of ``family`` reads with ``params`` bound (see :func:`register`)."""
    reads = _READS.get((family, name), ())
    if callable(reads):
        reads = reads(bound_params(lookup(family, name), dict(params or {})))
    return _check_reads(family, name, reads)


def _allowed(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` (possibly inside ``Optional``/``Union``) annotation admits, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        parts = [_allowed(a) if a is not type(None) else (None,) for a in typing.get_args(annotation)]
        if all(p is not None for p in parts):
            return tuple(v for p in parts for v in p)
    return None


def check_params(fn: Callable, params: dict[str, Any], where: str) -> None:
    """Raise ValueError naming any key of ``params`` that ``fn`` does not accept as a keyword, or a value
    outside a ``Literal`` parameter's choices (naming the valid ones)."""
    params_all = list(inspect.signature(fn).parameters.values())
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params_all)
    valid = [p.name for p in params_all[_NUM_CALL_ARGS:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in params:
        if key not in valid and not accepts_any:
            raise ValueError(f"{where}: unknown parameter {key!r}{_hint(key, valid)}; valid: {valid}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a user function with unresolvable annotations: names are still checked
        hints = {}
    for key, value in params.items():
        choices = _allowed(hints.get(key))
        if choices is not None and value not in choices:
            shown = [c for c in choices if c is not None] + ([None] if None in choices else [])
            raise ValueError(f"{where}: {key}={value!r} is not valid; valid: {shown}")
        kind = _scalar_kind(hints.get(key))
        if kind is not None and not _is_kind(value, *kind):
            yaml_hint = " (YAML reads 1e9 as text: write 1.0e+9)" if isinstance(value, str) else ""
            raise ValueError(f"{where}: {key}={value!r} is not {kind[0].__name__}"
                             f"{' or None' if kind[1] else ''}{yaml_hint}")


def _scalar_kind(annotation: Any) -> tuple[type, bool] | None:
    """(float / int / bool, whether None is allowed) for such an annotation or its Optional; else None."""
    args = (typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType)
            else (annotation,))
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (float, int, bool):
        return None
    return kinds[0], len(kinds) < len(args)


def _is_kind(value: Any, kind: type, optional: bool) -> bool:
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)


def bind(family: str, name: str, params: dict[str, Any] | None = None) -> Callable:
    """``functools.partial`` of a registered function with checked keyword parameters."""
    fn = lookup(family, name)
    params = dict(params or {})
    check_params(fn, params, f"{family} {name!r}")
    return functools.partial(fn, **params)

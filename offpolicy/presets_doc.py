"""``offpolicy presets [NAME]``: what each named algorithm computes, from the registries themselves.

For every preset: its advantage estimator, policy loss and aggregation with every bound parameter
(defaults included), the log-probs the loss declares it reads, its KL term, its recipe settings and
the paper it comes from. Nothing here is written by hand per preset.
"""

from __future__ import annotations

import difflib


_CALL_TIME = ("num_tokens", "num_seqs", "generator")  # passed by the trainer at each call, not settings


def _params(family: str, spec) -> dict:
    from offpolicy.algos.registry import bound_params, lookup

    name, params = spec
    return {k: v for k, v in bound_params(lookup(family, name), dict(params)).items() if k not in _CALL_TIME}


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "-"


def describe(name: str) -> str:
    """Several lines on preset ``name``."""
    from offpolicy.algos import PRESETS, reads_of

    p = PRESETS[name]
    loss_name, loss_params = p.loss
    reads = sorted(reads_of("policy_loss", loss_name, loss_params))
    lines = [f"{name}: {p.note}", f"  paper:       {p.paper or '-'}",
             f"  advantage:   {p.advantage[0]}({_fmt(_params('advantage', p.advantage))})",
             f"  policy loss: {loss_name}({_fmt(_params('policy_loss', p.loss))})",
             f"  aggregation: {p.aggregation[0]}({_fmt(_params('aggregation', p.aggregation))})",
             f"  reads:       {', '.join(reads) or 'no log-probs'}",
             f"  KL:          {f'{p.kl_coef} x {p.kl_estimator}' if p.kl_coef else 'off (algorithm.kl_coef)'}"]
    for key, value in p.settings().items():
        shown = _fmt(value._asdict()) if hasattr(value, "_asdict") else repr(value)
        lines.append(f"  {key + ':':<12} {shown}" if len(key) < 12 else f"  {key}: {shown}")
    return "\n".join(lines)


def table() -> str:
    """One line per preset."""
    from offpolicy.algos import PRESETS, reads_of

    rows = [("preset", "advantage", "policy loss", "aggregation", "reads", "recipes")]
    for name, p in sorted(PRESETS.items()):
        reads = ",".join(sorted(reads_of("policy_loss", *p.loss))) or "-"
        rows.append((name, p.advantage[0], p.loss[0], p.aggregation[0], reads, ",".join(p.settings()) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out) + "\n\n`offpolicy presets NAME` shows one preset's parameters, settings and paper."


def presets_text(name: str | None) -> str:
    """The table, or one preset's description; ValueError naming the valid presets for an unknown name."""
    from offpolicy.algos import PRESETS

    if name is None:
        return table()
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} valid: {', '.join(sorted(PRESETS))}")
    return describe(name)

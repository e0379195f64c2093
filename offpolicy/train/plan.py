"""The step plan: where each log-prob a training step reads comes from, decided once at start-up.

Built by :func:`build_plan` from the config and the :class:`~offpolicy.train.algorithm.Algorithm`'s
declared inputs, printed at the start of a run and saved as ``<run_dir>/plan.json``. The rules (the
denominator each paper uses):

- ``behav_logp`` is always the engine's record under the distribution it sampled from (after
  temperature, top-k and top-p: the truncated, renormalised one), never recomputed.
- ``old_logp`` (PPO's pi_old), when the loss reads it:
  - a loss that reads both ``old_logp`` and ``behav_logp`` uses them as two distinct policies
    (decoupled PPO: the proximal policy and the behaviour policy), so ``old_logp`` is always the
    trainer's policy at the step start, never the behaviour log-probs;
  - otherwise ``train.old_logp``: ``behav`` = the sampling policy (PPO's definition of pi_old; the
    default ``auto`` picks it when data can be stale), ``recompute`` = the step-start policy.
  The step-start policy costs no forward with one optimiser step per batch (``current``: the detached
  log-probs of the step itself, exact because the weights have not moved yet), one no-grad forward per
  batch otherwise (``recompute``).
- ``center_logp`` (ReMix's pi_k): the step-start policy, as above.
- ``ref_logp``: the frozen reference (initial policy; the KL base), when a regulariser reads it.
- ``prev_logp``: the previous step's policy pi_{k-1} (KL-Convex), kept one step behind by the trainer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from offpolicy.algos.registry import bound_params
from offpolicy.config import Config, ConfigError

# recipe settings the pipeline acts on; any other in force is refused at start-up (see check_wired)
WIRED = ("replay", "kl_convex", "reincarnation_step", "self_imitation", "tool_reward")
NOT_WIRED: dict[str, str] = {}  # recipe -> what it is, for recipes declared by a preset but not acted on yet


@dataclass(frozen=True)
class StepPlan:
    """Sources of every log-prob the step reads ('unused' where nothing reads it), the KL schedule and
    the shape of the update. Values, not objects: it is printed and saved."""

    preset: str
    loss: str
    loss_reads: tuple[str, ...]
    regularizers: tuple[str, ...]
    behav_logp: str  # 'sampled': recorded by the engine under the (truncated) sampling distribution
    old_logp: str  # unused | current | recompute | behav
    center_logp: str  # unused | current | recompute
    ref_logp: str  # unused | reference
    prev_logp: str  # unused | previous_policy
    kl: str  # off | constant ... | kl_convex ...
    temperature: float
    top_p: float
    top_k: int
    grad_clip: float
    micro_batches: int
    mini_batches: int
    updates_per_batch: int
    preference: str = "off"  # the DPO term on the pair rows of a mixed batch: off | "<coef> x dpo(...)"

    @property
    def optimizer_steps(self) -> int:
        return self.mini_batches * self.updates_per_batch

    def describe(self) -> str:
        """A few lines for the start of a run."""
        trunc = [f"top_k={self.top_k}" if self.top_k else "", f"top_p={self.top_p}" if self.top_p < 1 else ""]
        trunc = " and ".join(t for t in trunc if t)
        sampled = (f"the truncated, renormalised distribution it sampled from ({trunc}; the untruncated one is "
                   "kept as engine_logp for the mismatch metric)" if trunc else "the distribution it sampled from")
        lines = [f"step plan: {self.preset} — loss {self.loss} reads {', '.join(self.loss_reads) or 'no log-probs'}"
                 f"; regularisers: {', '.join(self.regularizers) or 'none'}",
                 f"  behav_logp: recorded by the engine at temperature {self.temperature} under {sampled}",
                 f"  old_logp: {_OLD[self.old_logp]}",
                 f"  center_logp: {_OLD[self.center_logp]}",
                 f"  ref_logp: {'the frozen reference policy, one no-grad forward per batch' if self.ref_logp != 'unused' else 'unused'}",
                 f"  prev_logp: {'the previous step policy pi_(k-1), one no-grad forward per batch' if self.prev_logp != 'unused' else 'unused'}",
                 f"  KL: {self.kl}",
                 *([f"  pairs: {self.preference} on the pair rows; the policy loss on the samples"]
                   if self.preference != "off" else []),
                 f"  update: {self.updates_per_batch} pass(es) x {self.mini_batches} mini-batch(es) = "
                 f"{self.optimizer_steps} optimiser step(s) per batch, {self.micro_batches} micro-batch(es) each, "
                 f"grad clip {self.grad_clip}"]
        return "\n".join(lines)

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / "plan.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


_OLD = {"unused": "unused",
        "current": "the step-start policy = the detached log-probs of the step itself (one optimiser step "
                   "per batch: exact, no extra forward)",
        "recompute": "the step-start policy, recomputed once per batch (no-grad forward)",
        "behav": "the sampling policy's behav_logp (no extra forward)"}


def check_batch_kind(cfg: Config, algo) -> None:
    """A pairwise loss (DPO) trains on batches of pairs only: from a preference file (workflow pairs) or
    sampled (online_pairs). A mixed batch (online_pairs keeping its samples) needs a policy-gradient preset
    for the samples and ``algorithm.preference_coef`` for the pairs."""
    pairwise = bool(getattr(algo.loss_fn.func, "pairwise", False))
    w = cfg.workflow
    pairs_only = w.name == "pairs" or (w.name == "online_pairs" and not w.keep_samples)
    if pairwise and not pairs_only:
        raise ConfigError(f"algorithm.preset={algo.preset} trains on preference pairs only; they come from "
                          "tasks.name=pairs (a preference file) or workflow.name=online_pairs (sampled, without "
                          f"keep_samples), got workflow.name={w.name}"
                          + (" with keep_samples=true" if w.name == "online_pairs" else ""))
    if not pairwise and pairs_only:
        raise ConfigError(f"algorithm.preset={algo.preset} does not train on preference pairs, but "
                          f"workflow.name={w.name} makes nothing else; use algorithm.preset=dpo / ipo / online_dpo, "
                          "or workflow.keep_samples=true with algorithm.preference_coef > 0 for a mixed batch")
    if w.name == "online_pairs" and w.keep_samples and algo.pair_fn is None:
        raise ConfigError("workflow.keep_samples=true makes mixed batches (samples and pairs); set "
                          "algorithm.preference_coef > 0 to train the pairs, or drop keep_samples")


def build_plan(cfg: Config, algo) -> StepPlan:
    """The plan for ``cfg`` and its bound algorithm; ConfigError for a combination that cannot be honoured."""
    check_wired(algo)
    if "tool_reward" in algo.settings and cfg.workflow.name == "single_turn":
        raise ConfigError(f"algorithm.preset={algo.preset}: its tool_reward recipe counts tool calls, which a "
                          "single_turn workflow never makes; use workflow.name=multi_turn with a tool environment, "
                          "or set algorithm.tool_reward.enabled=false")
    check_batch_kind(cfg, algo)
    t, r = cfg.train, cfg.rollout
    loss_reads = algo.loss_reads
    reads = algo.reads
    start = "recompute" if t.updates_per_batch * t.mini_batches > 1 else "current"
    old = "unused"
    loss_name = getattr(algo.loss_fn, "func", algo.loss_fn).__name__
    if "old_logp" in reads:
        if "behav_logp" in loss_reads and "old_logp" in loss_reads:
            if t.old_logp == "behav":
                raise ConfigError(f"train.old_logp=behav: the loss {loss_name!r} reads old_logp and behav_logp as two "
                                  "distinct policies (proximal and behaviour); old_logp must be the trainer's "
                                  "step-start policy. Use train.old_logp=auto or recompute")
            old = start
        else:
            stale = cfg.pipeline.decoupled and cfg.staleness_bound > 0
            old = "behav" if t.old_logp == "behav" or (t.old_logp == "auto" and stale) else start
    elif t.old_logp != "auto":
        raise ConfigError(f"train.old_logp={t.old_logp}: the loss {loss_name!r} does not read old_logp "
                          f"(it reads {sorted(loss_reads) or 'no log-probs'}); leave train.old_logp=auto")
    if loss_name == "bapo" and t.workers > 1:
        raise ConfigError(f"algorithm.preset={algo.preset}: the bapo loss searches its clip bounds over the rows of each "
                          f"micro-batch; with train.workers={t.workers} every rank would search over its own share of "
                          "them (the official code all-reduces the search's sums across ranks; not wired here), so "
                          "the update would not be the one-process one. Use train.workers=1")
    kl = "off"
    for reg in algo.regularizers:
        kw = bound_params(reg, {})
        if reg.func.__name__ == "kl_convex":
            kl = (f"KL-Convex, {kw['coef']} x [lambda KL(pi||base) + (1-lambda) KL(pi||pi_(k-1))] ({kw['estimator']}), "
                  f"lambda(t) = max(1 - {kw['drop']} ceil(max(t - {kw['start']}, 0) / {kw['every']}), {kw['floor']})")
        elif reg.func.__name__ == "kl_ref":
            kl = f"constant, {kw['coef']} x KL(pi||ref) ({kw['estimator']})"
    return StepPlan(
        preset=algo.preset, loss=loss_name, loss_reads=tuple(sorted(loss_reads)),
        regularizers=tuple(reg.func.__name__ for reg in algo.regularizers), behav_logp="sampled",
        old_logp=old, center_logp=start if "center_logp" in reads else "unused",
        ref_logp="reference" if "ref_logp" in reads else "unused",
        prev_logp="previous_policy" if "prev_logp" in reads else "unused", kl=kl,
        temperature=r.temperature, top_p=r.top_p, top_k=getattr(r, "top_k", 0), grad_clip=t.grad_clip,
        micro_batches=t.micro_batches, mini_batches=t.mini_batches, updates_per_batch=t.updates_per_batch,
        preference=(f"{algo.pair_coef} x dpo({', '.join(f'{k}={v}' for k, v in bound_params(algo.pair_fn, {}).items())})"
                    if algo.pair_fn is not None else "off"))


def check_wired(algo) -> None:
    """Refuse a recipe setting the pipeline does not act on, naming it and how to turn it off."""
    missing = [name for name in algo.settings if name in NOT_WIRED]
    if missing:
        parts = "; ".join(f"{name} ({NOT_WIRED[name]})" for name in missing)
        off = " ".join(f"algorithm.{name}.enabled=false" for name in missing)
        raise ConfigError(f"algorithm.preset={algo.preset}: these parts of its recipe are not wired into the pipeline "
                          f"yet: {parts}. Refusing to run it in part; to train without them, set {off}")
    unknown = [name for name in algo.settings if name not in WIRED and name not in NOT_WIRED]
    if unknown:
        raise ConfigError(f"algorithm.preset={algo.preset}: no code acts on the recipe settings {unknown}")

"""Replay and ReMix wiring shared by the runners: which sample strategy, how many fresh rollouts, and
policy reincarnation.

ReMix (arXiv 2507.06892, docs/algorithms.md) end to end:

- the ``mix`` strategy trains each batch on a fraction ``p`` of rows replayed from the last ``N``
  policies' data and the rest fresh; the explorer then generates only the fresh part
  (:func:`fresh_prompts`), which is where the rollouts are saved;
- ``train.updates_per_batch`` = m optimiser passes over each batch (the update-to-data ratio);
- the Mix-PPG clip window is centred at pi_k / pi_{k-i}: pi_k is the ``old_logp`` the trainer
  recomputes with the current weights at the start of each step, for replayed and fresh rows alike;
- KL-Convex (the ``kl_convex`` regulariser): lambda(step) weighs KL to the base policy against KL to the
  previous policy, with lambda read from the trainer's real step counter;
- policy reincarnation at step T (:class:`Reincarnation`): the base policy becomes pi_T, the historical
  store is dropped and training continues on-policy (no replay, full fresh batches).

The preset's ``replay`` recipe fills whatever the user left unset (:func:`apply_preset_defaults`), so
``config.json`` records the values the run really used.
"""

from __future__ import annotations

from pathlib import Path

from offpolicy.config import Config, ConfigError
from offpolicy.data.sampling import make_strategy


def apply_preset_defaults(cfg: Config) -> Config:
    """A copy of ``cfg`` with the preset's replay recipe in the fields the user did not set.

    With a ``replay`` recipe in force (remix): ``buffer.strategy=mix`` with ``p=mix_prob,
    window=num_past_policies`` and ``train.updates_per_batch=update_to_data``. Explicit settings win.
    """
    from offpolicy.train.algorithm import Algorithm

    try:
        settings = Algorithm.from_config(cfg.algorithm, max_len=cfg.rollout.max_new_tokens).settings
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    replay = settings.get("replay")
    if replay is None:
        return cfg
    data = cfg.model_dump()
    if cfg.buffer.strategy is None:
        data["buffer"]["strategy"] = "mix"
        data["buffer"]["strategy_params"] = {"p": replay.mix_prob, "window": replay.num_past_policies,
                                             **cfg.buffer.strategy_params}
    if "updates_per_batch" not in cfg.train.model_fields_set:
        data["train"]["updates_per_batch"] = replay.update_to_data
    return Config.model_validate(data)


def sample_strategy(cfg: Config):
    """``buffer.strategy`` (after :func:`apply_preset_defaults`), else fifo (sync) / staleness (async)."""
    name = cfg.buffer.strategy
    params = dict(cfg.buffer.strategy_params)
    if name is None:
        name = "staleness" if cfg.pipeline.decoupled else "fifo"
        if name == "staleness":
            params.setdefault("max_staleness", cfg.staleness_bound)
    if cfg.pipeline.decoupled and name not in ("staleness", "fifo"):
        raise ConfigError(f"buffer.strategy={name}: the {cfg.pipeline.mode} runner trains each batch in the order the explorer "
                          "wrote it; replay strategies (mix, priority, expert_mix) run in pipeline.mode=sync")
    params.setdefault("seed", cfg.train.seed)
    try:
        return make_strategy(name, **params)
    except ValueError as e:
        raise ConfigError(f"buffer.strategy: {e}") from None


def fresh_prompts(cfg: Config, strategy, buffer, now_version: int) -> int:
    """Tasks the explorer generates for the batch trained at version ``now_version``: all of
    ``rollout.prompts_per_step``, less the groups the strategy will replay from the history in ``buffer``
    (rows already trained on, from the last ``window`` versions)."""
    prompts = cfg.rollout.prompts_per_step
    replay_groups = getattr(strategy, "replay_groups", None)
    if replay_groups is None:
        return prompts
    low = now_version - strategy.window
    unused = buffer.versions(unused=True)
    history = sum(n - unused.get(v, 0) for v, n in buffer.versions().items() if low <= v < now_version)
    return prompts - replay_groups(prompts, cfg.rollout.group_size, history)


class Reincarnation:
    """ReMix's policy reincarnation at trainer step ``T`` (the ``reincarnation_step`` setting; None: never). After step T the base (KL reference) policy is pi_T, the replay history is dropped
    and the strategy replays nothing. pi_T is saved to ``<run_dir>/reincarnation.safetensors`` so a
    resumed run gets the same base."""

    def __init__(self, ctx, step: int | None):
        self.ctx = ctx
        self.step = step or None
        cfg = getattr(ctx, "cfg", None)
        if self.step and cfg is not None and cfg.model.lora.r > 0:
            raise ConfigError("ReMix policy reincarnation with LoRA is not supported (the base policy is the "
                              "adapter-free model); set algorithm.reincarnation_step=0")
        self.path = Path(ctx.run_dir) / "reincarnation.safetensors"

    def after_step(self, step: int, strategy) -> bool:
        """Call after each trainer step; reincarnates at step T. True when it did."""
        if self.step is None or step != self.step:
            return False
        from safetensors.torch import save_model

        model = self.ctx.model
        if self.ctx.ref_model is not None:
            self.ctx.ref_model.load_state_dict(model.state_dict())
            save_model(model, str(self.path))
        if hasattr(strategy, "reincarnate"):
            strategy.reincarnate()
        return True

    def restore(self, step: int) -> None:
        """On resume at ``step`` >= T: load pi_T as the base policy (the strategy's state comes back with
        the checkpoint)."""
        if self.step is None or step < self.step or self.ctx.ref_model is None:
            return
        from safetensors.torch import load_model

        load_model(self.ctx.ref_model, str(self.path))

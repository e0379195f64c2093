"""Configuration of ``offpolicy opa-dpo``: the run's usual sections plus an ``opa_dpo`` section for stages 1-3.

An OPA-DPO config file is a training config (:class:`~offpolicy.config.Config`: ``model``, ``tasks``,
``rollout``, ``reward``, ``algorithm``, ``train``, ``eval``, ``checkpoint``, ``run``, ...) with one more
section, ``opa_dpo``. How the sections are read:

- ``model``: the policy of stage 1 and the start of stage 3; ``model.lora`` (r > 0) makes stage 3 a LoRA
  fine-tune (merged into the saved folder) and stage 4 a LoRA DPO on top of it;
- ``tasks`` (not ``pairs``): the prompts and ground truths of stage 1 (training split) and the held-out
  tasks (``tasks.eval_size``) on which greedy accuracy is measured and held-out pairs are built;
- ``rollout.temperature / top_p / top_k / max_new_tokens``: stage 1's sampling; ``reward``: whether a
  generated answer is correct, and greedy accuracy;
- ``algorithm`` (default preset ``dpo``), ``train``, ``rollout.prompts_per_step`` (pairs per step),
  ``pipeline``, ``buffer``, ``eval``, ``checkpoint``, ``run.loggers``: stage 4, an ``offpolicy train`` run
  on the stage-2 pairs; ``run.dir``: the OPA-DPO run directory (stage folders inside).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from offpolicy.config import Config, ConfigError, _check_keys, _Section, _set_dotted, load_yaml, parse_override


class GenerateSettings(_Section):
    """Stage 1: the policy answers training prompts (``y_gen``)."""

    prompts: int = Field(2000, ge=1, description="Training prompts (the first of the tasks' training stream).")
    samples: int = Field(1, ge=1, description="Responses sampled per prompt, at rollout.temperature.")


class ReviseSettings(_Section):
    """Stage 2: a corrector revises each ``y_gen`` into ``y_rev``; pairs and SFT data are written."""

    corrector: str = Field("ground_truth", description="'ground_truth' (a wrong answer becomes the task's answer), 'model:DIR' (a stronger model keeps y_gen up to its first disagreement and continues greedily), or 'package.module:fn' with fn(prompt, response, answer) -> str | None.")
    chosen_span_weight: float = Field(2.5, ge=0, description="DPO token weight of the revised tokens of y_rev (the paper's scores span 1.0-2.5); other tokens 1.")
    rejected_span_weight: float = Field(2.5, ge=0, description="DPO token weight of the tokens of y_gen that the revision replaced or removed; other tokens 1.")
    gt_pairs: bool = Field(True, description="Also pair y_gt over y_gen (unweighted) where the ground truth differs from y_rev.")
    max_new_tokens: int = Field(16, ge=1, description="model:DIR corrector: tokens it may write after the kept prefix.")


class AlignSettings(_Section):
    """Stage 3: light supervised fine-tuning on ``y_gt`` and ``y_rev`` (LoRA when model.lora.r > 0)."""

    steps: int = Field(100, ge=0, description="Optimiser steps (AdamW, gradient clip 1).")
    lr: float = Field(3e-4, gt=0, description="Learning rate.")
    batch_size: int = Field(64, ge=1, description="Responses per step (drawn without replacement within a step).")


class OpaDpoSettings(_Section):
    generate: GenerateSettings = Field(GenerateSettings(), description="Stage 1.")
    revise: ReviseSettings = Field(ReviseSettings(), description="Stage 2.")
    align: AlignSettings = Field(AlignSettings(), description="Stage 3.")
    eval_pairs: str | None = Field(None, description="Held-out pairs file for stage 4's preference accuracy; None = the pairs stage 2 builds from the held-out tasks.")


class OpaDpoConfig(Config):
    """A training config plus the ``opa_dpo`` section (see the module docstring)."""

    opa_dpo: OpaDpoSettings = Field(OpaDpoSettings(), description="OPA-DPO's stages 1-3; read only by `offpolicy opa-dpo` (`offpolicy train` refuses the section as an unknown key).")


def load_opa_dpo_config(path=None, overrides=()) -> tuple[OpaDpoConfig, dict[str, Any]]:
    """(validated config, the raw settings it came from: file <- overrides, preset defaulting to dpo).
    Unknown keys and bad values are ConfigErrors as for ``offpolicy train``."""
    data: dict = load_yaml(path) if path else {}
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    if not isinstance(data.get("algorithm", {}), dict):
        raise ConfigError("algorithm: expected a section")
    data.setdefault("algorithm", {}).setdefault("preset", "dpo")
    _check_keys(data, OpaDpoConfig)
    try:
        cfg = OpaDpoConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid opa-dpo config{f' in {path}' if path else ''}:\n" + "\n".join(lines)) from None
    if cfg.tasks.name == "pairs":
        raise ConfigError("opa-dpo: tasks are the prompts the policy answers in stage 1 (arithmetic, file, hf, ...), "
                          "not tasks.name=pairs; stage 4's pairs are built by stage 2")
    if cfg.reward.model is not None:
        raise ConfigError(f"opa-dpo: reward.model={cfg.reward.model} is read by no stage: stage 1 marks answers right "
                          "or wrong with reward.function, and stage 4 trains on the stage-2 pairs (nothing is "
                          "scored); drop reward.model")
    if not cfg.run.save_final:
        raise ConfigError("opa-dpo: run.save_final=false: the DPO stage's final policy is the run's result (its "
                          "greedy accuracy is measured on it); leave run.save_final=true")
    return cfg, data

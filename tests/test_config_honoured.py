"""A config key set where no code reads it is refused when the config is read, naming the key (STYLE.md:
"a key that is accepted and read nowhere is a defect"). Each case below was accepted and had no effect
(or, for rollout.temperature with pairs, a wrong one); the combinations that are honoured stay accepted."""

from __future__ import annotations

import pytest

from offpolicy.config import ConfigError, load_config

PAIRS = ["tasks.name=pairs", "tasks.train_path=p.jsonl", "algorithm.preset=dpo"]
MULTI = ["workflow.name=multi_turn", "workflow.env=calculator"]


@pytest.mark.parametrize("overrides, message", [
    # preference pairs: nothing is sampled or scored, and DPO / IPO log-probs are untempered (TRL, OPA-DPO stage 4);
    # the trainer divided policy and reference log-probs by the temperature while held-out evaluation used 1
    ([*PAIRS, "rollout.temperature=0.7"], "rollout.temperature=0.7 is not read by tasks.name=pairs"),
    ([*PAIRS, "reward.model=runs/rm"], "reward.model is not read by tasks.name=pairs"),  # loaded, scored nothing
    ([*PAIRS, "rollout.top_p=0.9"], "rollout.top_p is not read by tasks.name=pairs"),
    ([*PAIRS, "rollout.top_k=4"], "rollout.top_k is not read by tasks.name=pairs"),
    ([*PAIRS, "rollout.engine=vllm"], "rollout.engine is not read by tasks.name=pairs"),
    ([*PAIRS, "rollout.kv_cache=static", "model.forward_impl=transformers"], "rollout.kv_cache is not read by"),
    ([*PAIRS, "reward.function=math"], "reward.function is not read by tasks.name=pairs"),
    ([*PAIRS, "reward.timeout_s=null"], "reward.timeout_s is not read by tasks.name=pairs"),
    ([*PAIRS, "workflow.max_turns=2"], "workflow.max_turns needs workflow.name=multi_turn"),
    # multi_turn: the environment scores the episode; the guarded reward / reward model is never called
    ([*MULTI, "reward.model=runs/rm"], "reward.model is not read by workflow.name=multi_turn"),
    ([*MULTI, "reward.timeout_s=1"], "reward.timeout_s is not read by workflow.name=multi_turn"),
    ([*MULTI, "reward.max_timeouts=2"], "reward.max_timeouts is not read by workflow.name=multi_turn"),
    (["model.lora.alpha=32"], "model.lora.alpha is read only with model.lora.r > 0"),
    (["model.lora.target_modules=[q_proj]"], "model.lora.target_modules is read only with model.lora.r > 0"),
    (["train.min_lr_ratio=0.5"], "train.min_lr_ratio=0.5 is read only by train.lr_schedule=linear / cosine"),
    (["run.project=mine"], "run.project='mine' is read only by the trackers"),
    (["run.project=mine", "run.loggers=[]"], "run.project='mine' is read only by the trackers"),
    (["pipeline.max_staleness=3"], "pipeline.max_staleness is read only by pipeline.mode=async / ray"),
    (["pipeline.explorer_restarts=1"], "pipeline.explorer_restarts is read only by pipeline.mode=async / ray"),
    (["pipeline.explorer_threads=1"], "pipeline.explorer_threads is read only by pipeline.mode=async / ray"),
    (["tasks.train_path=t.jsonl"], "tasks.train_path is not read by tasks.name=arithmetic"),
    (["tasks.max_row_bytes=10"], "tasks.max_row_bytes is not read by tasks.name=arithmetic"),
    (["tasks.name=calculator", "tasks.eval_path=t.jsonl"], "tasks.eval_path is not read by tasks.name=calculator"),
    (["tasks.name=file", "tasks.train_path=t.jsonl", "tasks.levels=[1,2]"], "tasks.levels is not read by tasks.name=file"),
    (["tasks.name=file", "tasks.train_path=t.jsonl", "tasks.split=test"], "tasks.split is not read by tasks.name=file"),
    (["tasks.name=jsonl", "tasks.train_path=t.jsonl", "tasks.subset=main"], "tasks.subset is not read by tasks.name=jsonl"),
    (["tasks.name=hf", "tasks.train_path=ds", "tasks.levels=[2]"], "tasks.levels is not read by tasks.name=hf"),
])
def test_unread_key_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    # the aggregation of dpo / ipo has no max_len: nothing else reads the generation limit of a pairs run
    ([*PAIRS, "rollout.max_new_tokens=64"], "rollout.max_new_tokens=64 is not read by tasks.name=pairs"),
    (["algorithm.kl_estimator=k3"], "algorithm.kl_estimator=k3: the KL term is off"),  # grpo: kl_coef 0
    (["algorithm.preset=dpo", "workflow.name=online_pairs", "algorithm.kl_estimator=k2"], "the KL term is off"),
])
def test_unread_algorithm_key_is_refused_before_any_model(overrides, message):
    from offpolicy.pipeline.context import bind_algorithm

    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        bind_algorithm(cfg)


@pytest.mark.parametrize("overrides", [
    [*PAIRS, "rollout.temperature=1.0", "rollout.prompts_per_step=8", "tasks.eval_size=4"],
    ["rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=4"],  # sampled: read by engine and trainer
    ["reward.model=runs/rm", "reward.model_weight=2"],  # single_turn: the reward model scores the samples
    [*MULTI, "reward.max_invalid_frac=0.2"],  # environment faults count against it
    ["model.lora.r=4", "model.lora.alpha=32", "model.lora.target_modules=[q_proj]"],
    ["train.lr_schedule=cosine", "train.min_lr_ratio=0.5"],
    ["run.project=mine", "run.loggers=[wandb]"],
    ["pipeline.mode=async", "pipeline.max_staleness=3", "pipeline.explorer_restarts=1"],
    ["pipeline.mode=async", "pipeline.explorer_threads=1"],
    ["tasks.few_shot=shots.jsonl", "tasks.prompt_key=q"],  # generated tasks, worked examples from a file
    ["tasks.name=hf", "tasks.train_path=ds", "tasks.split=test", "tasks.subset=main", "tasks.max_row_bytes=10"],
    ["tasks.name=file", "tasks.train_path=t.jsonl", "tasks.max_row_bytes=10", "tasks.eval_path=e.jsonl"],
])
def test_honoured_combinations_still_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["algorithm.kl_estimator=k3", "algorithm.kl_coef=0.1"],
    ["algorithm.preset=dr_grpo", "rollout.max_new_tokens=9"],  # Dr. GRPO's constant normaliser reads it
    [*PAIRS],
])
def test_honoured_algorithm_keys_bind(overrides):
    from offpolicy.pipeline.context import bind_algorithm

    bind_algorithm(load_config(None, overrides))


def test_unread_pairs_key_stops_train_before_anything_runs(tmp_path, capsys):
    from offpolicy.cli import main

    rc = main(["train", *PAIRS, "rollout.temperature=0.5", f"run.dir={tmp_path / 'run'}"])
    assert rc == 2 and "rollout.temperature=0.5 is not read by tasks.name=pairs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_tasks_switch_resets_keys_the_new_source_does_not_read():
    """`offpolicy eval --tasks arithmetic` on a file config, `--tasks FILE` on an arithmetic config with
    levels: the config's keys for the old source would be refused, so --tasks puts them back to defaults."""
    from offpolicy.cli import _eval_task_overrides

    cfg = load_config(None, ["tasks.name=hf", "tasks.train_path=ds", "tasks.split=test", "tasks.subset=main",
                             *_eval_task_overrides("arithmetic")])
    assert (cfg.tasks.name, cfg.tasks.train_path, cfg.tasks.split, cfg.tasks.subset) == ("arithmetic", None, "train", None)
    cfg = load_config(None, ["tasks.levels=[1,2]", *_eval_task_overrides("held.jsonl")])
    assert (cfg.tasks.name, cfg.tasks.levels, cfg.tasks.eval_path) == ("file", [1], "held.jsonl")

"""The trainer side shared by every runner: train on a batch of experiences, log, evaluate, save.

Per step it writes one ``kind="train"`` record (reward, accuracy, entropy, loss statistics,
staleness histogram, timings) and, at the start / every ``eval.every`` steps / the end, one
``kind="eval"`` record with the held-out greedy accuracy.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from offpolicy.algos import tool_call_reward, tool_call_reward_weight
from offpolicy.config import shareable
from offpolicy.data.experience import Experience, collate
from offpolicy.pipeline.context import RunContext
from offpolicy.pipeline.resume import RunStopped
from offpolicy.rewards.guard import FirstFaults, GuardedReward, RewardFaultError
from offpolicy.rollout.model import save_policy
from offpolicy.rollout.engine import make_engine
from offpolicy.rollout.workflow import build_workflow, rows_per_step
from offpolicy.train.checkpoint import load_frozen
from offpolicy.train.evaluate import evaluate_workflow
from offpolicy.train.metrics import MetricsWriter, episode_metrics
from offpolicy.train.step import train_step


@dataclass
class RunResult:
    run_dir: Path
    eval_before: dict
    eval_after: dict
    steps: int
    seconds: float


def batch_metrics(exps: list[Experience], trainer_version: int) -> dict:
    """Reward, accuracy, length and staleness (trainer version - generating version) of a batch.

    ``reward_scored``: samples whose reward was computed; the rest are counted per kind in ``reward_faults/*``."""
    valid = [e for e in exps if "reward_fault" not in e.info] or exps
    rewards = torch.tensor([e.reward for e in valid])
    faults = Counter(e.info["reward_fault"] for e in exps if "reward_fault" in e.info)
    lengths = torch.tensor([len(e.response_ids) for e in exps], dtype=torch.float32)
    ages = [trainer_version - e.version for e in exps]
    out = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(valid) > 1 else 0.0,
        "reward_invalid_frac": sum(faults.values()) / len(exps), "reward_scored": len(exps) - sum(faults.values()),
        "accuracy": sum(bool(e.info.get("correct")) for e in exps) / len(exps),
        "response_len": float(lengths.mean()), "response_tokens": int(lengths.sum()), "samples": len(exps),
        "staleness_min": min(ages), "staleness_mean": sum(ages) / len(ages), "staleness_max": max(ages),
        "replayed_frac": sum(e.replayed for e in exps) / len(exps),
        "fresh_samples": sum(not e.replayed for e in exps),  # rollouts generated for this step
    }
    out.update({f"staleness_count/{age}": n for age, n in sorted(Counter(ages).items())})
    out.update({f"reward_faults/{kind}": n for kind, n in sorted(faults.items())})
    out.update(episode_metrics(exps))
    return out


def _tool_calls_run(e: Experience) -> int:
    """The episode's tool calls the environment ran: those parsed, less those it refused past
    ``max_calls_per_turn`` (they get no result, so they are no tool interaction to reward)."""
    episode = e.info.get("episode", {})
    return episode.get("tool_calls", 0) - episode.get("tool_errors/too_many_calls", 0)


class NumericalFaultError(RuntimeError):
    """More than ``train.max_skipped_steps`` consecutive steps had a non-finite loss or gradient."""


class TrainLoop:
    """Owns the metrics writer and the progress bar; :meth:`step` is the step body every runner shares.

    ``strategy``: the run's sample strategy (ReMix reincarnation resets it); ``resumed``: the checkpoint
    state of a resumed run (its evaluation before training is reused); ``step_fn``: what trains one batch,
    called as :func:`~offpolicy.train.step.train_step` is (a data-parallel trainer group passes its own).
    """

    def __init__(self, ctx: RunContext, strategy=None, *, progress=None, resumed: dict | None = None,
                 step_fn=train_step):
        from offpolicy.pipeline.replay import Reincarnation

        self.ctx = ctx
        self.cfg = ctx.cfg
        self.strategy = strategy
        self.step_fn = step_fn
        self.writer = MetricsWriter(ctx.run_dir, loggers=self.cfg.run.loggers,
                                    config=shareable(self.cfg.model_dump(mode="json")), project=self.cfg.run.project)
        self.progress = progress
        if progress:  # before the first evaluation, so that its line goes to the run's log
            progress.begin(ctx.run_dir, self.cfg.train.steps, done=resumed["step"] if resumed else 0)
        self.start = time.perf_counter()
        self.consecutive_skips = 0
        self.resumed = resumed
        self.scorer = GuardedReward.from_config(ctx.reward_fn, self.cfg.reward, on_fault=FirstFaults(
            ctx.run_dir / "reward_faults.log", during="evaluation"))
        # held-out evaluation goes through the run's own engine and workflow, greedily
        self.engine = make_engine(self.cfg.rollout, ctx.model, ctx.tokenizer, seed=self.cfg.train.seed)
        self.workflow = build_workflow(self.cfg.workflow)
        self.rows = rows_per_step(self.workflow, self.cfg.rollout.prompts_per_step, self.cfg.rollout.group_size)
        self.reincarnation = Reincarnation(ctx, ctx.algo.settings.get("reincarnation_step"))
        if resumed:
            self.reincarnation.restore(resumed["step"])
        # KL-Convex reads pi_{k-1}: a frozen copy kept one step behind the policy (see train)
        self.prev_model = None
        if ctx.plan.prev_logp != "unused":
            import copy

            self.prev_model = copy.deepcopy(ctx.model).eval().requires_grad_(False)
            if resumed and not load_frozen(resumed["path"], "prev_policy", self.prev_model):
                import warnings

                warnings.warn(f"{resumed['path']} holds no pi_(k-1) (written before checkpoints kept it): KL-Convex "
                              "resumes with pi_(k-1) = the restored policy", stacklevel=2)
        self.ref_cache = None  # reference log-probs of responses seen again (pairs over epochs), computed once
        if ctx.plan.ref_logp != "unused":
            from offpolicy.pipeline.ref_cache import RefCache

            self.ref_cache = RefCache(ctx.ref_model, pad_id=ctx.tokenizer.pad_token_id, temperature=ctx.plan.temperature)
        self.governor = None  # automatic thread count: adapts to what other processes leave free
        if self.cfg.train.threads is None:
            from offpolicy.threads import ThreadGovernor

            self.governor = ThreadGovernor(torch.get_num_threads())
        self.sil = None  # SPEAR self-imitation (its buffer is part of the checkpoint)
        if "self_imitation" in ctx.algo.settings:
            from offpolicy.pipeline.self_imitation import SelfImitation

            self.sil = SelfImitation(ctx.algo.settings["self_imitation"], agg_fn=ctx.algo.agg_fn, plan=ctx.plan,
                                     batch_size=self.rows, seed=self.cfg.train.seed)
            if resumed and resumed.get("self_imitation"):
                self.sil.load_state_dict(resumed["self_imitation"])
        if resumed:
            self.eval_before, self.last_eval = resumed["eval_before"], resumed["last_eval"]
        else:
            self.eval_before = self.evaluate(0)
            self.last_eval = self.eval_before["accuracy"]

    def evaluate(self, step: int) -> dict:
        t0 = time.perf_counter()
        if hasattr(self.workflow, "evaluate"):  # a workflow with its own held-out measure (preference pairs)
            res = self.workflow.evaluate(self.ctx, self.ctx.eval_tasks)
        else:
            self.engine.update_weights(self.ctx.model, step)  # an engine with its own weight copy (vLLM)
            res = evaluate_workflow(self.ctx.model, self.engine, self.workflow, self.ctx.tokenizer,
                                    self.ctx.eval_tasks, self.scorer, max_new_tokens=self.cfg.rollout.max_new_tokens)
        seconds = time.perf_counter() - t0
        self.writer.write({"kind": "eval", "step": step, **res, "eval_s": seconds})
        if self.progress:
            self.progress.evaluated(step, res, seconds)
        return res

    def train(self, exps: list[Experience], step: int) -> dict:
        """Train step ``step`` (1-based; trainer version ``step - 1`` before it) on ``exps``; its record."""
        ctx = self.ctx
        t0 = time.perf_counter()
        metrics = batch_metrics(exps, step - 1)  # of the task reward, before any shaping
        tool = ctx.algo.settings.get("tool_reward")
        if tool is not None:  # SPEAR's intrinsic tool-call reward, decaying over tool.horizon steps
            bonus = [tool_call_reward(_tool_calls_run(e), step, tool.horizon, coef=tool.coef, max_calls=tool.max_calls)
                     for e in exps]
            exps = [replace(e, reward=e.reward + b) for e, b in zip(exps, bonus)]
            metrics.update(tool_reward_mean=sum(bonus) / len(bonus),
                           tool_reward_weight=tool_call_reward_weight(step, tool.horizon))
        if self.ref_cache is not None:
            exps = self.ref_cache.fill(exps)
        batch = collate(exps, ctx.tokenizer.pad_token_id)
        start = None  # pi_k, which becomes pi_{k-1} for the next step
        if self.prev_model is not None:
            start = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        stats = self.step_fn(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan, ref_model=ctx.ref_model,
                           prev_model=self.prev_model, step=step)
        if self.sil is not None:
            stats.update(self.sil.after_step(ctx, exps, ctx.algo.adv_fn(batch.rewards_B, batch.group_ids_B), step,
                                             step_fn=self.step_fn))
        ctx.scheduler.step()
        if start is not None:
            self.prev_model.load_state_dict(start)
        return {"kind": "train", "step": step, "version": step - 1, **metrics, **stats,
                "train_s": time.perf_counter() - t0}

    def frozen_models(self) -> dict:
        """The models a checkpoint saves beside the policy: KL-Convex's pi_{k-1} (``prev_policy``), if kept."""
        return {} if self.prev_model is None else {"prev_policy": self.prev_model}

    def state_dict(self) -> dict:
        """The trainer-side state a checkpoint needs beyond weights and optimiser."""
        state = {"eval_before": self.eval_before, "last_eval": self.last_eval}
        if self.sil is not None:
            state["self_imitation"] = self.sil.state_dict()
        return state

    def step(self, step: int, exps: list[Experience], t0: float, timings: dict, *, save, stop,
             after_train=None) -> None:
        """The step body shared by the runners: train on ``exps``, reincarnate (ReMix), run the runner's
        ``after_train`` hook (returns more timings, e.g. the async weight publish), log with ``step_s``
        counted from ``t0``, checkpoint when due or asked, and stop on a signal (``stop.requested``).
        ``save(step)`` writes a checkpoint; a numerical fault checkpoints the last good state first."""
        record = self.train(exps, step)
        if self.governor is not None:
            record["threads"] = self.governor.tick(step)
        if self.reincarnation.after_step(step, self.strategy):
            record["reincarnated"] = 1
            if self.ref_cache is not None:
                self.ref_cache.clear()  # the reference changed
        if after_train is not None:
            timings = {**timings, **after_train()}
        try:
            self.log(record, {**timings, "step_s": time.perf_counter() - t0})
        except (NumericalFaultError, RewardFaultError):
            save(step)  # skipped steps left the weights as they were; a reward that stalls the evaluation
            raise
        if stop.requested or (self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0):
            save(step)
        if stop.requested:
            raise RunStopped(f"stopped by {stop.requested} after step {step}; checkpoint written, "
                             f"resume with: offpolicy train --resume {self.ctx.run_dir}")

    def log(self, record: dict, timings: dict) -> None:
        """Add the runner's timings (``step_s``: wall seconds of the whole step), write, evaluate, show."""
        record = {**record, **timings}
        record["samples_per_s"] = record["samples"] / max(record["step_s"], 1e-9)
        record["tokens_per_s"] = record["response_tokens"] / max(record["step_s"], 1e-9)
        self.writer.write(record)
        step = record["step"]
        self._check_skips(record)
        if self.progress:  # the step's line before its evaluation's
            self.progress.update(step, record)
        if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step != self.cfg.train.steps:
            self.last_eval = self.evaluate(step)["accuracy"]

    def _check_skips(self, record: dict) -> None:
        if not record.get("skipped_steps"):
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        batch = {k: record[k] for k in ("reward_mean", "reward_std", "response_len", "adv_abs_mean", "loss",
                                        "grad_norm") if k in record}
        say = self.progress.line if self.progress else print  # timestamped and in run.log when there is one
        say(f"step {record['step']}: non-finite loss or gradient, optimiser step skipped "
            f"({self.consecutive_skips} in a row); batch statistics {batch}")
        if self.consecutive_skips > self.cfg.train.max_skipped_steps:
            raise NumericalFaultError(
                f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient (more than "
                f"train.max_skipped_steps={self.cfg.train.max_skipped_steps}); last batch statistics {batch}")

    def finish(self) -> RunResult:
        r = self.resumed
        if r and r["step"] >= self.cfg.train.steps and r.get("eval_after"):  # resumed a finished run
            return RunResult(self.ctx.run_dir, self.eval_before, r["eval_after"], self.cfg.train.steps,
                             time.perf_counter() - self.start)
        after = self.evaluate(self.cfg.train.steps)
        if self.cfg.run.save_final:  # a plain HF folder; under LoRA merged, with the adapter in final/adapter
            save_policy(self.ctx.model, self.ctx.tokenizer, self.ctx.run_dir / "final")
        return RunResult(self.ctx.run_dir, self.eval_before, after, self.cfg.train.steps,
                         time.perf_counter() - self.start)

    def close(self) -> None:
        self.scorer.close()
        self.engine.close()
        self.writer.close()
        if self.progress:
            self.progress.stop()

"""Benchmark: offpolicy against TRL's GRPOTrainer on the same model, tasks, batch and loss (CPU).

    .venv/bin/python benchmarks/vs_trl.py [--steps 400] [--seeds 0] [--eval-every 10] [--quick]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: TRL). Every run is its own subprocess
(torch threads and memory do not leak between them), in the order TRL, offpolicy, TRL, ... per seed:

- ``trl``: ``trl.GRPOTrainer`` on the bundled model, ``loss_type="dapo"`` (token mean over the batch),
  ``beta=0``, epsilon 0.2, group-std advantages, the arithmetic stream's prompts in stream order
  (``shuffle_dataset=False``) and a reward that is offpolicy's ``exact_match`` on the decoded completion.
- ``offpolicy``: ``offpolicy.pipeline.run`` in sync mode with the ``grpo`` preset: the same computation.
- the off-policy candidates (async with ``sync_offset=1`` and/or reuse ``train.updates_per_batch=2``).

Each run evaluates held-out greedy accuracy (the demo's 512 tasks, ``offpolicy.train.evaluate``) at
step 0, every ``--eval-every`` steps and at the end; evaluation time is excluded from every timing.
Reports the median step seconds after a 10-step warm-up (TRL: optimiser step end to the next one,
from a TrainerCallback, with a breakdown into generation / forward / backward / optimiser / the
rest), their ratio, accuracy at equal rollouts, and the training seconds each run needs to reach
TRL's final accuracy. Writes ``benchmarks/out/vs_trl/{result.json, summary.md}`` and prints the summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP = 10
THREADS = 2
# The shared setup; offpolicy's defaults already equal it (checked in _offpolicy_worker).
SETUP = {"prompts_per_step": 32, "group_size": 8, "max_new_tokens": 5, "temperature": 1.0, "lr": 3e-4,
         "betas": (0.9, 0.99), "grad_clip": 1.0, "eps": 0.2, "task_seed": 0, "levels": [1]}
SMOOTH = 3  # evaluations averaged for the target and its crossing (one evaluation moves by +-0.02-0.03)
# offpolicy configurations; LIKE computes what TRL computes, the others are candidates for time-to-target.
LIKE = "grpo sync"
ASYNC = ["pipeline.mode=async", "pipeline.sync_offset=1", "train.threads=1", "pipeline.explorer_threads=1"]
REC = ["algorithm.preset=rec_oneside_nois"]
CANDIDATES = {
    LIKE: [],
    "grpo sync reuse2": ["train.updates_per_batch=2"],
    "rec_oneside_nois sync": REC,
    "rec_oneside_nois async1": [*REC, *ASYNC],
    "rec_oneside_nois async1 reuse2": [*REC, "train.updates_per_batch=2", *ASYNC],
    # the defaults run the lean forward on the bundled model (model.forward_impl=auto); this one the model's own
    "grpo sync transformers": ["model.forward_impl=transformers"],
}


# ----------------------------------------------------------------------------------------- workers


def _eval_tasks():
    from offpolicy.config import load_config
    from offpolicy.pipeline.context import task_source

    return task_source(load_config(None, [f"tasks.seed={SETUP['task_seed']}"]))


# GRPOTrainer methods timed in the TRL run -> phase names (generate and reward run inside prepare,
# prepare and forward inside training_step; backward = training_step - prepare - forward)
PHASES = {"_generate_single_turn": "generate", "_calculate_rewards": "reward",
          "_generate_and_score_completions": "prepare", "compute_loss": "forward", "training_step": "training_step"}


def _timed(fn, name: str, parts: dict):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            with record_function(f"phase:{name}"):  # labels the phase in a --profile table
                return fn(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def _trl_worker(spec: dict) -> dict:
    """One TRL GRPOTrainer run; per-step timings (with a breakdown) and held-out accuracies."""
    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from offpolicy.rewards.exact_match import exact_match
    from offpolicy.rollout.model import load_policy
    from offpolicy.train.evaluate import evaluate

    steps, P, K = spec["steps"], SETUP["prompts_per_step"], SETUP["group_size"]
    stream, held_out = _eval_tasks()
    tasks = [next(stream) for _ in range(steps * P)]  # the offpolicy explorer's prompts, in its order
    data = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in tasks])
    model, tok = load_policy("bundled")
    model.train()

    def exact_match_reward(prompts, completions, answer, **_):
        return [exact_match(c, a) for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(Path(spec["dir"]) / "trl-out"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=spec["seed"], max_steps=steps, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=P * K, gradient_accumulation_steps=1, num_generations=K,
        max_completion_length=SETUP["max_new_tokens"], temperature=SETUP["temperature"], top_p=1.0, top_k=0,
        shuffle_dataset=False, learning_rate=SETUP["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=SETUP["betas"][0], adam_beta2=SETUP["betas"][1], weight_decay=0.0,
        optim="adamw_torch_fused",  # transformers' default (torch >= 2.8) and offpolicy's train.optimizer_impl=auto
        max_grad_norm=SETUP["grad_clip"], loss_type="dapo", beta=0.0, epsilon=SETUP["eps"],
        epsilon_high=SETUP["eps"], scale_rewards="group", num_iterations=1, mask_truncated_completions=False,
    )
    assert args.generation_batch_size == P * K and args.steps_per_generation == 1, "one generation per step"

    parts: dict[str, float] = {}  # seconds per phase in the current step (phases nest)

    class Timed(GRPOTrainer):
        """GRPOTrainer with wall-clock timers around its phases; nothing else changes."""

    for attr, name in PHASES.items():
        setattr(Timed, attr, _timed(getattr(GRPOTrainer, attr), name, parts))

    rec = {"steps": [], "evals": [], "logs": []}
    clock = {"train_s": 0.0}

    class Probe(TrainerCallback):
        def _eval(self, step, model):
            t0 = time.perf_counter()
            acc = evaluate(model, tok, held_out, exact_match, max_new_tokens=SETUP["max_new_tokens"])["accuracy"]
            rec["evals"].append({"step": step, "accuracy": acc, "train_s": clock["train_s"],
                                 "eval_s": time.perf_counter() - t0})

        def on_train_begin(self, args, state, control, model=None, **kw):
            ckpt = getattr(model, "is_activation_checkpointing", None)
            rec["model"] = {"dtype": str(next(model.parameters()).dtype), "checkpointing": ckpt,
                            "optimizer": type(kw["optimizer"]).__name__ if kw.get("optimizer") else None}
            self._eval(0, model)
            clock["last"] = time.perf_counter()  # the first step's interval starts here

        def on_step_begin(self, args, state, control, **kw):
            if spec.get("profile") and state.global_step == WARMUP:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            clock["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            clock["pre_opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            now = time.perf_counter()
            step_s = now - clock["last"]
            clock["train_s"] += step_s
            ts = parts.pop("training_step", 0.0)
            prep, fwd = parts.pop("prepare", 0.0), parts.pop("forward", 0.0)
            gen, rew = parts.pop("generate", 0.0), parts.pop("reward", 0.0)
            rec["steps"].append({
                "step": state.global_step, "step_s": step_s, "inner_s": now - clock["begin"],
                "gen_s": gen, "reward_s": rew, "score_other_s": prep - gen - rew, "forward_s": fwd,
                "backward_s": ts - prep - fwd, "clip_s": clock["pre_opt"] - clock["begin"] - ts,
                "optim_s": now - clock["pre_opt"], "outside_s": step_s - (now - clock["begin"]),
                "threads": torch.get_num_threads()})
            if spec.get("profile") and state.global_step == steps:
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
                (Path(spec["dir"]) / "trl_profile.txt").write_text(table)
            if state.global_step % spec["eval_every"] == 0 or state.global_step == steps:
                self._eval(state.global_step, model)
            clock["last"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            rec["logs"].append({"step": state.global_step, **{k: v for k, v in (logs or {}).items()
                                                            if isinstance(v, (int, float))}})

    trainer = Timed(model=model, reward_funcs=exact_match_reward, args=args, train_dataset=data,
                    processing_class=tok, callbacks=[Probe()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return rec


def _offpolicy_worker(spec: dict) -> dict:
    """One offpolicy run through ``offpolicy.pipeline.run``; its metrics.jsonl, with cumulative seconds."""
    from offpolicy.config import load_config
    from offpolicy.pipeline import run as run_pipeline
    from offpolicy.train.metrics import read_metrics

    overrides = [f"train.steps={spec['steps']}", f"train.seed={spec['seed']}", f"tasks.seed={SETUP['task_seed']}",
                 f"eval.every={spec['eval_every']}", "checkpoint.every=0", "run.loggers=[]",
                 "run.progress=false", "run.save_final=false", f"run.dir={Path(spec['dir']) / 'run'}",
                 f"train.threads={THREADS}", *spec["overrides"]]
    cfg = load_config(None, overrides)
    r, t = cfg.rollout, cfg.train
    assert (r.prompts_per_step, r.group_size, r.max_new_tokens, r.temperature, t.lr, tuple(t.betas), t.grad_clip,
            cfg.tasks.levels) == tuple(SETUP[k] for k in ("prompts_per_step", "group_size", "max_new_tokens",
                                                          "temperature", "lr", "betas", "grad_clip", "levels"))
    res = run_pipeline(cfg, log=lambda *a: None)
    train = read_metrics(res.run_dir, "train")
    cum, at = 0.0, {}
    for row in train:
        cum += row["step_s"]
        at[row["step"]] = cum
    keep = ("step", "step_s", "gen_s", "train_s", "buffer_s", "trainer_idle_s", "reward_mean")
    return {"steps": [{k: row[k] for k in keep if k in row} for row in train],
            "evals": [{"step": e["step"], "accuracy": e["accuracy"], "train_s": at.get(e["step"], 0.0),
                       "eval_s": e["eval_s"]} for e in read_metrics(res.run_dir, "eval")]}


# ----------------------------------------------------------------------------------------- summary


TRL_PARTS = ("gen_s", "reward_s", "score_other_s", "forward_s", "backward_s", "clip_s", "optim_s", "outside_s")


def _median(runs: list[dict], key: str) -> float:
    """Median of ``key`` over the steps after warm-up, per run, averaged over the runs (seeds)."""
    return _mean(statistics.median(s[key] for s in r["steps"][WARMUP:]) for r in runs)


def _smoothed(run: dict, window: int) -> list[tuple[int, float, float]]:
    """(step, training seconds, mean accuracy of this and the window - 1 previous evaluations) after step 0."""
    ev = [e for e in run["evals"] if e["step"] > 0]
    return [(ev[i]["step"], ev[i]["train_s"], sum(e["accuracy"] for e in ev[i - window + 1 : i + 1]) / window)
            for i in range(window - 1, len(ev))]


def _reach(run: dict, target: float, window: int) -> tuple[int | None, float | None]:
    """(step, training seconds) when the smoothed accuracy first reaches ``target``; (None, None) if never."""
    return next(((step, t) for step, t, acc in _smoothed(run, window) if acc >= target - 1e-9), (None, None))


def _mean(xs):
    xs = list(xs)
    return None if not xs or any(x is None for x in xs) else sum(xs) / len(xs)


def _std(xs):
    xs = list(xs)
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _fmt(x, spec=".1f", none="never"):
    return none if x is None else format(x, spec)


def _estimate(run: dict, step: int | None, median_s: float) -> float | None:
    """Seconds to ``step`` robust to bursts of load from other processes: the warm-up steps as measured
    (start-up such as the async explorer's spawn is real), then the run's median step for the rest."""
    return None if step is None else sum(s["step_s"] for s in run["steps"][:WARMUP]) + (step - WARMUP) * median_s


def _run_summary(rs: list[dict], target: float, target_raw: float) -> dict:
    med = [_median([r], "step_s") for r in rs]
    reach = [_reach(r, target, SMOOTH) for r in rs]
    return {
        "median_step_s": _mean(med), "median_step_s_per_seed": med,
        "first_step_s": _mean(r["steps"][0]["step_s"] for r in rs),
        "final_accuracy_mean": _mean(r["evals"][-1]["accuracy"] for r in rs),
        "final_accuracy_std": _std(r["evals"][-1]["accuracy"] for r in rs),
        "final_accuracy_smoothed": _mean(_smoothed(r, SMOOTH)[-1][2] for r in rs),
        "train_s_total": _mean(r["evals"][-1]["train_s"] for r in rs),
        "steps_to_target": _mean(step for step, _ in reach),
        "time_to_target_s": _mean(t for _, t in reach),
        "time_to_target_est_s": _mean(_estimate(r, step, m) for r, (step, _), m in zip(rs, reach, med)),
        "time_to_target_raw_s": _mean(_reach(r, target_raw, 1)[1] for r in rs),
        "accuracy_by_step": {e["step"]: _mean(r["evals"][i]["accuracy"] for r in rs)
                             for i, e in enumerate(rs[0]["evals"])},
    }


def summarise(runs: dict[str, list[dict]], meta: dict) -> tuple[dict, str]:
    """Step medians, accuracies, and time to TRL's final accuracy (smoothed over SMOOTH evaluations)."""
    trl, like = runs["trl"], runs[LIKE]
    target, target_raw = (_mean(_smoothed(r, w)[-1][2] for r in trl) for w in (SMOOTH, 1))
    out = {"meta": meta, "target_accuracy": target, "target_accuracy_raw": target_raw,
           "runs": {name: _run_summary(rs, target, target_raw) for name, rs in runs.items()}}
    s = out["runs"]
    t = s["trl"]
    # TRL's time to its own final accuracy is its whole run (the acceptance definition); keep its first crossing
    first_est = _mean(_estimate(r, _reach(r, target, SMOOTH)[0], m) for r, m in zip(trl, t["median_step_s_per_seed"]))
    t.update(first_crossing_s=t["time_to_target_s"], first_crossing_est_s=first_est,
             first_crossing_step=t["steps_to_target"], steps_to_target=meta["steps"],
             time_to_target_s=t["train_s_total"], time_to_target_raw_s=t["train_s_total"],
             time_to_target_est_s=_mean(_estimate(r, meta["steps"], m) for r, m in zip(trl, t["median_step_s_per_seed"])))
    out["trl_breakdown_median_s"] = {k: _median(trl, k) for k in TRL_PARTS}
    out["offpolicy_breakdown_median_s"] = {k: _median(like, k) for k in ("gen_s", "buffer_s", "train_s")}
    out["step_ratio_trl_over_offpolicy"] = t["median_step_s"] / s[LIKE]["median_step_s"]
    cands = {n: v for n, v in s.items() if n != "trl" and v["time_to_target_est_s"] is not None}
    best = min(cands, key=lambda n: cands[n]["time_to_target_est_s"]) if cands else None
    out["best"] = best
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    if best:
        b = cands[best]
        # each seed against its own TRL run: that run's final accuracy (last-SMOOTH mean) and whole run
        paired = []
        for tr, cand in zip(trl, runs[best]):
            t_s = _reach(cand, _smoothed(tr, SMOOTH)[-1][2], SMOOTH)[1]
            paired.append(ratio(tr["evals"][-1]["train_s"], t_s))
        out["speedup_paired_per_seed"] = paired
        out["speedup"] = {"vs_trl_run": ratio(t["time_to_target_s"], b["time_to_target_s"]),
                          "vs_trl_run_est": ratio(t["time_to_target_est_s"], b["time_to_target_est_s"]),
                          "vs_trl_first_crossing": ratio(t["first_crossing_s"], b["time_to_target_s"]),
                          "vs_trl_first_crossing_est": ratio(t["first_crossing_est_s"], b["time_to_target_est_s"])}

    m = meta
    lines = [f"# offpolicy vs TRL GRPOTrainer ({m['steps']} steps x {SETUP['prompts_per_step']}x{SETUP['group_size']} "
             f"rollouts, seeds {m['seeds']}, {THREADS} torch threads, {m['date']})", "",
             f"trl {m['trl']}, transformers {m['transformers']}, torch {m['torch']}, {m['cpus']} CPUs; load average "
             "(1, 5, 15 min) before / after: " + " / ".join(", ".join(f"{x:.2f}" for x in m[k])
                                                          for k in ("load_before", "load_after")), "",
             f"Median step seconds (after {WARMUP} warm-up steps; mean of per-seed medians): TRL "
             f"{t['median_step_s']:.3f}, offpolicy ({LIKE}) {s[LIKE]['median_step_s']:.3f}: TRL / offpolicy = "
             f"**{out['step_ratio_trl_over_offpolicy']:.2f}**", "",
             f"Target: TRL's final held-out accuracy, mean of its last {SMOOTH} evaluations = {target:.3f} (last "
             f"evaluation alone: {target_raw:.3f}). Seconds are training seconds (evaluation excluded); 'est.' = "
             f"the first {WARMUP} steps as measured + the rest x the run's median step (robust to bursts of load "
             "from other processes).", "",
             f"| run | median step s | final acc. (mean ± std) | last-{SMOOTH} mean | training s | steps to target | "
             "s to target | s to target, est. | s to target (one eval) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        lines.append(f"| {name} | {v['median_step_s']:.3f} | {v['final_accuracy_mean']:.3f} ± "
                     f"{v['final_accuracy_std']:.3f} | {v['final_accuracy_smoothed']:.3f} | {v['train_s_total']:.1f} | "
                     f"{_fmt(v['steps_to_target'], '.0f')} | {_fmt(v['time_to_target_s'])} | "
                     f"{_fmt(v['time_to_target_est_s'])} | {_fmt(v['time_to_target_raw_s'])} |")
    sp = out.get("speedup", {})
    lines += ["", f"TRL's own first crossing of the target: step {_fmt(t['first_crossing_step'], '.0f')}, "
              f"{_fmt(t['first_crossing_s'])} s (est. {_fmt(t['first_crossing_est_s'])} s).",
              f"Best off-policy configuration (by the estimate): **{best}**, time to the target "
              f"{_fmt(sp.get('vs_trl_run'), '.2f')}x shorter than TRL's whole run (est. "
              f"{_fmt(sp.get('vs_trl_run_est'), '.2f')}x), {_fmt(sp.get('vs_trl_first_crossing'), '.2f')}x shorter "
              f"than TRL's first crossing (est. {_fmt(sp.get('vs_trl_first_crossing_est'), '.2f')}x). Each seed "
              "against its own TRL run (that run's final accuracy, its whole run): " + ", ".join(
                  f"seed {seed} {_fmt(x, '.2f')}x" for seed, x in zip(m["seeds"], out.get("speedup_paired_per_seed", []))),
              "",
              "Held-out greedy accuracy at equal rollouts (step x 256, mean over seeds):", "",
              "| step | " + " | ".join(s) + " |", "|---|" + "---|" * len(s)]
    stride = max(m["eval_every"], m["steps"] // 8 // m["eval_every"] * m["eval_every"])
    for step in t["accuracy_by_step"]:
        if step % stride == 0 or step == m["steps"]:
            lines.append(f"| {step} | " + " | ".join(_fmt(v["accuracy_by_step"].get(step), ".3f", "")
                                                     for v in s.values()) + " |")
    b, o = out["trl_breakdown_median_s"], out["offpolicy_breakdown_median_s"]
    lines += ["", "TRL step, median seconds: " + ", ".join(f"{k[:-2]} {v:.4f}" for k, v in b.items()),
              f"offpolicy ({LIKE}) step, median seconds: " + ", ".join(f"{k[:-2]} {v:.4f}" for k, v in o.items()),
              "", "Per run (seed: median step s, load average before -> after, process s): " + "; ".join(
                  f"{n} s{r['seed']}: {_median([r], 'step_s'):.3f}, {r['load'][0]:.1f} -> {r['load'][1]:.1f}, "
                  f"{r['process_wall_s']:.0f}" for n, rs in runs.items() for r in rs)]
    return out, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- driver


def _spawn(kind: str, spec: dict, log: Path) -> dict:
    path = Path(spec["dir"]) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {kind} {spec}\n")
        f.flush()
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                              stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode}); see {log}")
    res = json.loads(path.read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--quick", action="store_true", help="30 steps, one seed: checks that everything runs")
    ap.add_argument("--profile", action="store_true",
                    help=f"only profile TRL: torch.profiler over steps {WARMUP + 1}-{WARMUP + 10}, table to --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "vs_trl"))
    ap.add_argument("--worker", choices=["trl", "offpolicy"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        res = (_trl_worker if args.worker == "trl" else _offpolicy_worker)(spec)
        (Path(spec["dir"]) / "result.json").write_text(json.dumps(res))
        return
    if args.quick:
        args.steps, args.seeds = 30, args.seeds[:1]
    if LIKE not in args.candidates:
        args.candidates.insert(0, LIKE)

    import torch
    import transformers
    import trl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "workers.log"
    log.write_text("")
    meta = {"steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every, "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "setup": SETUP,
            "candidates": {n: CANDIDATES[n] for n in args.candidates}, "load_before": os.getloadavg(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.profile:
        spec = {"steps": WARMUP + 10, "seed": args.seeds[0], "eval_every": WARMUP + 10, "profile": True,
                "dir": str(out / "runs" / stamp / "trl-profile"), "overrides": []}
        res = _spawn("trl", spec, log)
        print((Path(spec["dir"]) / "trl_profile.txt").read_text())
        print("TRL step, median seconds over the profiled steps (profiler overhead included): " + ", ".join(
            f"{k[:-2]} {_median([res], k):.4f}" for k in ("step_s", *TRL_PARTS)))
        return
    runs: dict[str, list[dict]] = {"trl": [], **{n: [] for n in args.candidates}}
    for seed in args.seeds:
        for name in runs:  # TRL, then each offpolicy configuration, per seed
            spec = {"steps": args.steps, "seed": seed, "eval_every": args.eval_every,
                    "dir": str(out / "runs" / stamp / f"{name.replace(' ', '_')}-s{seed}"),
                    "overrides": CANDIDATES.get(name, [])}
            t0, load = time.perf_counter(), os.getloadavg()[0]
            res = _spawn("trl" if name == "trl" else "offpolicy", spec, log)
            res.update(seed=seed, load=(load, os.getloadavg()[0]))
            runs[name].append(res)
            print(f"{name} seed {seed}: final accuracy {res['evals'][-1]['accuracy']:.3f}, median step "
                  f"{_median([res], 'step_s'):.3f} s, process {time.perf_counter() - t0:.0f} s", flush=True)
    meta["load_after"] = os.getloadavg()
    result, md = summarise(runs, meta)
    result["raw"] = runs
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(md)
    print(md)
    print(f"result: {out / 'result.json'}; summary: {out / 'summary.md'}; worker logs: {log}")


if __name__ == "__main__":
    main()

"""Benchmark: offline DPO through offpolicy against TRL's ``DPOTrainer`` on the same pairs (CPU).

    .venv/bin/python benchmarks/vs_trl_dpo.py [--steps 800] [--seeds 0 1] [--eval-every 50] [--threads 1]
    .venv/bin/python benchmarks/vs_trl_dpo.py --dry-run      # a few steps of each, in this process (tests)

Needs the ``bench`` extra (``pip install -e '.[bench]'``: TRL). Both sides compute the same thing:

- the bundled model (``bundled:tiny-arith``), its tokenizer, fp32, ``--threads`` torch threads each;
- arithmetic preference pairs (:func:`offpolicy.data.pairs.arithmetic_pairs`: correct answer chosen, the
  slipped or a nearby wrong answer rejected): 4,000 training pairs, 256 held-out pairs, written as a
  standard-format JSONL file that offpolicy reads (``tasks.name=pairs``);
- the pairs in the same order: offpolicy's own order (its task source, reshuffled each epoch from
  ``tasks.seed``), given to TRL as the order of its sampler over the 4,000 pairs; so step ``s`` of both
  sides trains on the same 32 pairs;
- the same token ids: prompt with the tokenizer's special tokens (``<bos>``), each response then EOS
  (checked pair by pair against TRL's tokenisation before any step);
- sigmoid DPO loss, beta 0.1, mean over the 32 pairs of a step; reference = the initial model, frozen;
- AdamW, the same lr / betas / eps, no weight decay, constant schedule, no warm-up, grad-norm clip 1.0,
  one optimiser step per batch, no gradient accumulation or checkpointing, no dropout.

TRL runs as configured for this (``use_cpu``, ``bf16=False``, no truncation or padding multiple,
``dataloader_num_workers=0``, logging once at the end, no saving, no evaluation loop), with
``precompute_ref_log_probs=False`` (its default: a reference forward every step) and, as a second run,
``True`` (reference log-probs of the whole data set computed before training; those seconds are reported
separately and added to its total). offpolicy runs ``offpolicy.pipeline.run`` with the config that
``offpolicy train algorithm.preset=dpo tasks.name=pairs tasks.train_path=... tasks.eval_path=...`` builds
(sync runner, default buffer), which computes each response's reference log-probs once, when its pair is
first trained on, and reuses them in later epochs.

Held-out preference accuracy (the share of held-out pairs whose implicit reward margin, policy against
reference, is positive; ties 1/2) is computed by the same function for both sides
(``PairsWorkflow.evaluate``), at step 0 and every ``--eval-every`` steps; evaluation time is excluded
from the timings. Runs are subprocesses in the order trl, trl-precompute, offpolicy per seed (so all see
the same machine load over time). Reports the median step seconds after a warm-up, the ratio, accuracy
at equal steps, and total training seconds. Writes ``--out``/{result.json, summary.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUP = {"pairs_per_step": 32, "beta": 0.1, "lr": 1e-4, "betas": (0.9, 0.99), "adam_eps": 1e-8, "grad_clip": 1.0,
         "n_train": 4000, "n_eval": 256, "warmup": 10}
RUNS = ("trl", "trl_precompute", "offpolicy")


# ----------------------------------------------------------------------------------------- shared pieces


def _offpolicy_config(spec: dict):
    """The config `offpolicy train algorithm.preset=dpo tasks.name=pairs ...` builds, with this spec."""
    from offpolicy.config import load_config

    cfg = load_config(None, [
        "algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={spec['train']}",
        f"tasks.eval_path={spec['eval']}", f"tasks.eval_size={spec['n_eval']}", f"tasks.seed={spec['seed']}",
        f"rollout.prompts_per_step={SETUP['pairs_per_step']}", f"train.lr={spec['lr']}",
        f"train.steps={spec['steps']}", f"train.threads={spec['threads']}", f"eval.every={spec['eval_every']}",
        "checkpoint.every=0", "run.loggers=[]", "run.progress=false", "run.save_final=false",
        f"run.dir={Path(spec['dir']) / 'run'}"])
    t = cfg.train
    assert (tuple(t.betas), t.grad_clip, t.weight_decay, t.warmup_steps, t.lr_schedule, t.micro_batches,
            t.updates_per_batch, t.mini_batches) == (SETUP["betas"], SETUP["grad_clip"], 0.0, 0, "constant", 1, 1, 1)
    return cfg


def _pairs_in_order(spec: dict):
    """(training pairs in offpolicy's order, steps x pairs_per_step of them; held-out pairs)."""
    from itertools import islice

    from offpolicy.pipeline.context import task_source

    stream, held = task_source(_offpolicy_config(spec))
    return list(islice(stream, spec["steps"] * SETUP["pairs_per_step"])), held


def preference_accuracy(model, ref_model, tokenizer, held) -> dict:
    """Held-out preference accuracy and mean margin, exactly as offpolicy's evaluation rows compute them."""
    from types import SimpleNamespace

    from offpolicy.rollout.pairs import PairsWorkflow

    return PairsWorkflow().evaluate(SimpleNamespace(model=model, ref_model=ref_model, tokenizer=tokenizer), held)


# ----------------------------------------------------------------------------------------- workers


def _trl_worker(spec: dict) -> dict:
    """One TRL DPOTrainer run: per-step seconds and held-out preference accuracies."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from offpolicy.data.pairs import pair_row, pair_token_ids
    from offpolicy.rollout.model import load_policy

    order, held = _pairs_in_order(spec)
    unique = list({id(p): p for p in order}.values())  # each pair once (TRL tokenizes, precomputes these)
    index = {id(p): i for i, p in enumerate(unique)}
    sequence = [index[id(p)] for p in order]  # offpolicy's order, as indices into the data set
    data = Dataset.from_list([{k: v for k, v in pair_row(p).items() if k in ("prompt", "chosen", "rejected")}
                              for p in unique])
    model, tok = load_policy("bundled")
    model.train()
    args = DPOConfig(
        output_dir=str(Path(spec["dir"]) / "trl-out"), use_cpu=True, bf16=False, fp16=False, seed=spec["seed"],
        gradient_checkpointing=False, max_steps=spec["steps"], num_train_epochs=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=spec["steps"],
        dataloader_num_workers=0, dataloader_pin_memory=False, per_device_train_batch_size=SETUP["pairs_per_step"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=SETUP["betas"][0], adam_beta2=SETUP["betas"][1], adam_epsilon=SETUP["adam_eps"],
        weight_decay=0.0, optim="adamw_torch_fused", max_grad_norm=SETUP["grad_clip"], loss_type=["sigmoid"],
        beta=SETUP["beta"], label_smoothing=0.0, max_length=None, pad_to_multiple_of=None, padding_free=False,
        precompute_ref_log_probs=spec["precompute"], disable_dropout=True, use_weighting=False,
        sync_ref_model=False)

    class InOrder(DPOTrainer):
        """DPOTrainer reading its data set in offpolicy's order (epochs included); nothing else changes."""

        def _get_train_sampler(self, train_dataset=None):
            return sequence

    rec = {"steps": [], "evals": []}
    clock = {"train_s": 0.0}
    t_init = time.perf_counter()
    trainer = InOrder(model=model, args=args, train_dataset=data, processing_class=tok)
    rec["init_s"] = time.perf_counter() - t_init  # includes the precompute of reference log-probs when asked
    trainer.remove_callback(PrinterCallback)
    # the same token ids on both sides, pair by pair
    for row, p in zip(trainer.train_dataset.select(range(min(len(unique), 256))), unique):
        ids = pair_token_ids(tok, p)
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == tuple(ids), (row, ids)
    ref = trainer.ref_model if trainer.ref_model is not None else load_policy("bundled")[0].eval()

    class Probe(TrainerCallback):
        def _eval(self, step, model):
            t0 = time.perf_counter()
            res = preference_accuracy(model, ref, tok, held)
            rec["evals"].append({"step": step, "preference_accuracy": res["preference_accuracy"],
                                 "reward_margin": res["reward_margin"], "train_s": clock["train_s"],
                                 "eval_s": time.perf_counter() - t0})

        def on_train_begin(self, args, state, control, model=None, **kw):
            rec["model"] = {"dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
                            "optimizer": type(kw["optimizer"]).__name__ if kw.get("optimizer") else None}
            self._eval(0, model)
            clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            step_s = time.perf_counter() - clock["last"]
            clock["train_s"] += step_s
            rec["steps"].append({"step": state.global_step, "step_s": step_s})
            if state.global_step % spec["eval_every"] == 0 or state.global_step == spec["steps"]:
                self._eval(state.global_step, model)
            clock["last"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            rec.setdefault("logs", []).append({"step": state.global_step, **{
                k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}})

    trainer.add_callback(Probe())
    trainer.train()
    return rec


def _offpolicy_worker(spec: dict) -> dict:
    """One offpolicy run through ``offpolicy.pipeline.run`` (what ``offpolicy train`` runs)."""
    from offpolicy.pipeline import run as run_pipeline
    from offpolicy.train.metrics import read_metrics

    res = run_pipeline(_offpolicy_config(spec), log=lambda *a: None)
    train = read_metrics(res.run_dir, "train")
    cum, at = 0.0, {0: 0.0}
    for row in train:
        cum += row["step_s"]
        at[row["step"]] = cum
    keep = ("step", "step_s", "gen_s", "train_s", "buffer_s", "loss", "loss/preference_accuracy")
    return {"steps": [{k: row[k] for k in keep if k in row} for row in train], "init_s": None,
            "evals": [{"step": e["step"], "preference_accuracy": e["preference_accuracy"],
                       "reward_margin": e["reward_margin"], "train_s": at.get(e["step"], 0.0), "eval_s": e["eval_s"]}
                      for e in read_metrics(res.run_dir, "eval")]}


WORKERS = {"trl": _trl_worker, "offpolicy": _offpolicy_worker}


# ----------------------------------------------------------------------------------------- summary


def _median_step(run: dict, warmup: int) -> float:
    return statistics.median(s["step_s"] for s in run["steps"][warmup:])


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(runs: dict[str, list[dict]], meta: dict) -> tuple[dict, str]:
    w = meta["warmup"]
    s = {}
    for name, rs in runs.items():
        med = [_median_step(r, w) for r in rs]
        s[name] = {"median_step_s": statistics.median(med), "median_step_s_per_seed": med,
                   "train_s": _mean(r["evals"][-1]["train_s"] for r in rs),
                   "init_s": _mean(r.get("init_s") for r in rs),
                   "final_accuracy": _mean(r["evals"][-1]["preference_accuracy"] for r in rs),
                   "accuracy_by_step": {e["step"]: _mean(r["evals"][i]["preference_accuracy"] for r in rs)
                                        for i, e in enumerate(rs[0]["evals"])}}
    op = s["offpolicy"]
    out = {"meta": meta, "runs": s,
           "ratio_median_step": {n: s[n]["median_step_s"] / op["median_step_s"] for n in s if n != "offpolicy"}}
    m = meta
    lines = [f"# offpolicy vs TRL DPOTrainer: offline DPO ({m['steps']} steps x {SETUP['pairs_per_step']} pairs, "
             f"beta {SETUP['beta']}, lr {m['lr']}, seeds {m['seeds']}, {m['threads']} torch thread(s), {m['date']})",
             "", f"trl {m['trl']}, transformers {m['transformers']}, torch {m['torch']}, {m['cpus']} CPUs; load "
             "average (1, 5, 15 min) before / after: " + " / ".join(
                 ", ".join(f"{x:.2f}" for x in m[k]) for k in ("load_before", "load_after")), "",
             f"Median step seconds after {w} warm-up steps (median of per-seed medians), training seconds for "
             "the whole run (sum of step seconds; evaluation excluded), held-out preference accuracy at the end "
             "(mean over seeds):", "",
             "| run | median step s | step s / offpolicy's | training s | + set-up s (precompute) | final acc. |",
             "|---|---|---|---|---|---|"]
    for name, v in s.items():
        ratio = v["median_step_s"] / op["median_step_s"]
        lines.append(f"| {name} | {v['median_step_s']:.4f} | {ratio:.2f} | {v['train_s']:.1f} | "
                     f"{'' if v['init_s'] is None else format(v['init_s'], '.1f')} | {v['final_accuracy']:.3f} |")
    lines += ["", "Held-out preference accuracy at equal steps (mean over seeds):", "",
              "| step | " + " | ".join(s) + " |", "|---|" + "---|" * len(s)]
    for step in op["accuracy_by_step"]:
        lines.append(f"| {step} | " + " | ".join(
            "" if v["accuracy_by_step"].get(step) is None else f"{v['accuracy_by_step'][step]:.3f}"
            for v in s.values()) + " |")
    lines += ["", "Per run (median step s, load average before -> after, process s): " + "; ".join(
        f"{n} s{r['seed']}: {_median_step(r, w):.4f}, {r['load'][0]:.1f} -> {r['load'][1]:.1f}, "
        f"{r['process_wall_s']:.0f}" for n, rs in runs.items() for r in rs)]
    return out, "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- driver


def _spawn(kind: str, spec: dict, log: Path, in_process: bool) -> dict:
    t0 = time.perf_counter()
    Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
    if in_process:
        res = WORKERS[kind](spec)
    else:
        with log.open("a") as f:
            f.write(f"\n=== {kind} {spec}\n")
            f.flush()
            proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{kind} worker failed (exit {proc.returncode}); see {log}")
        res = json.loads((Path(spec["dir"]) / "result.json").read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="tasks.seed: the order of the pairs")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=SETUP["lr"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (the same for both)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--dry-run", action="store_true",
                    help="8 steps on 96 pairs, one seed, in this process: checks that everything runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "vs_trl_dpo"))
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        (Path(spec["dir"]) / "result.json").write_text(json.dumps(WORKERS[args.worker](spec)))
        return {}
    n_train, n_eval, warmup = SETUP["n_train"], SETUP["n_eval"], SETUP["warmup"]
    if args.dry_run:
        args.steps, args.seeds, args.eval_every, n_train, n_eval, warmup = 8, args.seeds[:1], 4, 96, 32, 2
    if "offpolicy" not in args.runs:
        args.runs.append("offpolicy")

    import torch
    import transformers
    import trl

    from offpolicy.data.pairs import arithmetic_pairs, write_pairs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_file = write_pairs(out / "data" / "train.jsonl", arithmetic_pairs("train", n_train, seed=0))
    eval_file = write_pairs(out / "data" / "eval.jsonl", arithmetic_pairs("eval", n_eval, seed=0))
    log = out / "workers.log"
    log.write_text("")
    meta = {"steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every, "lr": args.lr,
            "threads": args.threads, "warmup": warmup, "n_train": n_train, "n_eval": n_eval, "setup": SETUP,
            "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "argv": sys.argv[1:] if argv is None else argv}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict]] = {n: [] for n in RUNS if n in args.runs}
    for seed in args.seeds:
        for name in runs:  # TRL, TRL with precomputed reference, offpolicy: alternating per seed
            spec = {"steps": args.steps, "seed": seed, "eval_every": args.eval_every, "lr": args.lr,
                    "threads": args.threads, "train": str(train_file), "eval": str(eval_file), "n_eval": n_eval,
                    "precompute": name == "trl_precompute", "dir": str(out / "runs" / stamp / f"{name}-s{seed}")}
            load = os.getloadavg()[0]
            res = _spawn("offpolicy" if name == "offpolicy" else "trl", spec, log, in_process=args.dry_run)
            res.update(seed=seed, load=(load, os.getloadavg()[0]))
            runs[name].append(res)
            print(f"{name} seed {seed}: final preference accuracy {res['evals'][-1]['preference_accuracy']:.3f}, "
                  f"median step {_median_step(res, warmup):.4f} s, process {res['process_wall_s']:.0f} s", flush=True)
    meta["load_after"] = os.getloadavg()
    result, md = summarise(runs, meta)
    result["raw"] = runs
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(md)
    print(md)
    print(f"result: {out / 'result.json'}; summary: {out / 'summary.md'}; worker logs: {log}")
    return result


if __name__ == "__main__":
    main()

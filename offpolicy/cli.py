"""Command line: ``offpolicy train | eval | pretrain-tiny | make-smoke-model | compare | plot | presets | config |
reward-model | opa-dpo``.

Heavy imports (torch, transformers) happen inside the commands so ``offpolicy --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


class _RunConsole:
    """What ``offpolicy train`` shows while it runs: timestamped lines — the runner's messages, one line
    every ``run.log_every`` steps and one per evaluation — printed and flushed as they come (so a file,
    SLURM or nohup log fills as the run goes), and all of them in ``<run_dir>/run.log``. On a terminal
    (with ``run.progress``) a live bar, full width, sits below the lines."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.every = cfg.run.log_every
        self.live = cfg.run.progress and sys.stdout.isatty()
        self.run_dir = None
        self._file = None
        self._pending: list[str] = []  # lines from before the run directory exists
        self._bar = None
        self._info = ""

    def line(self, text: str) -> None:
        import time

        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}"
        if self._bar is not None:
            self._bar.console.print(stamped, markup=False, highlight=False, soft_wrap=True)
        else:
            print(stamped, flush=True)
        self._record(stamped)

    def _record(self, text: str) -> None:
        if self._file is None:
            self._pending.append(text)
        else:
            self._file.write(text + "\n")
            self._file.flush()

    def begin(self, run_dir, total: int, done: int = 0) -> None:
        """The run directory exists (``TrainLoop`` start): open ``run.log``; start the bar on a terminal."""
        from pathlib import Path

        self.run_dir, self.total = Path(run_dir), total
        self._file = (self.run_dir / "run.log").open("a")
        for text in self._pending:
            self._record(text)
        self._pending = []
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(bar_width=None), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(),
                                 expand=True)
            self._task = self._bar.add_task("train", total=total, completed=done, info="")
            self._bar.start()

    def evaluated(self, step: int, res: dict, seconds: float) -> None:
        extra = "".join(f"  {k} {res[k]:.3f}" for k in ("success", "tool_calls_mean") if k in res)
        self.line(f"eval  step {step}/{self.total}  {_eval_label(self.cfg)} accuracy {res['accuracy']:.3f}"
                  f"{extra}  ({seconds:.1f} s)")
        self._info = f"eval acc {res['accuracy']:.3f}"
        if self._bar is not None:
            self._bar.update(self._task, info=self._info)

    def update(self, step: int, record: dict) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"reward {record['reward_mean']:.3f}  entropy "
                             f"{record.get('entropy', 0):.3f}  {self._info}  step {record['step_s']:.2f}s")
        if step % self.every == 0 or step == 1 or step == self.total:
            self.line(_step_line(step, self.total, record))

    def fail(self, error: BaseException) -> None:
        """The run failed: stop the bar (so the error printed next is the last thing shown) and keep the
        error in run.log."""
        import traceback

        self.stop()
        known = isinstance(error, (ValueError, RuntimeError, OSError, KeyboardInterrupt))  # messages, not bugs
        text = f"{type(error).__name__}: {error}" if known else "".join(traceback.format_exception(error))
        self._record(f"error: {text}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        self.stop()
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_line(step: int, total: int, r: dict) -> str:
    """step, reward, accuracy (and success for multi-turn), entropy, staleness, step seconds, reward faults."""
    parts = [f"step {step}/{total}", f"reward {r['reward_mean']:.3f}", f"accuracy {r['accuracy']:.3f}"]
    if "success" in r:
        parts.append(f"success {r['success']:.3f}")
    if "entropy" in r:
        parts.append(f"entropy {r['entropy']:.3f}")
    parts += [f"staleness {r['staleness_mean']:.2f}", f"step {r['step_s']:.2f} s"]
    if r.get("reward_invalid_frac"):
        parts.append(f"reward faults {r['reward_invalid_frac']:.0%}")
    if r.get("skipped_steps"):
        parts.append("optimiser step skipped")
    return "  ".join(parts)


def _eval_label(cfg) -> str:
    """'held-out' unless the evaluation tasks are the training tasks (a file or dataset split given as
    both, e.g. ``tasks.name=file`` without ``tasks.eval_path``; pairs without ``tasks.eval_path``, which
    evaluate on the first training pairs): then 'training-set'."""
    t = cfg.tasks
    if t.name not in ("file", "jsonl", "hf", "pairs"):
        return "held-out"  # generated tasks: the evaluation split is generated apart from the training stream
    if t.name == "pairs" and t.eval_path is None:
        return "training-set"  # tasks.eval_split alone picks nothing: the held pairs are the first training pairs
    same_file = t.eval_path is None or t.eval_path == t.train_path
    same_split = t.name not in ("hf", "pairs") or (t.eval_split or t.split) == t.split
    return "training-set" if same_file and same_split else "held-out"


def _eval_set(cfg, n) -> str:
    """What the evaluation runs on: '512 held-out tasks', '200 held-out pairs', '10 training-set tasks (no
    tasks.eval_path)'. ``n``: the count, or a bound such as 'up to 512' before the tasks are loaded."""
    label = _eval_label(cfg)
    note = "" if label == "held-out" else " (no tasks.eval_path)" if cfg.tasks.eval_path is None else \
        " (tasks.eval_path is the training data)"
    return f"{n} {label} {'pairs' if cfg.tasks.name == 'pairs' else 'tasks'}{note}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summary(cfg, resume: bool) -> str:
    """One screen: what runs, and every key that differs from the defaults (the whole resolved config is in
    config.yaml / config.json of the run directory, and ``offpolicy config`` describes each key)."""
    from offpolicy.config import Config, shareable

    t, r = cfg.tasks, cfg.rollout
    source = t.preset or t.name
    if t.name in ("file", "jsonl", "hf"):
        source += f" {t.train_path}"
    head = (f"offpolicy train{' (resuming)' if resume else ''}: {cfg.algorithm.preset} on {source}, "
            f"model {cfg.model.path} ({cfg.model.device}), {cfg.train.steps} steps x {r.prompts_per_step} "
            f"prompts x {r.group_size} responses, pipeline {cfg.pipeline.mode}, evaluation on "
            f"{_eval_set(cfg, t.eval_size if t.name in ('arithmetic', 'calculator') else f'up to {t.eval_size}')}"
            f" every {cfg.eval.every or '-'} steps")
    defaults = _flat(Config().model_dump(mode="json"))
    changed = [f"  {k} = {v!r}" for k, v in _flat(shareable(cfg.model_dump(mode="json"))).items()
               if defaults.get(k, object()) != v]
    limit = 20
    if len(changed) > limit:
        changed = changed[:limit] + [f"  ... and {len(changed) - limit} more"]
    body = "\n".join(["settings that differ from the defaults:", *changed] if changed else ["all settings at their defaults"])
    return f"{head}\n{body}\n(resolved config: config.yaml and config.json in the run directory)"


def _changed_keys(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (run.dir and the run.* display keys aside)."""
    a, b = _flat(old), _flat(new)
    shown = ("run.progress", "run.log_every", "run.loggers", "run.project", "run.dir")
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in shown]


def _train_config(args):
    """The config of ``offpolicy train``: a fresh one, or the run directory's own when resuming.

    Resuming happens with ``--resume RUN_DIR``, or automatically (with a message) when ``run.dir``
    names a directory that already holds a checkpoint. A resume whose settings differ from the run's
    ``config.json`` is refused, naming the keys, unless ``--allow-changed-config`` (then they are listed).
    """
    import json
    from pathlib import Path

    from offpolicy.config import ConfigError, load_config, shareable
    from offpolicy.pipeline.replay import apply_preset_defaults
    from offpolicy.train.checkpoint import latest_checkpoint

    notes = []
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file() or latest_checkpoint(run_dir) is None:
            raise ConfigError(f"--resume {run_dir}: not a run directory with a checkpoint")
        cfg = load_config(run_dir / "config.json", [*args.overrides, f"run.dir={run_dir}"])
    else:
        cfg = load_config(args.config, args.overrides)
        if "{" in cfg.run.dir or latest_checkpoint(cfg.run.dir) is None:
            return cfg, False, notes
        run_dir = Path(cfg.run.dir)
        notes.append(f"run.dir {run_dir} holds a checkpoint: resuming it (use another run.dir for a new run)")
    saved = json.loads((run_dir / "config.json").read_text())
    changed = _changed_keys(saved, shareable(apply_preset_defaults(cfg).model_dump(mode="json")))
    if changed and not args.allow_changed_config:
        raise ConfigError(f"resuming {run_dir} with settings that differ from its config.json:\n  "
                          + "\n  ".join(changed) + "\nadd --allow-changed-config to resume with them, or use "
                          "another run.dir for a new run")
    return cfg, True, notes + [f"resuming with a changed setting: {c}" for c in changed]


def _cmd_train(args) -> int:
    from offpolicy.pipeline import run
    from offpolicy.pipeline.context import bind_algorithm, check_workflow
    from offpolicy.train.metrics import check_loggers

    cfg, resume, notes = _train_config(args)
    from offpolicy.pipeline.torchrun import launch_rank, serve

    if launch_rank() > 0:  # a trainer rank of a torchrun launch (train.workers): it trains, rank 0 runs the rest
        return serve(cfg)
    bind_algorithm(cfg)  # a wrong algorithm or workflow setting fails here, before anything is printed or loaded
    check_workflow(cfg)
    check_loggers(cfg.run.loggers)
    console = _RunConsole(cfg)
    for text in [*notes, _summary(cfg, resume)]:
        console.line(text)
    try:
        res = run(cfg, resume=resume, progress=console, log=console.line)
    except BaseException as e:
        console.fail(e)  # the bar stops, the error goes to run.log; its message is the last thing printed
        code = _stopped(e, console.run_dir) if isinstance(e, RuntimeError) else None
        console.close()
        if code is None:
            raise
        return code
    b, a = res.eval_before["accuracy"], res.eval_after["accuracy"]
    measure = "preference accuracy on" if "preference_accuracy" in res.eval_after else "greedy accuracy on"
    n = res.eval_after.get("tasks", f"up to {cfg.tasks.eval_size}")  # the rows evaluated, not the bound
    console.line(f"done: {cfg.algorithm.preset}, {res.steps} steps, {res.seconds:.0f} s; {measure} "
                 f"{_eval_set(cfg, n)} {b:.3f} -> {a:.3f} ({(a - b) * 100:+.1f} pts)")
    console.line(f"run directory: {res.run_dir}  (run.log, metrics.jsonl, config.yaml, checkpoints/"
                 f"{', final/' if cfg.run.save_final else ''}{', tb/' if 'tensorboard' in cfg.run.loggers else ''})")
    console.close()
    return 0


def _eval_task_overrides(tasks: str | None) -> list[str]:
    """``--tasks``: 'gsm8k' (the preset: its test split), 'arithmetic', or a task file / dataset folder. The
    config's ``tasks`` keys that the new source does not read (a file's paths under ``--tasks arithmetic``,
    ``levels`` under a file) go back to their defaults, since the config would otherwise be refused."""
    if tasks is None:
        return []
    import json
    from pathlib import Path

    from offpolicy.config import TasksConfig, unread_task_keys

    if tasks == "gsm8k":
        kind, given = "file", ["tasks.preset=gsm8k"]
    elif tasks == "arithmetic":
        kind, given = "arithmetic", []
    else:
        kind = "hf" if Path(tasks).is_dir() else "file"
        given = [f"tasks.train_path={tasks}", f"tasks.eval_path={tasks}"]
    reset = [f"tasks.{k}={json.dumps(TasksConfig.model_fields[k].default)}" for k in unread_task_keys(kind)]
    return [f"tasks.name={kind}", *reset, *given]


def _cmd_eval(args) -> int:
    """Evaluate as a training run of the config does (``TrainLoop.evaluate``): through the config's workflow
    and rollout engine (multi-turn episodes for an agent), or by the workflow's own measure (preference
    accuracy of pairs, against the config's ``model.path`` as the reference); plus pass@k where the
    workflow generates answers."""
    import torch

    from offpolicy.config import ConfigError, load_config
    from offpolicy.pipeline.context import reward_function, task_source
    from offpolicy.rewards.guard import FirstFaults, GuardedReward
    from offpolicy.rollout.engine import make_engine
    from offpolicy.rollout.model import load_policy
    from offpolicy.rollout.workflow import build_workflow
    from offpolicy.train.evaluate import evaluate_workflow

    overrides = [*_eval_task_overrides(args.tasks), *args.overrides]
    model_override = [f"model.path={args.model}"] if args.model else []  # its context bounds the prompts
    cfg = load_config(args.config, [*overrides, *model_override])
    from offpolicy.threads import available_cpus

    torch.set_num_threads(cfg.train.threads or available_cpus())
    try:
        workflow = build_workflow(cfg.workflow)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    own_measure = hasattr(workflow, "evaluate")  # the pairs workflow: preference accuracy, nothing generated
    if own_measure and args.k:
        raise ConfigError(f"--k {args.k}: workflow.name={cfg.workflow.name} is evaluated by its own measure (pairs: "
                          "preference accuracy against the reference model), which generates no answers, so it has "
                          "no pass@k (drop --k)")
    k = 0 if own_measure else cfg.eval.pass_k if args.k is None else args.k
    model_path = args.model or cfg.model.path
    model, tok = load_policy(model_path, device=cfg.model.device, dtype=cfg.model.dtype)
    tasks = task_source(cfg, tok)[1][: args.limit or None]
    if own_measure:
        from types import SimpleNamespace

        ref_path = load_config(args.config, overrides).model.path  # the policy the training run started from
        ref, _ = load_policy(ref_path, device=cfg.model.device, dtype=cfg.model.dtype)
        res = workflow.evaluate(SimpleNamespace(model=model, ref_model=ref.eval().requires_grad_(False),
                                                 tokenizer=tok), tasks)
        detail = f"reference {ref_path}"
    else:
        scorer = GuardedReward.from_config(reward_function(cfg), cfg.reward, on_fault=FirstFaults(during="evaluation"))
        engine = make_engine(cfg.rollout, model, tok, seed=cfg.train.seed)
        try:
            res = evaluate_workflow(model, engine, workflow, tok, tasks, scorer, pass_k=k, seed=cfg.train.seed,
                                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    batch_size=args.batch_size)
        finally:
            scorer.close()
            engine.close()  # a vLLM engine holds its own process and memory
        detail = f"reward {cfg.reward.function}, max {cfg.rollout.max_new_tokens} new tokens"
        if cfg.workflow.name == "multi_turn":  # the environment scores the episode
            detail = (f"workflow multi_turn (env {cfg.workflow.env}, up to {cfg.workflow.max_turns} turns), max "
                      f"{cfg.rollout.max_new_tokens} new tokens per turn")
    what = f"{len(tasks)} {cfg.tasks.preset or cfg.tasks.name} tasks"
    if own_measure:
        what = _eval_set(cfg, len(tasks))  # '200 held-out pairs', '8 training-set pairs (no tasks.eval_path)'
    elif args.tasks in (None, "gsm8k", "arithmetic"):  # a known evaluation split: say whether it is held out
        what = f"{len(tasks)} {_eval_label(cfg)} {cfg.tasks.preset or cfg.tasks.name} tasks"
    shown = [n for n in ("accuracy", "preference_accuracy", "reward_margin", "success", "tool_calls_mean",
                         f"pass@{k}") if n in res]
    if "preference_accuracy" in res:
        shown.remove("accuracy")  # the same number
    scores = "  ".join(f"{'greedy accuracy' if n == 'accuracy' else n} {res[n]:.3f}" for n in shown)
    # plain print: a rich console wraps at its width (80 columns when piped), mid-phrase
    print(f"{model_path}: {what}, {detail}  {scores}")
    return 0


def _cmd_make_smoke_model(args) -> int:
    import torch

    from offpolicy.train.smoke import make_smoke_model

    torch.set_num_threads(args.threads)
    res = make_smoke_model(args.out, data=args.data, vocab_size=args.vocab_size, seed=args.seed)
    print(f"{res.path}: random Qwen2 model, {res.params:,} parameters, BPE vocabulary {res.vocab_size}, "
          f"ChatML template, {res.seconds:.0f} s")
    return 0


def _cmd_pretrain_tiny(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    steps = {} if args.steps is None else {"steps": args.steps}
    if args.task == "calculator":
        from offpolicy.train.tiny_calc import DEFAULT_DIR, pretrain_tiny_calc

        res = pretrain_tiny_calc(args.out or DEFAULT_DIR, seed=args.seed, **steps)
        scores = "  ".join(f"{k} {v:.3f}" for k, v in res.metrics.items())
        print(f"{res.path}: {res.params:,} parameters, held-out {scores}, {res.seconds:.0f} s")
        return 0
    from offpolicy.train.tiny import DEFAULT_DIR, pretrain_tiny

    res = pretrain_tiny(args.out or DEFAULT_DIR, seed=args.seed, **steps)
    print(f"{res.path}: {res.params:,} parameters, held-out greedy accuracy {res.accuracy:.3f}, "
          f"{res.seconds:.0f} s")
    return 0


def _cmd_compare(args) -> int:
    import torch

    from offpolicy.pipeline.compare import run_compare

    from offpolicy.config import ConfigError

    torch.set_num_threads(2)
    variants = None
    if args.variant:
        variants = {}
        for text in args.variant:
            label, *settings = text.split()
            if "=" in label or not all("=" in s for s in settings):
                raise ConfigError(f"--variant {text!r}: expected 'LABEL key=value [key=value ...]'")
            variants[label] = settings
    png, md = run_compare(args.presets, args.seeds, args.out, config=args.config, overrides=args.overrides,
                          variants=variants, target=args.target)
    print(md.read_text())
    print(f"dashboard: {png}\ntable: {md}")
    return 0


def _cmd_plot(args) -> int:
    from offpolicy.report import dashboard, load_run, summary_table

    runs = [load_run(d) for d in args.run_dirs]
    table, _ = summary_table(runs, args.target)
    print(table)
    print(f"dashboard: {dashboard(runs, args.out)}")
    return 0


def _cmd_config(args) -> int:
    from offpolicy.config_docs import print_reference, render_markdown, sections, select

    found = select(sections(), args.section)
    if args.markdown:
        print(render_markdown(found), end="")
    else:
        print_reference(found)
    return 0


def _cmd_presets(args) -> int:
    from offpolicy.config import ConfigError
    from offpolicy.presets_doc import presets_text

    try:
        print(presets_text(args.name))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def _cmd_reward_model(args) -> int:
    import dataclasses

    import torch

    from offpolicy.config import ConfigError
    from offpolicy.data.pairs import load_pairs
    from offpolicy.data.task_files import DatasetError
    from offpolicy.train.reward_model import RewardModelSettings, train_reward_model

    torch.set_num_threads(args.threads)
    settings = RewardModelSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RewardModelSettings)})
    try:
        train = load_pairs(args.pairs, split=args.split)
        held = load_pairs(args.eval_pairs, split=args.eval_split) if args.eval_pairs else None
        res = train_reward_model(train, held, model=args.model, out=args.out, settings=settings)
    except (DatasetError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if res.eval is not None:
        print(f"{res.out}: held-out pair accuracy {res.initial_eval.accuracy:.3f} -> {res.eval.accuracy:.3f} "
              f"after {settings.steps} steps, {res.seconds:.0f} s")
    return 0


def _cmd_opa_dpo(args) -> int:
    from offpolicy.pipeline.opa_dpo import run_opa_dpo
    from offpolicy.pipeline.opa_dpo_config import load_opa_dpo_config

    cfg, raw = load_opa_dpo_config(args.config, args.overrides)
    res = run_opa_dpo(cfg, raw)
    print(f"result: {res.run_dir / 'result.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offpolicy", description="Off-policy reinforcement fine-tuning of LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy (no arguments: the bundled tiny model on arithmetic)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    t.add_argument("--allow-changed-config", action="store_true",
                   help="resume even though settings differ from the run's config.json (they are listed)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.preset=rec_oneside_nois")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint as a training run of the config does: greedy accuracy "
                                   "through its workflow (agents: multi-turn episodes) and pass@k, or preference "
                                   "accuracy of pairs")
    e.add_argument("--model", help="HF model folder (default: model.path, i.e. the bundled model)")
    e.add_argument("--config", help="YAML config file (tasks, rollout settings)")
    e.add_argument("--tasks", help="'gsm8k' (test split, math reward), 'arithmetic', or a task file / dataset "
                                   "folder (default: the config's tasks)")
    e.add_argument("--k", type=int, help="k of pass@k (default: eval.pass_k; 0: greedy only); refused for pairs, "
                                         "which generate nothing")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N tasks")
    e.add_argument("--batch-size", type=int, default=512, help="sequences generated together (lower it if "
                                                             "the GPU runs out of memory)")
    e.add_argument("overrides", nargs="*", help="dotted overrides")
    e.set_defaults(fn=_cmd_eval)
    pt = sub.add_parser("pretrain-tiny", help="build a bundled tiny model (tokenizer + SFT warm start)")
    pt.add_argument("--task", choices=("arithmetic", "calculator"), default="arithmetic",
                    help="arithmetic: tiny-arith; calculator: tiny-calc, the tool-using agent")
    pt.add_argument("--out", help="output folder (default: offpolicy/assets/tiny-arith or tiny-calc)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--steps", type=int, help="SFT steps (default: 1000 arithmetic, 800 calculator)")
    pt.add_argument("--threads", type=int, default=2)
    pt.set_defaults(fn=_cmd_pretrain_tiny)
    sm = sub.add_parser("make-smoke-model", help="a tiny random Qwen2 model with a BPE tokenizer trained on "
                                                 "GSM8K and a ChatML template (CPU checks of the GSM8K path)")
    sm.add_argument("out", help="output folder")
    sm.add_argument("--data", help="jsonl file with question/answer rows (default: the GSM8K train file)")
    sm.add_argument("--vocab-size", type=int, default=2000)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--threads", type=int, default=2)
    sm.set_defaults(fn=_cmd_make_smoke_model)
    c = sub.add_parser("compare", help="run presets x seeds on the same budget; write a PNG dashboard and a table")
    c.add_argument("--presets", nargs="+", required=True, help="preset names (offpolicy.algos.PRESETS)")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    c.add_argument("--out", default="runs/compare", help="output folder (runs, dashboard.png, table.md)")
    c.add_argument("--config", help="YAML config shared by every run")
    c.add_argument("--target", type=float, help="accuracy target (default: the first preset's final mean)")
    c.add_argument("--variant", action="append", metavar="'LABEL key=value ...'",
                   help="a pipeline/training setting to compare (repeatable), e.g. --variant 'async "
                        "pipeline.mode=async pipeline.sync_offset=1'; every preset runs under every variant")
    c.add_argument("overrides", nargs="*", help="dotted overrides shared by every run")
    c.set_defaults(fn=_cmd_compare)
    pl = sub.add_parser("plot", help="dashboard PNG and table for existing run directories")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default="dashboard.png")
    pl.add_argument("--target", type=float)
    pl.set_defaults(fn=_cmd_plot)
    cf = sub.add_parser("config", help="every config option: dotted key, type, default and description")
    cf.add_argument("section", nargs="?", help="only this section or key, e.g. train, model.lora, train.lr")
    cf.add_argument("--markdown", action="store_true", help="print Markdown (docs/config.md is this output)")
    cf.set_defaults(fn=_cmd_config)
    ps = sub.add_parser("presets", help="every named algorithm: functions, bound parameters, log-probs read, paper")
    ps.add_argument("name", nargs="?", help="one preset in full, e.g. grpo")
    ps.set_defaults(fn=_cmd_presets)
    od = sub.add_parser("opa-dpo", help="OPA-DPO in four stages: generate, revise, align (SFT), DPO "
                                        "(docs/preferences.md); rerun with the same run.dir to resume")
    od.add_argument("--config", help="YAML config: a training config plus an opa_dpo section")
    od.add_argument("overrides", nargs="*", help="dotted overrides, e.g. opa_dpo.revise.corrector=model:DIR")
    od.set_defaults(fn=_cmd_opa_dpo)
    from offpolicy.train.reward_model import RewardModelSettings

    d = RewardModelSettings()
    rm = sub.add_parser("reward-model", help="reward models learnt from preference pairs (docs/preferences.md)")
    rmt = rm.add_subparsers(dest="action", required=True).add_parser(
        "train", help="train a Bradley-Terry scalar reward model on preference pairs; save a HF folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rmt.add_argument("--pairs", required=True, help="training pairs: .jsonl, .parquet or a `datasets` folder "
                                                    "(prompt/chosen/rejected, text or messages)")
    rmt.add_argument("--eval-pairs", help="held-out pairs; their pair accuracy is logged")
    rmt.add_argument("--split", default="train", help="split of a `datasets` folder given to --pairs")
    rmt.add_argument("--eval-split", default="test", help="split of a `datasets` folder given to --eval-pairs")
    rmt.add_argument("--model", default="bundled", help="base model: a HF causal-LM (or reward-model) folder, "
                                                        "'bundled' or 'bundled:<name>'")
    rmt.add_argument("--out", required=True, help="output folder (model, tokenizer, metrics.jsonl)")
    rmt.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    rmt.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    rmt.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step")
    rmt.add_argument("--margin", type=float, default=d.margin, help="margin m of -log sigmoid(r_c - r_r - m) "
                                                                   "for pairs without a 'margin' column")
    rmt.add_argument("--center-coef", type=float, default=d.center_coef, help="c of c * mean((r_c + r_r)^2)")
    rmt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    rmt.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up")
    rmt.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "linear", "cosine"),
                     help="decay after warm-up, down to lr * --min-lr-ratio at the last step")
    rmt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    rmt.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    rmt.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out accuracy every N steps "
                                                                         "(and before the first, after the last)")
    rmt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    rmt.add_argument("--seed", type=int, default=d.seed)
    rmt.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    rmt.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    rmt.add_argument("--threads", type=int, default=2, help="CPU threads of torch")
    rmt.set_defaults(fn=_cmd_reward_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from offpolicy.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        code = _stopped(e)
        if code is None:
            raise
        return code


def _stopped(e: BaseException, run_dir=None) -> int | None:
    """Print the message of an error that stops a run cleanly and return the exit code (3 for a fault, 130
    for a signal); None for any other error. ``run_dir``: where to look for the newest checkpoint."""
    from offpolicy.pipeline.asynchronous import ExplorerDied
    from offpolicy.pipeline.ray_runner import TrainerDied
    from offpolicy.pipeline.resume import RunStopped
    from offpolicy.pipeline.trainer import NumericalFaultError
    from offpolicy.rewards.guard import RewardFaultError
    from offpolicy.train.checkpoint import CheckpointError, latest_checkpoint

    if isinstance(e, RunStopped):
        print(f"offpolicy: {e}", file=sys.stderr)
        return 130
    if not isinstance(e, (RewardFaultError, NumericalFaultError, CheckpointError, ExplorerDied, TrainerDied)):
        return None
    note = ""
    if isinstance(e, CheckpointError):  # its message says which checkpoint is intact
        note = f"\n(once it can be written: offpolicy train --resume {run_dir})" if run_dir is not None else ""
    elif run_dir is None:
        note = "\n(a checkpoint of the last good state was written)"
    elif (last := latest_checkpoint(run_dir)) is not None:
        note = f"\n(last good state: {last}; resume with: offpolicy train --resume {run_dir})"
    else:
        note = "\n(no checkpoint: the run stopped before its first step)"
    print(f"offpolicy: stopped: {e}{note}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``offpolicy train | eval | pretrain-tiny | make-smoke-model | compare | plot | presets | config``.

Heavy imports (torch, transformers) happen inside the commands so ``offpolicy --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


class _Progress:
    """A rich progress bar with the latest reward, held-out accuracy and step time."""

    def __init__(self, console):
        self.console = console
        self._bar = None

    def start(self, total: int, acc0: float, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
        self._task = self._bar.add_task("train", total=total, completed=done, info=f"eval acc {acc0:.3f}")
        self._acc = acc0
        self._bar.start()

    def update(self, step: int, record: dict, eval_acc: float | None) -> None:
        if eval_acc is not None:
            self._acc = eval_acc
        info = (f"reward {record['reward_mean']:.3f}  entropy {record.get('entropy', 0):.3f}  "
                f"eval acc {self._acc:.3f}  step {record['step_s']:.2f}s")
        self._bar.update(self._task, completed=step, info=info)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _train_config(args):
    """The config of ``offpolicy train``: a fresh one, or the run directory's own when resuming.

    Resuming happens with ``--resume RUN_DIR``, or automatically (with a message) when ``run.dir``
    names a directory that already holds a checkpoint.
    """
    from pathlib import Path

    from offpolicy.config import ConfigError, load_config
    from offpolicy.train.checkpoint import latest_checkpoint

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file() or latest_checkpoint(run_dir) is None:
            raise ConfigError(f"--resume {run_dir}: not a run directory with a checkpoint")
        return load_config(run_dir / "config.json", [*args.overrides, f"run.dir={run_dir}"]), True
    cfg = load_config(args.config, args.overrides)
    if "{" not in cfg.run.dir and latest_checkpoint(cfg.run.dir) is not None:
        print(f"run.dir {cfg.run.dir} holds a checkpoint: resuming it (use another run.dir for a new run)")
        return cfg, True
    return cfg, False


def _cmd_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from offpolicy.pipeline import run

    from offpolicy.pipeline.context import bind_algorithm, check_workflow

    console = Console()
    cfg, resume = _train_config(args)
    bind_algorithm(cfg)  # a wrong algorithm or workflow setting fails here, before anything is printed or loaded
    check_workflow(cfg)
    console.print("[bold]resolved config[/bold]")
    console.print_json(cfg.model_dump_json())
    progress = _Progress(console) if cfg.run.progress else None
    res = run(cfg, resume=resume, progress=progress, log=console.print)
    table = Table(title=f"offpolicy train — {cfg.algorithm.preset}, {res.steps} steps, {res.seconds:.0f} s")
    table.add_column("held-out greedy accuracy")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    b, a = res.eval_before["accuracy"], res.eval_after["accuracy"]
    table.add_row(f"{cfg.tasks.eval_size} tasks", f"{b:.3f}", f"{a:.3f}", f"{(a - b) * 100:+.1f} pts")
    console.print(table)
    console.print(f"run directory: {res.run_dir}  (metrics.jsonl, tb/, config.json, checkpoints/, final/)")
    return 0


def _eval_task_overrides(tasks: str | None) -> list[str]:
    """``--tasks``: 'gsm8k' (the preset: its test split), 'arithmetic', or a task file / dataset folder."""
    if tasks is None:
        return []
    if tasks == "gsm8k":
        return ["tasks.preset=gsm8k"]
    if tasks == "arithmetic":
        return ["tasks.name=arithmetic"]
    from pathlib import Path

    kind = "hf" if Path(tasks).is_dir() else "file"
    return [f"tasks.name={kind}", f"tasks.train_path={tasks}", f"tasks.eval_path={tasks}"]


def _cmd_eval(args) -> int:
    import torch
    from rich.console import Console

    from offpolicy.config import load_config
    from offpolicy.pipeline.context import reward_function, task_source
    from offpolicy.rollout.model import load_policy
    from offpolicy.train.evaluate import evaluate

    cfg = load_config(args.config, [*_eval_task_overrides(args.tasks), *args.overrides])
    from offpolicy.threads import available_cpus

    torch.set_num_threads(cfg.train.threads or available_cpus())
    model_path = args.model or cfg.model.path
    model, tok = load_policy(model_path, device=cfg.model.device, dtype=cfg.model.dtype)
    tasks = task_source(cfg, tok)[1][: args.limit or None]
    k = cfg.eval.pass_k if args.k is None else args.k
    res = evaluate(model, tok, tasks, reward_function(cfg), max_new_tokens=cfg.rollout.max_new_tokens,
                   pass_k=k, temperature=cfg.rollout.temperature, seed=cfg.train.seed, batch_size=args.batch_size)
    source = cfg.tasks.preset or cfg.tasks.name
    scores = "  ".join(f"{'greedy accuracy' if name == 'accuracy' else name} {v:.3f}" for name, v in res.items())
    Console().print(f"{model_path}: {len(tasks)} held-out {source} tasks, reward {cfg.reward.function}, "
                    f"max {cfg.rollout.max_new_tokens} new tokens  {scores}")
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

    from offpolicy.train.tiny import DEFAULT_DIR, pretrain_tiny

    torch.set_num_threads(args.threads)
    res = pretrain_tiny(args.out or DEFAULT_DIR, seed=args.seed, steps=args.steps)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offpolicy", description="Off-policy reinforcement fine-tuning of LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy (no arguments: the bundled tiny model on arithmetic)")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.preset=rec_oneside_nois")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="greedy accuracy and pass@k of a checkpoint on the held-out split")
    e.add_argument("--model", help="HF model folder (default: model.path, i.e. the bundled model)")
    e.add_argument("--config", help="YAML config file (tasks, rollout settings)")
    e.add_argument("--tasks", help="'gsm8k' (test split, math reward), 'arithmetic', or a task file / dataset "
                                   "folder (default: the config's tasks)")
    e.add_argument("--k", type=int, help="k of pass@k (default: eval.pass_k; 0: greedy only)")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N tasks")
    e.add_argument("--batch-size", type=int, default=512, help="sequences generated together (lower it if "
                                                             "the GPU runs out of memory)")
    e.add_argument("overrides", nargs="*", help="dotted overrides")
    e.set_defaults(fn=_cmd_eval)
    pt = sub.add_parser("pretrain-tiny", help="build the bundled tiny model (tokenizer + SFT warm start)")
    pt.add_argument("--out", help="output folder (default: offpolicy/assets/tiny-arith)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--steps", type=int, default=1000, help="SFT steps")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from offpolicy.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"offpolicy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the run-stopping errors live with the pipeline (imported only when it ran)
        from offpolicy.pipeline.explorer import RewardFaultError
        from offpolicy.pipeline.resume import RunStopped
        from offpolicy.pipeline.trainer import NumericalFaultError

        if isinstance(e, (RewardFaultError, NumericalFaultError)):
            print(f"offpolicy: stopped: {e}\n(a checkpoint of the last good state was written)", file=sys.stderr)
            return 3
        if isinstance(e, RunStopped):
            print(f"offpolicy: {e}", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Run set-up shared by the runners: run directory, seeds, policy, optimiser, tasks, logging."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from offpolicy.config import Config, ConfigError, shareable


# what a run writes in its directory: a run that never trained a step has these moved aside (make_run_dir)
RUN_FILES = ("config.json", "config.yaml", "plan.json", "metrics.jsonl", "metrics.rolled_back.jsonl", "run.log",
             "buffer.db", "buffer.db-wal", "buffer.db-shm", "buffer.db-journal", "reward_faults.log", "tb", "wandb",
             "mlflow.db", "checkpoints", "final", "reincarnation.safetensors")


def make_run_dir(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Create the run directory. One that holds a run that trained (a checkpoint, or a train record in
    ``metrics.jsonl``) is refused, so nothing there is overwritten. One that holds only what a run that never
    trained a step left (it failed in its set-up or first evaluation) is reused: those files move to
    ``<run_dir>/aborted-<time>/``, nothing is deleted, and ``log`` says so."""
    from offpolicy.train.checkpoint import latest_checkpoint

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.run.dir.format(preset=cfg.algorithm.preset, time=stamp))
    held = [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()]
    if held:
        if latest_checkpoint(path) is not None:
            raise ConfigError(f"run.dir: {path} already holds a run with a checkpoint; resume it (offpolicy train "
                              f"--resume {path}) or choose another run.dir")
        if _trained(path / "metrics.jsonl"):
            raise ConfigError(f"run.dir: {path} already holds a run that trained (steps in metrics.jsonl) but no "
                              "checkpoint to resume from; choose another run.dir")
        aside, n = path / f"aborted-{stamp}", 1
        while aside.exists():
            n += 1
            aside = path / f"aborted-{stamp}-{n}"
        aside.mkdir()
        for name in held:
            (path / name).rename(aside / name)
        log(f"run.dir {path}: the run there stopped before its first training step (no checkpoint, no step in "
            f"metrics.jsonl); its files ({', '.join(held)}) moved to {aside}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _trained(metrics: Path) -> bool:
    """Whether ``metrics`` (a run's metrics.jsonl) holds a train record (a line cut by a crash is skipped)."""
    if not metrics.is_file():
        return False
    with metrics.open() as f:
        for line in f:
            try:
                if json.loads(line).get("kind", "train") == "train":
                    return True
            except (json.JSONDecodeError, AttributeError):
                continue
    return False


def open_run_buffer(cfg: Config, run_dir: Path):
    """The run's experience buffer: SQLite ``<run_dir>/buffer.db`` (async default), in memory (sync default),
    or the SQLAlchemy database at ``buffer.url`` (``buffer.kind=sql``).

    Every kind but memory pickles by address, so the async runner hands it to the explorer process, which
    reopens it. A database that already holds rows is refused unless ``run_dir`` has a checkpoint to resume,
    as :func:`make_run_dir` refuses a run directory with a ``buffer.db``."""
    from offpolicy.data.buffer import open_buffer

    kind = _buffer_kind(cfg)
    if kind != "sql":
        return open_buffer(None if kind == "memory" else str(run_dir / "buffer.db"), capacity=cfg.buffer.capacity)
    try:
        import sqlalchemy
    except ImportError:
        raise ConfigError("buffer.kind=sql needs SQLAlchemy: pip install 'offpolicy[sql]'") from None
    from offpolicy.train.checkpoint import latest_checkpoint

    try:
        url = sqlalchemy.engine.make_url(cfg.buffer.url)
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError(f"buffer.url: {e}") from None
    shown = f"buffer.url={url.render_as_string(hide_password=True)}"
    if cfg.pipeline.decoupled and url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(f"{shown}: an in-memory SQLite database cannot be shared with the explorer process; "
                          "give a file (sqlite:///path)")
    try:  # a missing driver (e.g. psycopg) or an unreachable server
        buffer = open_buffer(cfg.buffer.url, capacity=cfg.buffer.capacity)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise ConfigError(f"{shown}: cannot open the database: {e}") from None
    if buffer.stats().put and latest_checkpoint(run_dir) is None:
        buffer.close()
        raise ConfigError(f"{shown} already holds another run's rows; use an empty database (one run per database)")
    return buffer


def _buffer_kind(cfg: Config) -> str:
    kind = cfg.buffer.kind or ("sqlite" if cfg.pipeline.decoupled else "memory")
    if kind == "memory" and cfg.pipeline.decoupled:
        raise ConfigError(f"buffer.kind=memory cannot be shared with the explorer process; use sqlite in "
                          f"{cfg.pipeline.mode} mode")
    return kind


def check_run(cfg: Config) -> None:
    """The runner's own settings (the buffer's kind, the sample strategy for this pipeline), checked when the
    runner starts: before any model loads or a new run directory is made. ``cfg``: after
    :func:`~offpolicy.pipeline.replay.apply_preset_defaults`."""
    from offpolicy.pipeline.replay import sample_strategy

    _buffer_kind(cfg)
    sample_strategy(cfg)


class RunLog:
    """Hands the runner's ``progress`` (the console of ``offpolicy train``) the run directory as soon as it
    exists — at once for a resume, once it is made for a new run — by calling its ``begin``, so that
    ``run.log`` holds the set-up's lines and, when the set-up fails, its error (docs/logging.md). The runner
    passes this object to ``TrainLoop`` in place of ``progress``: its ``begin`` is then done already.
    ``progress=None``: nothing to open."""

    def __init__(self, progress, cfg: Config, run_dir: Path | None, *, resume: bool):
        self.progress, self.total, self.begun = progress, cfg.train.steps, False
        if resume:
            self.open(Path(cfg.run.dir) if run_dir is None else Path(run_dir))

    def open(self, run_dir: Path) -> None:
        from offpolicy.train.checkpoint import checkpoint_step, latest_checkpoint

        if self.progress is not None and not self.begun:
            last = latest_checkpoint(run_dir)
            self.begin(run_dir, self.total, done=checkpoint_step(last) if last is not None else 0)

    def begin(self, run_dir, total: int, done: int = 0) -> None:
        if not self.begun:
            self.begun = True
            self.progress.begin(run_dir, total, done=done)

    def __getattr__(self, name):
        return getattr(self.progress, name)

    def handed_on(self):
        """What ``TrainLoop`` gets as its ``progress``: this object, or None where there is no progress."""
        return self if self.progress is not None else None


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def task_source(cfg: Config, tokenizer=None, *, report: Callable[[str], None] | None = None) -> tuple[Iterator, list]:
    """(endless training-task iterator, held-out tasks) for ``cfg.tasks``, prompts formatted for the model.

    File rows are checked here; rows over ``tasks.max_row_bytes`` and prompts too long for the model's
    context are left out and reported (count and file:line, printed). ``tokenizer``: the policy's (for its
    chat template and the prompt lengths); None = load the one of ``cfg.model.path``.
    """
    from offpolicy.data import task_files as tf

    t = cfg.tasks
    skipped = tf.Skipped()
    try:
        if t.name == "arithmetic":
            from offpolicy.data import arithmetic

            levels = tuple(t.levels)
            train = arithmetic.stream(seed=t.seed, levels=levels)
            held_out = arithmetic.generate("eval", t.eval_size, seed=t.seed, levels=levels)
            shots = ([] if isinstance(t.few_shot, str) else
                     arithmetic.generate("train", t.few_shot, seed=t.seed + 1, levels=levels) if t.few_shot else [])
        elif t.name == "pairs":
            from offpolicy.data.pairs import encode_pairs, load_pairs
            from offpolicy.rollout.model import load_tokenizer, resolve_model_path

            for key, path in (("split", t.train_path), ("eval_split", t.eval_path)):
                if getattr(t, key) not in (None, "train") and not Path(path or t.train_path).is_dir():
                    raise ConfigError(f"tasks.{key}={getattr(t, key)}: {path or t.train_path} is a file, which has "
                                      "no splits (only a datasets folder has)")
            pairs = load_pairs(t.train_path, split=t.split)  # split / eval_split: of a datasets folder
            held = (load_pairs(t.eval_path, split=t.eval_split or t.split, limit=t.eval_size) if t.eval_path
                    else pairs[: t.eval_size])
            tokenizer = tokenizer or load_tokenizer(resolve_model_path(cfg.model.path))
            for part in (pairs, held):  # a row the tokenizer cannot render fails now, naming its file:line
                encode_pairs(tokenizer, part)  # and steps reuse the ids
            return _epochs(pairs, t.seed), held
        elif t.name == "calculator":
            from offpolicy.data import calculator

            train, held_out = calculator.stream(seed=t.seed), calculator.generate("eval", t.eval_size, seed=t.seed)
            shots = []
        else:
            kind = "hf" if t.name == "hf" else "file"
            kw = {"kind": kind, "prompt_key": t.prompt_key, "answer_key": t.answer_key, "subset": t.subset,
                  "max_row_bytes": t.max_row_bytes, "skipped": skipped}
            rows = tf.load_rows_where(t.train_path, split=t.split, **kw)
            n_shots = 0 if isinstance(t.few_shot, str) else t.few_shot
            if n_shots >= len(rows):
                raise tf.DatasetError(f"tasks.few_shot={n_shots} leaves no training rows in {t.train_path}")
            shots, rows = [task for _, task in rows[:n_shots]], rows[n_shots:]
            held_out = tf.load_rows_where(t.eval_path or t.train_path, split=t.eval_split or t.split,
                                          limit=t.eval_size, **kw)
            train = None  # formatted below, once, so that long prompts can be left out
        if isinstance(t.few_shot, str):
            shots = tf.load_rows(t.few_shot, prompt_key=t.prompt_key, answer_key=t.answer_key)
        if tokenizer is None and (t.chat_template != "off" or train is None):
            from offpolicy.rollout.model import load_tokenizer, resolve_model_path

            tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
        chat = t.chat_template != "off" and tf.use_chat_template(t.chat_template, tokenizer)
        fmt = tf.PromptFormat(t.template, t.system_prompt, tuple((s.prompt, s.answer) for s in shots),
                              tokenizer if chat else None)
        if train is None:  # file / hf rows: format, leave out prompts the context cannot hold, report
            from offpolicy.rollout.model import resolve_model_path

            context = tf.context_length(resolve_model_path(cfg.model.path))
            budget = cfg.workflow.max_total_tokens if cfg.workflow.name == "multi_turn" else cfg.rollout.max_new_tokens
            rows, held_out = ([(w, fmt.apply(task)) for w, task in part] for part in (rows, held_out))
            if context is not None:
                rows, held_out = (tf.drop_long_prompts(part, tokenizer, context=context, response_tokens=budget,
                                                       skipped=skipped) for part in (rows, held_out))
            for line in skipped.describe():  # rows left out: printed (flushed) unless ``report`` takes them
                (report or (lambda text: print(text, flush=True)))(f"tasks: {line}")
            if not rows or not held_out:
                raise tf.DatasetError(f"no {'training' if not rows else 'evaluation'} tasks left: "
                                      + "; ".join(skipped.describe()))
            return _epochs([task for _, task in rows], t.seed), [task for _, task in held_out]
        held_out = [fmt.apply(task) for task in held_out]
    except tf.DatasetError as e:
        raise ConfigError(f"tasks: {e}") from None
    return map(fmt.apply, train), held_out


def _epochs(tasks: list, seed: int) -> Iterator:
    """Endless passes over ``tasks``, reshuffled each epoch (deterministic in ``seed``)."""
    rng = random.Random(seed)
    while True:
        order = list(tasks)
        rng.shuffle(order)
        yield from order


def reward_function(cfg: Config) -> Callable[[str, str], float]:
    """``reward.function``: a built-in name, ``module:function``, or a weighted sum such as
    ``"math:1.0,format:0.1"`` (terms ``name:weight``, each name built-in or ``module:function``).
    Everything is imported here, so a typo fails early."""
    import difflib
    import importlib
    import re

    from offpolicy.rewards import REWARDS, combine_rewards

    def resolve(name: str) -> Callable[[str, str], float]:
        if ":" not in name:
            if name not in REWARDS:
                close = difflib.get_close_matches(name, REWARDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"reward.function: unknown reward {name!r}{hint}; built-in: {sorted(REWARDS)}, "
                                  "or give 'package.module:function'")
            return REWARDS[name]
        module, attr = name.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"reward.function: cannot import {name!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"reward.function: {name!r} is not callable")
        return fn

    spec = cfg.reward.function.strip()
    # "pkg.mod:fn" is one reward; "math:1.0" (the part after the last ':' a number) is a weighted term.
    terms = [part.strip().rpartition(":") for part in spec.split(",")]
    weighted = [bool(re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", w)) and bool(n) for n, _, w in terms]
    if len(terms) == 1 and not weighted[0]:
        return resolve(spec)
    for (name, sep, weight), ok in zip(terms, weighted):
        if not ok:
            raise ConfigError(f"reward.function: term {(name + sep + weight)!r} of {spec!r} needs a reward "
                              "name and a weight, e.g. 'math:1.0,format:0.1'")
    return combine_rewards([(resolve(name.strip()), float(weight)) for name, _, weight in terms])


def lr_multiplier(train_cfg) -> Callable[[int], float]:
    """Step -> lr factor: linear warm-up, then constant / linear / cosine decay to ``min_lr_ratio``."""
    warm, total, floor = train_cfg.warmup_steps, max(train_cfg.steps, 1), train_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if train_cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(total - warm, 1))
        shape = 1 - frac if train_cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return floor + (1 - floor) * shape

    return factor


@dataclass
class RunContext:
    """Everything a runner needs, built once from the config."""

    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    algo: object  # offpolicy.train.algorithm.Algorithm
    plan: object  # offpolicy.train.plan.StepPlan
    ref_model: object | None  # callable like the policy (a frozen copy, or the LoRA policy with its adapter off)
    train_tasks: Iterator  # the endless training-task stream (the sync explorer draws from it)
    eval_tasks: list
    reward_fn: Callable[[str, str], float]

    def write_config(self) -> None:
        """``config.json`` (the resolved config, what a resume compares with) and ``plan.json``. A new run writes
        them as its directory is made; a resume once it has restored its checkpoint and opened its trackers
        (the runner calls this), so a resume that fails leaves the run's own as they were."""
        (self.run_dir / "config.json").write_text(json.dumps(shareable(self.cfg.model_dump(mode="json")), indent=2))
        self.plan.save(self.run_dir)


def make_optimizer(cfg: Config, model: torch.nn.Module):
    """(AdamW over the trainable parameters: all, or the LoRA adapter only; its LR schedule).

    ``train.optimizer_impl`` picks torch's implementation (the same update to float rounding): 'fused' (one
    kernel; a ConfigError where torch has none for the parameters' device and dtype), 'foreach', 'for_loop';
    'auto' = fused where torch has the kernel (transformers' Trainer default, ``adamw_torch_fused``), else
    torch's own choice."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    impl = cfg.train.optimizer_impl

    def adamw(**kw):
        return torch.optim.AdamW(trainable, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                 weight_decay=cfg.train.weight_decay, **kw)

    kw = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
          "for_loop": {"foreach": False}}[impl]
    try:
        opt = adamw(**kw)
    except RuntimeError as e:  # no fused kernel for this device / dtype
        if impl != "auto":
            raise ConfigError(f"train.optimizer_impl={impl}: {e}") from None
        opt = adamw()
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))


def bind_algorithm(cfg: Config):
    """The config's algorithm, bound, and its step plan; a wrong preset, parameter name or value, or a
    recipe setting nothing acts on, fails here, before any model is loaded."""
    from offpolicy.train.algorithm import Algorithm
    from offpolicy.train.plan import build_plan

    try:
        algo = Algorithm.from_config(cfg.algorithm, max_len=cfg.rollout.max_new_tokens)
        unbounded = Algorithm.from_config(cfg.algorithm)  # the same without the generation limit
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    if cfg.algorithm.kl_estimator is not None and not any("estimator" in reg.keywords for reg in algo.regularizers):
        raise ConfigError(f"algorithm.kl_estimator={cfg.algorithm.kl_estimator}: the KL term is off (algorithm.kl_coef "
                          f"is 0 for preset {cfg.algorithm.preset!r}), so no estimator is read; set kl_coef > 0 or "
                          "drop kl_estimator")
    if (cfg.tasks.name == "pairs" and cfg.rollout.max_new_tokens != type(cfg.rollout).model_fields["max_new_tokens"].default
            and unbounded.agg_fn.keywords == algo.agg_fn.keywords):
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} is not read by tasks.name=pairs: "
                          "nothing is generated (the responses are the file's), and the aggregation of preset "
                          f"{cfg.algorithm.preset!r} has no max_len; drop it")
    return algo, build_plan(cfg, algo)


def check_workflow(cfg: Config) -> None:
    """Build the workflow once (its environment and settings checked) without loading any model."""
    from offpolicy.rollout.workflow import build_workflow

    try:
        build_workflow(cfg.workflow)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_context(cfg: Config, run_dir: Path | None = None, *, resume: bool = False, log: Callable[[str], None] = print,
                  on_run_dir: Callable[[Path], None] | None = None) -> RunContext:
    """Validate the algorithm and workflow first (cheap), then load the model and build the optimiser.

    A new run's directory is made (:func:`make_run_dir`) once the model has loaded, and its ``config.json`` /
    ``plan.json`` written; a resume writes nothing here (the runner calls :meth:`RunContext.write_config` once
    the checkpoint is restored). ``on_run_dir``: called with the run directory as soon as it exists (at once
    for a resume), before anything is written to it."""
    from offpolicy.rollout.model import policy_from_config, reference_policy

    from offpolicy.threads import thread_split

    if resume:
        run_dir = Path(cfg.run.dir) if run_dir is None else Path(run_dir)
        if on_run_dir is not None:
            on_run_dir(run_dir)
    torch.set_num_threads(thread_split(cfg.pipeline.mode, cfg.train.threads, cfg.pipeline.explorer_threads)[0])
    algo, plan = bind_algorithm(cfg)
    check_workflow(cfg)
    reward_fn = reward_function(cfg)
    seed_everything(cfg.train.seed)
    model, tokenizer = policy_from_config(cfg.model)
    # the initial policy: under LoRA the same model with its adapter off, else a frozen copy
    if cfg.train.compile:  # before the reference copy, which then runs compiled as well
        from offpolicy.train.step import compile_forward

        compile_forward(model)
    ref_model = reference_policy(model) if plan.ref_logp != "unused" else None
    opt, sched = make_optimizer(cfg, model)
    if not resume:
        run_dir = make_run_dir(cfg, log) if run_dir is None else run_dir
        if on_run_dir is not None:
            on_run_dir(run_dir)
    train_tasks, eval_tasks = task_source(cfg, tokenizer)
    ctx = RunContext(cfg, run_dir, model, tokenizer, opt, sched, algo, plan, ref_model, train_tasks, eval_tasks,
                     reward_fn)
    if not resume:
        ctx.write_config()
    return ctx

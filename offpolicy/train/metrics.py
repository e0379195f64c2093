"""Per-step metrics: one JSON line per record in ``metrics.jsonl``, and the same scalars to the experiment
trackers of ``run.loggers`` (TensorBoard, Weights & Biases, MLflow, Trackio), each through its own library,
imported only when named. Every tracker gets the resolved config once, at the start, and each record's
finite numbers once, at the record's step, under ``<kind>/<name>`` (``train/reward_mean``, ``eval/accuracy``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from offpolicy.config import ConfigError


class _TensorBoard:
    """``<run_dir>/tb`` event files (torch's SummaryWriter); the config as a text summary."""

    module, extra = "tensorboard", None

    def __init__(self, run_dir: Path, project: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(run_dir / "tb"))
        self._w.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self._w.add_scalar(key, value, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _WandB:
    """A W&B run named after the run directory, its files in ``<run_dir>/wandb``; ``WANDB_MODE=offline``
    (or ``wandb offline``) keeps it on disk, to upload later with ``wandb sync``."""

    module, extra = "wandb", "wandb"

    def __init__(self, run_dir: Path, project: str, config: dict):
        import wandb

        self._run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    """An MLflow run in experiment ``project``, named after the run directory, the config flattened into
    params. Tracking URI: ``MLFLOW_TRACKING_URI`` (or ``mlflow.set_tracking_uri``) when set, else the SQLite
    store ``<run_dir>/mlflow.db``. Slashes after the kind become dots (``train/loss.clip_high_frac``): the
    file store keeps a metric as a file, so ``loss`` and ``loss/clip_high_frac`` could not both exist."""

    module, extra = "mlflow", "mlflow"

    def __init__(self, run_dir: Path, project: str, config: dict):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI") and not getattr(mlflow, "is_tracking_uri_set", bool)():
            mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
        mlflow.set_experiment(project)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=run_dir.name)
        params = _flatten(config)
        keys = list(params)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params({k: params[k] for k in keys[i : i + 100]})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({_dotted(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


class _Trackio:
    """A Trackio run in project ``project``, named after the run directory (local SQLite under
    ``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show`` opens the dashboard)."""

    module, extra = "trackio", "trackio"

    def __init__(self, run_dir: Path, project: str, config: dict):
        import trackio

        self._run = trackio.init(project=project, name=run_dir.name, config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


def check_loggers(names: list[str]) -> None:
    """ConfigError naming the extra to install when a tracker's library is missing (no import: cheap)."""
    from offpolicy.config import ConfigError

    for name in names:
        cls = TRACKERS[name]
        if importlib.util.find_spec(cls.module) is None:
            hint = f"pip install 'offpolicy[{cls.extra}]'" if cls.extra else f"pip install {cls.module}"
            raise ConfigError(f"run.loggers: {name} needs the {cls.module} package, which is not installed: {hint}")


class TrackerError(ConfigError):
    """A tracker of ``run.loggers`` could not start its run (no login, no server, ...): its own message, and
    how to run without it."""


# how to run without the tracker's service, besides leaving it out of run.loggers
_OFFLINE = {"wandb": "WANDB_MODE=offline keeps the W&B run on disk (upload it later with wandb sync)",
            "mlflow": "unset MLFLOW_TRACKING_URI to write the SQLite store <run_dir>/mlflow.db"}


def _start(name: str, run_dir: Path, project: str, config: dict):
    """``TRACKERS[name]`` started; its failure (any Exception) is a :class:`TrackerError`."""
    try:
        return TRACKERS[name](run_dir, project, config)
    except Exception as e:
        own = " ".join(str(e).split()) or "(no message)"
        offline = f"{_OFFLINE[name]}, or " if name in _OFFLINE else ""
        raise TrackerError(f"run.loggers: {name} could not start its run: {type(e).__name__}: {own} — to run "
                           f"without it: {offline}leave {name} out of run.loggers (run.loggers=[] writes "
                           "metrics.jsonl only)") from None


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _dotted(key: str) -> str:
    kind, _, name = key.partition("/")
    return f"{kind}/{name.replace('/', '.')}"


def _scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (booleans and text left out), under ``<kind>/<name>``."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": v for k, v in record.items() if k not in ("step", "kind") and
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsWriter:
    """Append-only metrics sink. Every record is flushed at once, so a crash loses nothing written.

    ``loggers``: names from :data:`TRACKERS`; ``config``: the resolved config, logged once to each and
    written to ``<run_dir>/config.yaml`` (beside the runner's ``config.json``); ``project``: the tracker
    project / experiment the run is logged under.
    """

    def __init__(self, run_dir: str | Path, *, loggers: list[str] = ("tensorboard",), config: dict | None = None,
                 project: str = "offpolicy"):
        run_dir = Path(run_dir)
        check_loggers(list(loggers))
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._trackers = []
        try:
            for name in loggers:
                self._trackers.append(_start(name, run_dir, project, config or {}))
        except BaseException:
            self.close()
            raise
        if config is not None:  # once the trackers run: a resume that fails here leaves the run's own
            import yaml

            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._trackers:
            scalars, step = _scalars(record), int(record.get("step", 0))
            for tracker in self._trackers:
                tracker.log(scalars, step)

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (optionally only one ``kind``: 'train' | 'eval')."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def episode_metrics(exps: list) -> dict:
    """Multi-turn counters (``info["episode"]``): ``<name>_mean`` per episode (turns, tool calls, env
    seconds, success, ...), and totals for error counts (``tool_errors/<kind>``, ``prefix_failures``)."""
    episodes = [e.info["episode"] for e in exps if "episode" in e.info]
    if not episodes:
        return {}
    keys = sorted({k for ep in episodes for k in ep})
    out = {}
    for k in keys:
        total = sum(ep.get(k, 0) for ep in episodes)
        if k.startswith("tool_errors/") or k == "prefix_failures":
            out[k] = total
        else:
            out[f"{k}_mean"] = total / len(episodes)
    out["success"] = sum(bool(e.info.get("success")) for e in exps) / len(exps)
    return out

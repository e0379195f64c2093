"""Runners that wire explorer <-> buffer <-> trainer: ``sync``, ``async`` (local processes) and ``ray``."""

from __future__ import annotations


def run(cfg, **kwargs):
    """Run ``cfg`` with the runner its ``pipeline.mode`` names; returns a RunResult."""
    if cfg.pipeline.mode == "async":
        from offpolicy.pipeline.asynchronous import run_async

        return run_async(cfg, **kwargs)
    if cfg.pipeline.mode == "ray":
        from offpolicy.pipeline.ray_runner import run_ray

        return run_ray(cfg, **kwargs)
    from offpolicy.pipeline.sync import run_sync

    return run_sync(cfg, **kwargs)

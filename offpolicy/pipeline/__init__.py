"""Runners that wire explorer <-> buffer <-> trainer: ``sync``, ``async`` (local processes) and ``ray``."""

from __future__ import annotations


def run(cfg, **kwargs):
    """Run ``cfg`` with the runner its ``pipeline.mode`` names; returns a RunResult. With ``train.workers > 1``
    outside ray mode this is rank 0 of a torchrun launch (:mod:`offpolicy.pipeline.torchrun`)."""
    from offpolicy.pipeline.torchrun import check_launch

    check_launch(cfg)
    if cfg.pipeline.mode == "ray":
        from offpolicy.pipeline.ray_runner import run_ray

        return run_ray(cfg, **kwargs)
    if cfg.pipeline.mode == "async":
        from offpolicy.pipeline.asynchronous import run_async as runner
    else:
        from offpolicy.pipeline.sync import run_sync as runner
    if cfg.train.workers == 1:
        return runner(cfg, **kwargs)
    from offpolicy.pipeline.torchrun import TorchrunGroup

    group = TorchrunGroup(cfg)
    try:
        return runner(cfg, step_fn=group.train_step, **kwargs)
    finally:
        group.close()

import pytest


def _demo_batch(run_dir, *overrides):
    """(config, context, one collated batch) of the bundled model on the demo tasks at a small size (8 prompts
    x 4 samples), with ``overrides``."""
    from offpolicy.config import load_config
    from offpolicy.data.experience import collate
    from offpolicy.pipeline.context import build_context
    from offpolicy.pipeline.explorer import Explorer

    cfg = load_config(None, [f"run.dir={run_dir}/run", "run.loggers=[]", "rollout.prompts_per_step=8",
                             "rollout.group_size=4", "tasks.eval_size=4", *overrides])
    ctx = build_context(cfg, run_dir)
    explorer = Explorer.from_context(ctx)
    try:
        batch = collate(explorer.explore(0, 0)[0], ctx.tokenizer.pad_token_id)
    finally:
        explorer.close()
    return cfg, ctx, batch


@pytest.fixture(scope="session")
def demo_batch():
    """:func:`_demo_batch`: ``demo_batch(run_dir, *overrides) -> (cfg, ctx, batch)``."""
    return _demo_batch

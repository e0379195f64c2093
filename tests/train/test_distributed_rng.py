"""Data-parallel ranks draw the step's random numbers from rank 0's state: RED-Drop picks the negatives it drops
with the torch RNG, on every rank over the whole batch, so ranks whose RNG states differ (a resumed run: rank 0
restored the checkpoint's, the others hold their seed's) drop different rows and the update is no longer the
one-process update."""

import torch
import torch.multiprocessing as mp

from offpolicy.config import load_config

OVERRIDES = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "train.threads=1",
             "algorithm.preset=red_drop"]


def _train(dp=None, *, reseed: int | None = None) -> dict:
    """Weights after one RED-Drop step on a batch whose groups each hold 1 positive and 3 negatives (2 dropped
    at random); the torch RNG at seed 0 (or ``reseed``) when the step starts."""
    from dataclasses import replace

    from offpolicy.pipeline.context import bind_algorithm, seed_everything
    from offpolicy.rollout.model import policy_from_config
    from offpolicy.train.step import train_step

    from test_distributed import _batch

    torch.set_num_threads(1)
    cfg = load_config(None, OVERRIDES)
    algo, plan = bind_algorithm(cfg)
    seed_everything(0)
    model, tok = policy_from_config(cfg.model)
    model = model.double()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    batch = _batch(model.config.vocab_size, tok.pad_token_id)
    batch = replace(batch, rewards_B=torch.tensor([1.0, 0.1, 0.2, 0.3] * 4))
    torch.manual_seed(0 if reseed is None else reseed)
    if dp is None:
        train_step(model, opt, batch, algo, plan, step=1)
    else:
        dp.prepare(model, opt, lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.train.lr))
        dp.train(batch, algo, plan, lrs=[cfg.train.lr], full=model, step=1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from offpolicy.train.distributed import join

    dp = join("127.0.0.1", port, rank, world)
    try:
        weights = _train(dp, reseed=None if rank == 0 else 1234)  # rank 1: not rank 0's RNG state
        if rank == 0:
            torch.save(weights, out)
    finally:
        dp.close()


def test_ranks_with_different_rng_states_still_give_the_one_process_update(tmp_path):
    import sys
    from pathlib import Path

    from offpolicy.train.distributed import free_address

    sys.path.insert(0, str(Path(__file__).parent))
    out = str(tmp_path / "rank0.pt")
    _, port = free_address()
    mp.start_processes(_rank, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out, weights_only=False)
    one = _train()
    other = _train(reseed=1234)  # the same step with other drops: the check below can tell them apart
    assert max((one[k] - other[k]).abs().max().item() for k in one) > 1e-6
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-9, rtol=0)

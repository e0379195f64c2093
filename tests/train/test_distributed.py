"""Data-parallel training: W=2 gloo ranks, each training its half of every micro-batch, give the update of
one process on the whole batch (to 1e-6), for each aggregation (token-mean, sequence means, Dr. GRPO's
constant normaliser), with micro- and mini-batches, and rows of unequal length (so the ranks' token counts
differ and only global counts give the right normalisation)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from offpolicy.config import load_config
from offpolicy.data.experience import Experience, collate

# (preset, aggregation it uses, extra overrides)
CASES = [
    ("grpo", ["train.micro_batches=2"]),  # token_mean
    ("gspo", ["train.mini_batches=2"]),  # seq_mean_token_mean
    ("rloo", []),  # seq_mean_token_sum
    ("dr_grpo", ["train.updates_per_batch=2"]),  # seq_mean_token_sum_norm
]
BASE = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "train.threads=1"]


def _batch(vocab: int, pad_id: int):
    """16 rows in 4 groups: prompts of 3-5 tokens, responses of 1-6 tokens (one row fully masked)."""
    g = torch.Generator().manual_seed(1)
    exps = []
    for i in range(16):
        group = i // 4
        prompt = torch.randint(3, vocab, (3 + group % 3,), generator=torch.Generator().manual_seed(group))
        T = 1 + int(torch.randint(0, 6, (), generator=g))
        mask = torch.ones(T) if i != 5 else torch.zeros(T)
        exps.append(Experience(prompt, torch.randint(3, vocab, (T,), generator=g), mask,
                               -torch.rand(T, generator=g) - 1.0, float(torch.rand((), generator=g)),
                               f"g{group}", f"t{group}", version=0, batch_index=0))
    return collate(exps, pad_id)


def _train_once(overrides: list[str], dp=None) -> tuple[dict, dict]:
    """(weights after one train_step, its statistics) from the bundled model, on :func:`_batch`."""
    from offpolicy.pipeline.context import bind_algorithm, seed_everything
    from offpolicy.rollout.model import policy_from_config
    from offpolicy.train.step import train_step

    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE, *overrides])
    algo, plan = bind_algorithm(cfg)
    seed_everything(0)
    model, tok = policy_from_config(cfg.model)
    model = model.double()  # float64: the comparison measures the math, not float32 summation order
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    batch = _batch(model.config.vocab_size, tok.pad_token_id)
    stats = train_step(model, opt, batch, algo, plan, step=1, dp=dp)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the group: every case in turn (one process start for all of them)."""
    from offpolicy.train.distributed import join

    dp = join("127.0.0.1", port, rank, world)
    try:
        results = [_train_once([f"algorithm.preset={preset}", *extra], dp) for preset, extra in CASES]
        if rank == 0:
            torch.save(results, out)
    finally:
        dp.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Each case's (weights, statistics) from a group of two gloo ranks (rank 0's)."""
    from offpolicy.train.distributed import free_address

    out = str(tmp_path_factory.mktemp("dp") / "rank0.pt")
    _, port = free_address()
    mp.start_processes(_rank, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_gloo_workers_give_the_one_worker_update(two_workers, case):
    preset, extra = CASES[case]
    overrides = [f"algorithm.preset={preset}", *extra]
    one, stats_one = _train_once(overrides)
    two, stats_two = two_workers[case]
    start, _ = _train_once(["train.lr=1e-30", *overrides])  # (nearly) the initial weights
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-5  # the update is not trivially zero
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0)
    # the step's statistics are the one-process ones too (sums by global counts; log-probs are float32)
    for k in ("loss", "grad_norm", "entropy"):
        assert stats_two[k] == pytest.approx(stats_one[k], rel=1e-6, abs=1e-9), k


def test_rows_split_every_mini_batch_evenly():
    from offpolicy.train.distributed import DataParallel

    parts = [DataParallel(r, 3).rows(10).tolist() for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_workers_need_ray_or_a_torchrun_launch_of_that_size(tmp_path, monkeypatch):
    from offpolicy.config import ConfigError
    from offpolicy.pipeline import run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(None, ["train.workers=2", f"run.dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="train.workers=2 with pipeline.mode=sync needs a torchrun launch of 2"):
        run(cfg, log=lambda *a: None)
    assert not (tmp_path / "x").exists()  # refused before anything was built
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="this launch has 3"):
        run(cfg, log=lambda *a: None)
    with pytest.raises((ConfigError, ValueError), match="pipeline.explorers needs pipeline.mode=ray"):
        load_config(None, ["pipeline.mode=async", "pipeline.explorers=2"])


@pytest.mark.slow
def test_torchrun_two_ranks_train_like_one(tmp_path):
    """``torchrun --nproc_per_node=2 -m offpolicy.cli train train.workers=2``: a sync run whose trainer is two
    gloo ranks logs the losses of the one-process run (the same batches: generation is rank 0's alone)."""
    import shutil
    import subprocess
    import sys

    from offpolicy.train.metrics import read_metrics

    args = ["train.steps=3", "eval.every=0", "tasks.eval_size=8", "run.progress=false", "run.loggers=[]",
            "train.threads=1", "rollout.prompts_per_step=8", "rollout.group_size=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "offpolicy.cli", "train", *args, f"run.dir={one}"], check=True, env=env,
                   capture_output=True)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "offpolicy.cli", "train", *args,
                          "train.workers=2", f"run.dir={two}"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r1, r2 = read_metrics(one, "train"), read_metrics(two, "train")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

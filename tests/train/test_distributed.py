"""Data-parallel training: W=2 gloo ranks, each training its half of every micro-batch, give the update of
one process on the whole batch (to 1e-6), under DDP and under FSDP2, for each aggregation (token-mean,
sequence means, Dr. GRPO's constant normaliser), with micro- and mini-batches, gradient clipping that
binds, and rows of unequal length (so the ranks' token counts differ and only global counts give the
right normalisation)."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from offpolicy.config import load_config
from offpolicy.data.experience import Experience, collate

# (preset, aggregation it uses, extra overrides)
CASES = [
    ("grpo", ["train.micro_batches=2", "train.grad_clip=0.05"]),  # token_mean; the clip binds (norm ~0.4)
    ("gspo", ["train.mini_batches=2", "train.micro_batches=2"]),  # seq_mean_token_mean
    ("rloo", []),  # seq_mean_token_sum
    ("dr_grpo", ["train.updates_per_batch=2"]),  # seq_mean_token_sum_norm
    # KL to the reference and KL-Convex to pi_{k-1}: models only rank 0 holds (their log-probs travel on the batch)
    ("remix", ["algorithm.kl_coef=0.5", "algorithm.kl_convex.start=0", "algorithm.kl_convex.every=1"]),
]
PARALLEL = ["ddp", "fsdp2"]
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


def _train_once(overrides: list[str], dp=None) -> tuple[dict, dict, dict]:
    """(weights after one train_step, its statistics, the optimiser state) from the bundled model, on
    :func:`_batch`; with ``dp``, rank 0's full model and the optimiser state a checkpoint would hold."""
    from offpolicy.pipeline.context import bind_algorithm, seed_everything
    from offpolicy.rollout.model import policy_from_config
    from offpolicy.train.step import train_step

    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE, *overrides])
    algo, plan = bind_algorithm(cfg)
    seed_everything(0)
    model, tok = policy_from_config(cfg.model)
    model = model.double()  # float64: the comparison measures the math, not float32 summation order

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))

    opt = adamw(model)
    batch = _batch(model.config.vocab_size, tok.pad_token_id)
    models = {}  # the reference and pi_{k-1}: copies moved away from the policy, so both KL terms have a gradient
    for name, kind, seed in (("ref_model", plan.ref_logp, 2), ("prev_model", plan.prev_logp, 3)):
        if kind != "unused":
            models[name] = other = copy.deepcopy(model).eval().requires_grad_(False)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    step = 60  # past ReMix's KL-Convex start, so lambda(step) > 0 for the remix case
    if dp is None:
        stats = train_step(model, opt, batch, algo, plan, step=step, **models)
        state = opt.state_dict()
    else:
        from offpolicy.train.distributed import with_rank0_logprobs

        batch, kw = with_rank0_logprobs(batch, plan, step=step, **models)  # what rank 0 sends with the batch
        dp.prepare(model, opt, adamw)
        stats = dp.train(batch, algo, plan, lrs=[cfg.train.lr], full=model, **kw)
        state = dp.optimizer_state(model) if dp.parallel == "fsdp2" else opt.state_dict()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats, state


def _shard_fraction(dp) -> float:
    """The fraction of the model's parameter elements this rank holds."""
    local = sum(getattr(p, "_local_tensor", p).numel() for p in dp.model.parameters())
    return local / sum(p.numel() for p in dp.model.parameters())


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the group: every case under each parallel mode in turn (one process start for all)."""
    from offpolicy.train.distributed import DataParallel, join

    dp = join("127.0.0.1", port, rank, world)
    try:
        results = {}
        for parallel in PARALLEL:
            for preset, extra in CASES:
                mode = DataParallel(rank, world, parallel)
                # fsdp2 shards the layer modules, whose forwards the lean forward (ddp here) does not call
                impl = ["model.forward_impl=transformers"] if parallel == "fsdp2" else []
                results[parallel, preset] = _train_once([f"algorithm.preset={preset}", *extra, *impl], mode)
            results[parallel, "shard"] = _shard_fraction(mode)
        if rank == 0:
            torch.save(results, out)
    finally:
        dp.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Each (parallel mode, case)'s (weights, statistics, optimiser state) from a group of two gloo ranks
    (rank 0's), and the fraction of the parameters rank 0 trains in each mode."""
    from offpolicy.train.distributed import free_address

    out = str(tmp_path_factory.mktemp("dp") / "rank0.pt")
    for attempt in range(3):  # the free port can be taken by another test process before the store binds it
        _, port = free_address()
        try:
            mp.start_processes(_rank, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
            break
        except mp.ProcessRaisedException as e:
            if attempt == 2 or not any(s in str(e) for s in ("EADDRINUSE", "address already in use")):
                raise
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_worker():
    """Each case's (weights, statistics, optimiser state) from one process."""
    return {preset: _train_once([f"algorithm.preset={preset}", *extra]) for preset, extra in CASES}


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_gloo_workers_give_the_one_worker_update(two_workers, one_worker, parallel, case):
    preset, extra = CASES[case]
    one, stats_one, opt_one = one_worker[preset]
    two, stats_two, opt_two = two_workers[parallel, preset]
    start, _, _ = _train_once(["train.lr=1e-30", f"algorithm.preset={preset}", *extra])  # ~ the initial weights
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-5  # the update is not trivially zero
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0)
    # the step's statistics are the one-process ones too (sums by global counts; log-probs are float32)
    for k in ("loss", "grad_norm", "entropy"):
        assert stats_two[k] == pytest.approx(stats_one[k], rel=1e-6, abs=1e-9), k
    # what a checkpoint holds: the optimiser state (FSDP2: gathered from the shards, numbered as one process's)
    assert opt_two["state"].keys() == opt_one["state"].keys()
    for i, moments in opt_one["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(opt_two["state"][i][name].to(value.dtype), value, atol=1e-6, rtol=0)


def test_both_kl_terms_act_in_the_remix_case(one_worker):
    _, stats, _ = one_worker["remix"]
    assert stats["kl_ref"] > 1e-3 and stats["kl_prev"] > 1e-3 and stats["kl_convex_lambda"] > 0


def test_clipping_binds_in_the_clipped_case(one_worker):
    _, stats, _ = one_worker["grpo"]
    assert stats["grad_norm"] > 0.05 * 2  # so the equality above covers clipping by the global norm


def test_fsdp2_ranks_hold_half_the_parameters(two_workers):
    assert two_workers["ddp", "shard"] == 1.0
    assert two_workers["fsdp2", "shard"] == pytest.approx(0.5, abs=0.01)


def test_parallel_needs_several_workers():
    from offpolicy.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train.parallel=fsdp2 is read only with train.workers > 1"):
        load_config(None, ["train.parallel=fsdp2"])
    assert load_config(None, ["train.workers=2", "train.parallel=fsdp2"]).train.parallel == "fsdp2"


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


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """model.device=cuda under torchrun: rank LOCAL_RANK sets cuda:LOCAL_RANK as its current device (so the
    policy and NCCL land there); an explicit index on every rank is refused; CPUs and single processes untouched."""
    from offpolicy.config import ConfigError
    from offpolicy.pipeline.torchrun import bind_local_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    bind_local_device("cuda")
    bind_local_device("cpu")
    assert chosen == [3]
    with pytest.raises(ConfigError, match="model.device=cuda:1 under torchrun puts all 4 ranks on one GPU"):
        bind_local_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    bind_local_device("cuda:1")  # one process: whatever GPU it names
    assert chosen == [3]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
def test_torchrun_two_ranks_train_like_one(tmp_path, parallel):
    """``torchrun --nproc_per_node=2 -m offpolicy.cli train train.workers=2``: a sync run whose trainer is two
    gloo ranks logs the losses of the one-process run (the same batches: generation is rank 0's alone, with
    the weights the group trained), and its last checkpoint holds the optimiser state of every parameter,
    numbered as the one-process run's (FSDP2: gathered from the shards)."""
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
                          "train.workers=2", f"train.parallel={parallel}", f"run.dir={two}"], env=env,
                         capture_output=True, text=True, timeout=240)  # a rank hung in the group's teardown once
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r1, r2 = read_metrics(one, "train"), read_metrics(two, "train")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    from offpolicy.train.checkpoint import latest_checkpoint

    last = [torch.load(latest_checkpoint(d) / "trainer.pt", weights_only=False)["optimizer"] for d in (one, two)]
    assert last[1]["state"].keys() == last[0]["state"].keys() and last[0]["state"]
    assert {int(v["step"]) for v in last[1]["state"].values()} == {3}
    assert [g["lr"] for g in last[1]["param_groups"]] == [g["lr"] for g in last[0]["param_groups"]]


def test_compile_is_refused_with_several_workers():
    from offpolicy.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train.compile=true is not wired for train.workers > 1"):
        load_config(None, ["train.workers=2", "train.compile=true"])
    assert load_config(None, ["train.compile=true"]).train.compile

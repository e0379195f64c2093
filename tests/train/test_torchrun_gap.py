"""Under torchrun, ranks 1..W-1 wait between steps for rank 0's next message while rank 0 generates, evaluates
and checkpoints alone, which can take longer than the group's collective timeout (``join_from_env``'s 300 s).
That wait must not be a collective under that timeout, or the workers die of it and the run with them."""

import os

import pytest
import torch.multiprocessing as mp

from offpolicy.config import load_config

TIMEOUT_S = 2.0  # the collective timeout for the test (300 s in a run)
GAP_S = 5.0  # rank 0 generating and evaluating between steps


def _rank(rank: int, port: int, out: str) -> None:
    import time

    from offpolicy.train import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real, ready = distributed.join_from_env, out + ".joining"

    def join_from_env(**kw):  # both ranks reach the rendezvous together (rank 1 loads its policy first)
        if rank == 1:
            open(ready, "w").close()
        while not os.path.exists(ready):
            time.sleep(0.05)
        return real(**{**kw, "timeout_s": TIMEOUT_S})

    distributed.join_from_env = join_from_env
    cfg = load_config(None, ["train.workers=2", "train.threads=1"])
    if rank == 0:
        from offpolicy.pipeline.torchrun import TorchrunGroup

        group = TorchrunGroup(cfg)
        time.sleep(GAP_S)
        group.close()  # the run is over: the worker returns 0
        return
    from offpolicy.pipeline.torchrun import serve

    try:
        code = serve(cfg)
    except Exception as e:  # noqa: BLE001 - recorded for the test
        code = f"{type(e).__name__}: {str(e)[:200]}"
    with open(out, "w") as f:
        f.write(str(code))


@pytest.mark.slow  # a long end-to-end run: make test-slow (CI runs it)
def test_workers_outwait_a_gap_longer_than_the_collective_timeout(tmp_path):
    from offpolicy.train.distributed import free_address

    out = tmp_path / "worker"
    _, port = free_address()
    mp.start_processes(_rank, args=(port, str(out)), nprocs=2, join=True, start_method="spawn")
    assert out.read_text() == "0"

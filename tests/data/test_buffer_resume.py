"""Resume with a replay strategy: the groups consumed after the checkpoint must not block the regenerated batch."""

import pytest
import torch

from offpolicy.data.buffer import MemoryBuffer
from offpolicy.data.experience import Experience
from offpolicy.data.sampling import make_strategy
from offpolicy.pipeline.resume import RollBackBatches


def _batch(b):
    """Two tasks of two rows, group ids as the workflow makes them (``task@b<batch>``)."""
    return [Experience(torch.tensor([1]), torch.tensor([2]), torch.ones(1), torch.zeros(1), 0.0, f"t{b}{t}@b{b}",
                       f"t{b}{t}", version=b, batch_index=b) for t in range(2) for _ in range(2)]


@pytest.mark.parametrize("name", ["mix", "priority"])
def test_resume_after_consumed_batches_can_put_the_regenerated_batch(name):
    buf, s = MemoryBuffer(), make_strategy(name)
    for step in range(1, 4):  # steps 1..3 train batches 0..2; the checkpoint was after step 2 (next batch 2)
        buf.put(_batch(step - 1))
        assert len(buf.sample(4, s, now_version=step - 1)) == 4
    buf.sample(0, RollBackBatches(1), now_version=2)  # what restore_run does
    buf.put(_batch(2))  # the explorer regenerates batch 2 from the checkpoint's cursor

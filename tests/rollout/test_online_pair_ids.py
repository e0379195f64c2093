"""Online DPO pair ids come from the samples' fields (task id, batch index), not from parsing their group id:
a task id holding '#' (a task file named ``a#b.jsonl``) gave every task of the batch the same pair ids, so
the buffer merged the pairs of different tasks into one group."""

import torch

from offpolicy.data.experience import Experience
from offpolicy.rollout.online_pairs import build_pairs
from offpolicy.rollout.workflow import group_id


def _group(task_id, rewards, fault_at=None):
    out = []
    for i, r in enumerate(rewards):
        e = Experience(torch.tensor([1, 2]), torch.tensor([10 + i, 20 + i]), torch.ones(2), torch.zeros(2), r,
                       f"{task_id}@b3", task_id, version=2, batch_index=3, info={})
        if i == fault_at:
            e.info["reward_fault"] = "raised"
            e.response_mask = torch.zeros(2)
            e.group_id += f"#invalid{i}"
        out.append(e)
    return out


def test_pair_ids_of_tasks_whose_ids_hold_a_hash_stay_apart():
    rows = [e for t in ("a#b-1", "a#b-2") for e in build_pairs(_group(t, [1.0, 0.0]), "best_vs_worst", 2)]
    assert [e.group_id for e in rows] == ["a#b-1@b3/p0"] * 2 + ["a#b-2@b3/p0"] * 2
    assert [e.info["pair_id"] for e in rows[::2]] == ["a#b-1@b3/p0", "a#b-2@b3/p0"]


def test_a_faulted_first_sample_does_not_change_the_pair_ids():
    rows = build_pairs(_group("t7", [1.0, 0.0, 1.0], fault_at=0), "best_vs_worst", 3)
    assert {e.group_id for e in rows} == {group_id(rows[0], 2, 3) + "/p0"} == {"t7@b3/p0"}

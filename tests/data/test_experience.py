"""Experience fields and collate: the engine's untruncated log-probs beside the behaviour ones."""

import torch

from offpolicy.data.experience import Experience, collate


def _exp(response, behav, engine=None, batch_index=-1):
    return Experience(prompt_ids=torch.tensor([1, 2]), response_ids=torch.tensor(response),
                      response_mask=torch.ones(len(response)), behav_logp=torch.tensor(behav),
                      engine_logp=None if engine is None else torch.tensor(engine), reward=0.0, group_id="g",
                      task_id="t", batch_index=batch_index)


def test_engine_logp_is_none_unless_a_row_has_it_then_behav_stands_in():
    truncated = _exp([3, 4, 5], [-0.1, -0.2, -0.3], engine=[-0.5, -0.6, -0.7])
    plain = _exp([6], [-0.4])
    assert collate([plain], pad_id=0).engine_logp_BT is None
    batch = collate([truncated, plain], pad_id=0)
    torch.testing.assert_close(batch.engine_logp_BT, torch.tensor([[-0.5, -0.6, -0.7], [-0.4, 0.0, 0.0]]),
                               atol=0, rtol=0)
    torch.testing.assert_close(batch.select(torch.tensor([1])).engine_logp_BT, torch.tensor([[-0.4, 0.0, 0.0]]),
                               atol=0, rtol=0)


def test_bytes_round_trip_keeps_batch_index_and_engine_logp():
    e = _exp([3, 4], [-0.1, -0.2], engine=[-0.3, -0.4], batch_index=12)
    back = Experience.from_bytes(*e.to_bytes())
    assert back.batch_index == 12 and torch.equal(back.engine_logp, e.engine_logp)
    assert Experience.from_bytes(*_exp([3], [-0.1]).to_bytes()).engine_logp is None


def test_experience_ids_are_unique_and_a_forked_child_draws_its_own_prefix():
    import multiprocessing as mp

    from offpolicy.data.experience import _new_eid

    ids = [_new_eid() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=lambda: child.send(_new_eid()))
    proc.start()
    theirs = parent.recv()
    proc.join()
    assert theirs[:20] != ids[0][:20] and theirs not in ids

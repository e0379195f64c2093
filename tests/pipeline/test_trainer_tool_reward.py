"""SPEAR's intrinsic tool-call reward counts the calls the environment ran, not those it refused for going past
``max_calls_per_turn`` (ALGORITHMS.md section 7: a reward for tool interactions; a refused call gets no result)."""

from types import SimpleNamespace

import torch

from offpolicy.algos.presets import ToolRewardSettings
from offpolicy.data.experience import Experience
from offpolicy.pipeline.trainer import TrainLoop


def _loop(seen: list):
    loop = object.__new__(TrainLoop)
    algo = SimpleNamespace(settings={"tool_reward": ToolRewardSettings(coef=0.1, max_calls=10, horizon=200)})
    loop.ctx = SimpleNamespace(algo=algo, tokenizer=SimpleNamespace(pad_token_id=0), model=None, optimizer=None,
                               plan=None, ref_model=None, scheduler=SimpleNamespace(step=lambda: None))
    loop.ref_cache = loop.prev_model = loop.sil = None
    loop.step_fn = lambda model, opt, batch, *a, **kw: seen.append(batch.rewards_B.tolist()) or {}
    return loop


def _exp(calls: int, refused: int) -> Experience:
    episode = {"tool_calls": calls, "tool_errors/too_many_calls": refused, "tool_errors/unknown_tool": 0}
    return Experience(torch.tensor([1]), torch.tensor([2, 3]), torch.ones(2), torch.zeros(2), 0.0, "g", "t",
                      info={"episode": episode})


def test_calls_refused_past_max_calls_per_turn_earn_no_tool_reward():
    seen = []
    # 10 parsed calls in one turn with max_calls_per_turn=4: 4 ran, 6 were refused ("not run")
    record = _loop(seen).train([_exp(10, 6), _exp(3, 0)], step=0)  # w_tool(0) = 1
    assert torch.allclose(torch.tensor(seen[0]), torch.tensor([0.4, 0.3]), atol=1e-6, rtol=0)  # 0.1 * 4, 0.1 * 3
    assert abs(record["tool_reward_mean"] - 0.35) < 1e-6

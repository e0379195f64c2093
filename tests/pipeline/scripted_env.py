"""Scripted environments for pipeline tests (imported by name: ``tests.pipeline.scripted_env:<name>``)."""

from offpolicy.rewards.exact_match import exact_match
from offpolicy.rollout.env import StepResult


class AnswerEnv:
    """Every turn is a final answer, scored by exact match: the single-turn task as a multi-turn episode."""

    def __init__(self, bonus_calls: int = 0):
        self.bonus_calls = bonus_calls

    async def reset(self, task):
        self.task = task
        return ""

    async def step(self, action):
        ok = exact_match(action, self.task.answer) >= 1.0
        return StepResult(reward=float(ok), done=True, info={"success": ok, "tool_calls": self.bonus_calls})

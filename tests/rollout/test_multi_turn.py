"""Multi-turn workflow: token-in / token-out assembly checked token by token with a scripted engine and
environment; the prefix check on a chat template that re-tokenises; limits on turns and tokens."""

import asyncio

import pytest
import torch

from offpolicy.data.arithmetic import Task
from offpolicy.rewards.guard import GuardedReward
from offpolicy.rewards.exact_match import exact_match
from offpolicy.rollout.engine import Rollouts
from offpolicy.rollout.env import StepResult
from offpolicy.rollout.multi_turn import MultiTurn
from offpolicy.rollout.workflow import Sampling

ALPHABET = "0123456789+-*=[]{}?"


@pytest.fixture(scope="module")
def tok():
    from offpolicy.train.tiny import build_tokenizer

    return build_tokenizer(ALPHABET)


class ScriptedEngine:
    """Answers turn t of every row with ``turns[t]`` (text) and log-probs -0.1, -0.2, ...; records contexts."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.calls = tok, turns, []

    def generate(self, prompts, *, n=1, max_new_tokens=8, stop_ids=(), **kw):
        self.calls.append({"prompts": [list(p) for p in prompts], "stop_ids": list(stop_ids),
                           "max_new_tokens": max_new_tokens, "n": n})
        text = self.turns[len(self.calls) - 1]
        ids = self.tok(text.replace("<eos>", ""), add_special_tokens=False)["input_ids"]
        ids += [self.tok.eos_token_id] if text.endswith("<eos>") else []
        ids = torch.tensor(ids[:max_new_tokens])
        lp = -0.1 * torch.arange(1, len(ids) + 1, dtype=torch.float32)
        rows = len(prompts) * n
        return Rollouts([i for i in range(len(prompts)) for _ in range(n)], [ids] * rows, [lp] * rows,
                        [text.endswith("<eos>")] * rows)


class ScriptedCalc:
    """A compact-format calculator: ``[a*b]`` -> ``{a*b}``, a turn without a call ends the episode."""

    stop = ("]",)

    def __init__(self):
        self.log = []

    async def reset(self, task):
        return ""

    async def step(self, action):
        self.log.append(action)
        if action.startswith("["):
            a, b = action.strip("[]").split("*")
            return StepResult(f"{{{int(a) * int(b)}}}", info={"tool_calls": 1})
        return StepResult(reward=float(action == "36"), done=True, info={"success": action == "36"})


def _run(tok, turns, env_cls=ScriptedCalc, **kw):
    engine = ScriptedEngine(tok, turns)
    wf = MultiTurn(env_cls, **kw)
    scorer = GuardedReward(exact_match, timeout_s=None)
    exps = wf(engine, tok, [Task("t0", "12*3=", "36")], scorer, sampling=Sampling(group_size=1, max_new_tokens=8),
              version=3, batch_index=7)
    return exps, engine


def test_two_tool_episode_token_by_token(tok):
    exps, engine = _run(tok, ["[12*3]", "[6*6]", "36<eos>"])
    (e,) = exps
    ids = e.response_ids.tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "[12*3]{36}[6*6]{36}36"
    # model turns: "[12*3]" (6 tokens), "[6*6]" (5), "36<eos>" (3); environment: "{36}" twice (4 each)
    assert e.response_mask.tolist() == [1] * 6 + [0] * 4 + [1] * 5 + [0] * 4 + [1] * 3
    lp = [round(x, 6) for x in e.behav_logp.tolist()]
    turn = lambda k: [round(-0.1 * i, 6) for i in range(1, k + 1)]  # noqa: E731
    assert lp == turn(6) + [0.0] * 4 + turn(5) + [0.0] * 4 + turn(3)
    assert ids[-1] == tok.eos_token_id and e.engine_logp is None
    # each turn's context is the prompt plus everything so far, exactly (token in, token out)
    prompt = tok("12*3=")["input_ids"]
    assert engine.calls[0]["prompts"] == [prompt]
    assert engine.calls[1]["prompts"] == [prompt + ids[:10]]
    assert engine.calls[2]["prompts"] == [prompt + ids[:19]]
    assert engine.calls[0]["stop_ids"] == [tok.convert_tokens_to_ids("]")]
    assert e.prompt_ids.tolist() == prompt
    assert e.reward == 1.0 and e.info["correct"] and e.version == 3 and e.batch_index == 7
    assert e.info["episode"]["turns"] == 3 and e.info["episode"]["tool_calls"] == 2
    assert e.info["episode"]["prefix_failures"] == 0


def test_turn_and_token_limits(tok):
    exps, engine = _run(tok, ["[1*1]", "[2*2]", "[3*3]"], max_turns=2)
    assert len(engine.calls) == 2 and exps[0].info["episode"]["turns"] == 2
    assert tok.decode(exps[0].response_ids, skip_special_tokens=True) == "[1*1]{1}[2*2]"  # no observation after the last turn
    assert exps[0].reward == 0.0
    exps, engine = _run(tok, ["[12*3]", "36<eos>"], max_total_tokens=8)
    # 6 model tokens + the observation cut to the 2 tokens left: the budget ends the episode
    assert len(engine.calls) == 1 and exps[0].response_mask.tolist() == [1] * 6 + [0] * 2


class CharChat:
    """A fake chat tokenizer: one id per character; the template writes 'role:content|' per message."""

    eos_token_id = 0
    pad_token_id = 1

    def __init__(self, reencode):
        self.reencode = reencode

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=True):
        text = "".join(f"{m['role']}:{self.reencode(m['content']) if m['role'] == 'assistant' else m['content']}"
                       + ("" if m['role'] == 'assistant' else "|") for m in messages)
        ids = [ord(c) for c in text]
        out = []
        for m_ids in ids:
            out.append(m_ids)
        return out + [ord(c) for c in "assistant:"] if add_generation_prompt else out


class ChatEnv:
    chat, tools, stop = True, [], ()

    async def reset(self, task):
        return ""

    async def step(self, action):
        if action.startswith("c"):
            return StepResult("r", info={"tool_calls": 1})
        return StepResult(reward=float(action == "42"), done=True, info={"success": action == "42"})


class ChatEngine:
    def __init__(self, turns):
        self.turns, self.n = turns, 0

    def generate(self, prompts, **kw):
        ids = [ord(c) for c in self.turns[self.n]] + [0]  # the turn ends with the end-of-turn token
        self.n += 1
        return Rollouts([0], [torch.tensor(ids)], [torch.full((len(ids),), -0.5)], [True])


def _chat(reencode):
    tok = CharChat(reencode)
    wf = MultiTurn(ChatEnv, max_turns=3, max_total_tokens=100)
    # the fake template closes an assistant message with its end-of-turn token, as real templates do
    tok_call = tok.apply_chat_template

    def with_eot(messages, **kw):
        ids = []
        for m in messages:
            part = tok_call([m], add_generation_prompt=False)
            ids += part + ([0] if m["role"] == "assistant" else [])
        return ids + ([ord(c) for c in "assistant:"] if kw.get("add_generation_prompt") else [])

    tok.apply_chat_template = with_eot
    return wf(ChatEngine(["call", "42"]), tok, [Task("t", "q", "42")], GuardedReward(exact_match, timeout_s=None),
              sampling=Sampling(group_size=1))


def test_chat_observations_extend_the_prefix(tok):
    (e,) = _chat(lambda s: s)
    text = "".join(chr(i) if i > 1 else "|" for i in e.response_ids.tolist())
    assert text == "call|tool:r|assistant:42|"
    mask = e.response_mask.tolist()
    assert mask == [1] * 5 + [0] * len("tool:r|assistant:") + [1] * 3
    assert e.info["episode"]["prefix_failures"] == 0 and e.reward == 1.0


def test_a_template_that_retokenises_is_caught_and_not_trained(capsys):
    (e,) = _chat(lambda s: s.upper())  # the template rewrites what the model said
    assert e.info["episode"]["prefix_failures"] == 1
    assert e.response_mask.sum() == 0 and "#prefix" in e.group_id
    err = capsys.readouterr().err
    assert "does not extend the previous turn's token ids at turn 1" in err and "task t" in err


def test_hermes_episode_with_the_smoke_qwen2_chat_template(smoke_model_dir):
    """One tool episode through apply_chat_template(tools=...) and the Hermes parser: the model's call turn,
    the tool message rendered by the template (mask 0, extending the ids exactly), the final answer."""
    from offpolicy.rollout.env import make_env_factory
    from offpolicy.rollout.model import load_tokenizer

    tok = load_tokenizer(str(smoke_model_dir))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "482*77"}}\n</tool_call>'
    turns = [tok(call, add_special_tokens=False)["input_ids"], tok("37114", add_special_tokens=False)["input_ids"]]

    class Engine:
        def __init__(self):
            self.contexts = []

        def generate(self, prompts, **kw):
            ids = turns[len(self.contexts)] + [tok.eos_token_id]
            self.contexts.append(list(prompts[0]))
            return Rollouts([0], [torch.tensor(ids)], [torch.full((len(ids),), -0.25)], [True])

    engine = Engine()
    wf = MultiTurn(make_env_factory("calculator", format="hermes"), max_turns=3, max_total_tokens=400)
    (e,) = wf(engine, tok, [Task("t", "What is 482*77?", "37114")], GuardedReward(exact_match, timeout_s=None),
              sampling=Sampling(group_size=1, max_new_tokens=100))
    prompt = engine.contexts[0]
    assert "calculator" in tok.decode(prompt)  # the tool's schema is in the rendered system block
    assert e.info["episode"]["prefix_failures"] == 0 and e.info["episode"]["tool_calls"] == 1
    assert e.info["correct"] and e.reward == 1.0
    ids, mask = e.response_ids.tolist(), e.response_mask.tolist()
    n1 = len(turns[0]) + 1
    obs = len(engine.contexts[1]) - len(prompt) - n1
    assert mask == [1] * n1 + [0] * obs + [1] * (len(turns[1]) + 1)
    assert engine.contexts[1] == prompt + ids[: n1 + obs]  # the template extended the ids exactly
    assert "<tool_response>" in tok.decode(ids[n1 : n1 + obs]) and "37114" in tok.decode(ids[n1 : n1 + obs])
    assert e.behav_logp.tolist() == [-0.25] * n1 + [0.0] * obs + [-0.25] * (len(turns[1]) + 1)


class RaisingEnv(ScriptedCalc):
    async def step(self, action):
        raise RuntimeError("the environment broke")


def test_an_environment_that_raises_isolates_its_episode(tok, capsys):
    exps, _ = _run(tok, ["[12*3]"], env_cls=RaisingEnv)
    (e,) = exps
    assert e.info["reward_fault"] == "env_exception" and e.response_mask.sum() == 0 and e.reward == 0.0
    assert "the environment raised on task t0" in capsys.readouterr().err


def test_workflow_settings_no_environment_honours_are_refused():
    from offpolicy.config import ConfigError, load_config
    from offpolicy.pipeline.context import check_workflow

    base = ["workflow.name=multi_turn", "workflow.env=calculator", "tasks.name=calculator"]
    check_workflow(load_config(None, base))
    with pytest.raises(ConfigError, match="workflow.tool_timeout_s: the environment 'calculator' takes no"):
        check_workflow(load_config(None, [*base, "workflow.tool_timeout_s=2"]))
    with pytest.raises(ConfigError, match="env_args for 'calculator'.*formt"):
        check_workflow(load_config(None, [*base, "workflow.env_args={formt: hermes}"]))
    with pytest.raises(ConfigError, match="unknown environment 'calculater'.*did you mean 'calculator'"):
        check_workflow(load_config(None, ["workflow.name=multi_turn", "workflow.env=calculater"]))
    with pytest.raises(ConfigError, match="workflow.max_turns needs workflow.name=multi_turn"):
        load_config(None, ["workflow.max_turns=2"])


def test_first_turn_shares_each_task_prompt_across_its_group(tok):
    engine = ScriptedEngine(tok, ["[12*3]", "36<eos>"])
    wf = MultiTurn(ScriptedCalc)
    tasks = [Task("a", "12*3=", "36"), Task("b", "2*3=", "6")]
    exps = wf(engine, tok, tasks, GuardedReward(exact_match, timeout_s=None), sampling=Sampling(group_size=3))
    # turn 1: one context per task, n = 3; the scripted turns keep each group's contexts identical, so turn 2
    # shares too (with sampled turns they differ, and every episode then goes with n = 1)
    assert engine.calls[0]["n"] == 3 and engine.calls[0]["prompts"] == [tok(t.prompt)["input_ids"] for t in tasks]
    assert engine.calls[1]["n"] == 3 and len(engine.calls[1]["prompts"]) == 2
    assert [e.task_id for e in exps] == ["a"] * 3 + ["b"] * 3
    assert [e.reward for e in exps] == [1.0] * 6  # the scripted environment accepts "36" whatever the task


def test_contexts_are_shared_only_while_each_group_agrees():
    from offpolicy.rollout.multi_turn import _shared

    assert _shared([[1], [1], [2], [2]], 2) == ([[1], [2]], 2)
    assert _shared([[1], [1, 5], [2], [2]], 2) == ([[1], [1, 5], [2], [2]], 1)
    assert _shared([[1], [1], [1]], 2) == ([[1], [1], [1]], 1)  # not whole groups

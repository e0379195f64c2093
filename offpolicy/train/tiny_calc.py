"""Build the bundled tiny calculator agent (``assets/tiny-calc``): the tiny-arith tokenizer and model
shape over the calculator alphabet, warm-started by supervised learning on a mixture of tool-using and
direct answers to multiplication problems (:mod:`offpolicy.data.calculator`).

A fraction ``tool_frac`` of the demonstrations use the calculator, ``482*77=[482*77]{37114}37114<eos>``,
with the observation ``{37114}`` masked out of the loss (as RL will mask it); the rest answer directly
with the true product, which a model this small can only guess (it learns the leading and last digits).
The warm start therefore calls the tool in a minority of samples, copies the result correctly when it
does, and fails when it does not: RL with reward = success raises success by calling the tool more often.

Recipe and measurements (2 cores, torch 2.13 CPU; held-out = 256 eval tasks, sampled = 4 per task at
temperature 1): AdamW betas (0.9, 0.98), 50 warm-up steps then lr 1e-3, batch 64, 800 steps, tool_frac
0.3 (~60-100 s quiet). Seed 0, the bundled model: greedy success 0.070, sampled tool-call rate 0.232,
sampled success 0.229, copy accuracy 0.979 (seed 1: 0.160 / 0.300 / 0.295 / 0.980). Other settings
(seed 0 unless said): tool_frac 0.25 at 600 steps 0.145 / 0.231 / 0.209 / 0.895, at 800 steps 0.062 /
0.188 / 0.184 / 0.974; tool_frac 0.15 at 600 steps 0.000 / 0.090 / 0.074 / 0.793; tool_frac 0.35 at
600 steps 0.340 / 0.346 / 0.312 / 0.901 (too much greedy success left). Greedy success jumps between
checkpoints (it is the share of prompts where ``[`` beats the likeliest first digit), so it is reported
with the sampled rate, which moves smoothly.

RL check (a scratch on-policy GRPO loop over :func:`rollout`, not project code: 32 tasks x 8 samples per
step, reward = success, group-normalised advantages, token-mean loss, one update per batch, grad clip 1):
lr 3e-4 takes held-out greedy success 0.070 -> 0.992 in 10 steps (sampled tool-call rate per step 0.24,
0.36, 0.46, ..., 0.71 at step 5, 0.92 at step 10, 0.996 at step 20) and 1.000 at step 40, 21 s in all on
a quiet machine (~0.5 s a step). lr 1e-4: 0.941 at step 10, 1.000 at step 20. lr 1e-3: 0.996 at step
10, then copying degrades (0.922 at step 40). Even tool_frac 0.15 (rate 0.09) reaches 0.930 in 10 steps
at lr 3e-4: the improvement hinges on one decision token, so the demo is robust rather than subtle.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offpolicy.data import calculator
from offpolicy.train.tiny import build_model, build_tokenizer, save_tiny, sft_warm_start

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-calc"


@dataclass
class Episode:
    """One multi-turn episode: every token (``<bos>``, prompt, model turns, observations), which of them
    the model wrote (``trained``), the tool calls made, the final answer and whether it is right."""

    task_index: int
    ids: list[int]
    trained: list[bool]
    calls: list[str] = field(default_factory=list)
    answer: str = ""
    success: bool = False


@torch.no_grad()
def rollout(model, tokenizer, tasks, *, n: int = 1, greedy: bool = False, temperature: float = 1.0,
            generator: torch.Generator | None = None, max_turns: int = 3, max_turn_tokens: int = 12) -> list[Episode]:
    """``n`` episodes per task (in task order) in the compact tool format. A model turn ends at ``]`` (a
    call: the calculator's answer ``{...}`` is appended and the model goes on) or at ``<eos>`` (the final
    answer); an episode still calling the tool after ``max_turns`` turns has no answer."""
    from offpolicy.rollout.engine import HFEngine

    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    close_id = tokenizer.convert_tokens_to_ids("]")
    prompts = [tokenizer(t.prompt)["input_ids"] for t in tasks]
    eps = [Episode(i, list(p), [False] * len(p)) for i, p in enumerate(prompts) for _ in range(n)]
    active = list(range(len(eps)))
    for turn in range(max_turns):
        if not active:
            break
        # the engine stops at <eos> only: a turn is cut at its first "]" (the tokens before it are
        # sampled exactly as if generation had paused there)
        first = turn == 0
        ro = engine.generate(prompts if first else [eps[i].ids for i in active], n=n if first else 1,
                             max_new_tokens=max_turn_tokens, temperature=temperature, greedy=greedy,
                             generator=generator)
        still = []
        for i, resp in zip(active, ro.response_ids):
            resp = resp.tolist()
            if close_id in resp:
                resp = resp[: resp.index(close_id) + 1]
            ep = eps[i]
            ep.ids += resp
            ep.trained += [True] * len(resp)
            text = tokenizer.decode(resp, skip_special_tokens=True)
            if resp and resp[-1] == close_id and "[" in text:
                expr = text[text.rindex("[") + 1 : -1]
                obs = tokenizer("{" + calculator.calculate(expr) + "}", add_special_tokens=False)["input_ids"]
                ep.calls.append(expr)
                ep.ids += obs
                ep.trained += [False] * len(obs)
                still.append(i)
            else:
                ep.answer = text
                ep.success = text == tasks[ep.task_index].answer
        active = still
    return eps


def measure(model, tokenizer, tasks, *, samples: int = 4, seed: int = 0) -> dict[str, float]:
    """Held-out numbers of a calculator agent: ``greedy_success`` and ``greedy_tool_rate``; at temperature
    1 with ``samples`` per task, ``tool_rate`` (episodes with a call), ``sampled_success`` and
    ``copy_accuracy`` (success among the episodes that called the tool: call and result copied right)."""
    was_training = model.training
    model.eval()
    greedy = rollout(model, tokenizer, tasks, greedy=True)
    sampled = rollout(model, tokenizer, tasks, n=samples, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    called = [e for e in sampled if e.calls]
    return {
        "greedy_success": sum(e.success for e in greedy) / len(greedy),
        "greedy_tool_rate": sum(bool(e.calls) for e in greedy) / len(greedy),
        "tool_rate": len(called) / len(sampled),
        "sampled_success": sum(e.success for e in sampled) / len(sampled),
        "copy_accuracy": sum(e.success for e in called) / max(len(called), 1),
    }


def _sft_batch(tokenizer, tasks, rng: random.Random, tool_frac: float):
    """Input ids and labels: the model's tokens are trained; ``<bos>``, the prompt and the observation are not."""
    rows = []
    for t in tasks:
        prompt = tokenizer(t.prompt)["input_ids"]
        if rng.random() < tool_frac:
            call, obs, answer = calculator.tool_demonstration(t)
            parts = [(prompt, False), (call, True), (obs, False), (answer, True)]
        else:
            parts = [(prompt, False), (t.answer, True)]
        ids, trained = [], []
        for text, train in parts:
            piece = text if isinstance(text, list) else tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [train] * len(piece)
        rows.append((ids + [tokenizer.eos_token_id], trained + [True]))
    L = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), L), tokenizer.pad_token_id)
    labels_BT = torch.full((len(rows), L), -100)
    for i, (ids, trained) in enumerate(rows):
        ids_BT[i, : len(ids)] = torch.tensor(ids)
        labels_BT[i, : len(ids)] = torch.where(torch.tensor(trained), torch.tensor(ids), -100)
    return ids_BT, labels_BT


@dataclass
class PretrainResult:
    path: Path
    params: int
    metrics: dict[str, float]
    seconds: float


def pretrain_tiny_calc(out_dir: str | Path = DEFAULT_DIR, *, seed: int = 0, steps: int = 800,
                       tool_frac: float = 0.3, batch_size: int = 64, lr: float = 1e-3, eval_n: int = 256,
                       log=print) -> PretrainResult:
    """Build, warm-start and save the tiny calculator agent. Same seed and arguments give the same weights."""
    start = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(alphabet=calculator.ALPHABET)
    model = build_model(len(tokenizer), seed=seed)
    rng = random.Random(seed)
    pool = calculator.generate("train", 20_000, seed=seed)
    eval_tasks = calculator.generate("eval", eval_n, seed=0)

    def report(step: int, loss: torch.Tensor) -> None:
        if step % 200 == 0 and step < steps:
            m = measure(model, tokenizer, eval_tasks, seed=seed)
            log(f"pretrain step {step}/{steps} loss {loss.item():.4f} " + _fmt(m))

    sft_warm_start(model, lambda: _sft_batch(tokenizer, rng.sample(pool, batch_size), rng, tool_frac),
                   steps=steps, lr=lr, report=report)
    metrics = measure(model, tokenizer, eval_tasks, seed=seed)
    out, n_params = save_tiny(model, tokenizer, out_dir)
    log(f"saved {out} ({n_params:,} parameters), held-out " + _fmt(metrics))
    return PretrainResult(out, n_params, metrics, time.time() - start)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())

"""Correctors: the expert of OPA-DPO's stage 2 (arXiv 2501.09695), which revises a policy response into a
minimally corrected one, ``y_gen -> y_rev``.

A corrector is a callable ``corrector(items) -> list[str | None]``: one revised response text per
:class:`Revisable` (``None``: no revision possible, the sample is left out). Returning the response
unchanged says it needs no correction. Three kinds, named by ``opa_dpo.revise.corrector``:

- ``ground_truth``: a response the task's reward judges correct stays; any other becomes the ground-truth
  answer ``y_gt`` (on the arithmetic tasks: the wrong digits become the right ones);
- ``model:DIR``: a stronger model folder revises minimally: it reads ``prompt + y_gen + EOS``
  (teacher-forced, in one batched forward), keeps ``y_gen`` up to the first token where its own greedy
  choice differs, and continues greedily from there (a response it agrees with throughout, EOS included,
  stays as it is; one it would extend is extended; one the reward judged correct is not sent to it). It
  works on text, with its own tokenizer, so it need not share the policy's;
- ``module:fn``: a user function ``fn(prompt, response, answer) -> str | None`` (``answer`` the ground
  truth or None), called per sample; a call that raises leaves that sample out and is counted.

:data:`CORRECTORS` maps the built-in names to their builders; :func:`register` adds one (no duplicates).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Callable, NamedTuple, Protocol, Sequence


class Revisable(NamedTuple):
    """One policy response to revise: the prompt text as the policy saw it, its response text, the task's
    ground truth (None if it has none) and whether the task's reward judged the response correct."""

    prompt: str
    response: str
    answer: str | None
    correct: bool


class Corrector(Protocol):
    def __call__(self, items: Sequence[Revisable]) -> list[str | None]: ...


class CorrectorError(ValueError):
    """A corrector that cannot be built (unknown name, import failure, bad folder)."""


def ground_truth(items: Sequence[Revisable]) -> list[str | None]:
    """Correct responses stay; wrong ones become the ground truth (None where a task has none)."""
    return [it.response if it.correct else it.answer for it in items]


class FunctionCorrector:
    """``fn(prompt, response, answer) -> str | None`` per sample; one that raises (or returns a non-string)
    leaves its sample out. ``faults`` counts them, ``first_fault`` keeps the first traceback."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.faults, self.first_fault = 0, None

    def __call__(self, items: Sequence[Revisable]) -> list[str | None]:
        out = []
        for it in items:
            try:
                text = self.fn(it.prompt, it.response, it.answer)
                if text is not None and not isinstance(text, str):
                    raise TypeError(f"corrector {self.name} returned a {type(text).__name__}, expected str or None")
            except Exception:  # a user function's fault stays with its sample
                self.faults += 1
                self.first_fault = self.first_fault or traceback.format_exc()
                text = None
            out.append(text)
        return out


class ModelCorrector:
    """A stronger model's minimal revision (see the module docstring), batched, greedy, on ``device``."""

    def __init__(self, path: str, *, device: str = "cpu", max_new_tokens: int = 16, batch_size: int = 256):
        from offpolicy.config import ConfigError
        from offpolicy.rollout.model import load_policy

        try:
            self.model, self.tokenizer = load_policy(path, device=device)
        except (ConfigError, FileNotFoundError) as e:
            raise CorrectorError(f"opa_dpo.revise.corrector=model:{path}: {e}") from None
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, items: Sequence[Revisable]) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(items), self.batch_size):
            out += self._revise(items[i : i + self.batch_size])
        return out

    def _revise(self, items: Sequence[Revisable]) -> list[str | None]:
        """Correct responses are kept as they are; the others get the expert's minimal revision."""
        wrong = [j for j, it in enumerate(items) if not it.correct]
        out: list[str | None] = [it.response for it in items]
        for j, text in zip(wrong, self._expert([items[j] for j in wrong]) if wrong else []):
            out[j] = text
        return out

    def _expert(self, items: Sequence[Revisable]) -> list[str]:
        import torch

        from offpolicy.data.pairs import encode_prompt_text
        from offpolicy.rollout.engine import HFEngine

        tok = self.tokenizer
        prompts = [encode_prompt_text(tok, it.prompt) for it in items]
        # y_gen's tokens then EOS: a response the expert would go on writing is not "agreed" either
        responses = [tok(it.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
        seqs = [p + r for p, r in zip(prompts, responses)]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, x in enumerate(seqs):  # right-padded: the positions of the real tokens are 0..len-1
            ids[i, : len(x)], attn[i, : len(x)] = torch.tensor(x), 1
        with torch.no_grad():
            greedy = self.model(input_ids=ids.to(self.model.device), attention_mask=attn.to(self.model.device)
                                ).logits.argmax(-1).cpu()
        keep = []  # how many tokens of y_gen (+ EOS) the expert's own greedy choices agree with, from the start
        for i, (p, r) in enumerate(zip(prompts, responses)):
            agree = (greedy[i, len(p) - 1 : len(p) + len(r) - 1] == torch.tensor(r)).tolist()
            keep.append(agree.index(False) if False in agree else len(r))
        todo = [j for j, (k, r) in enumerate(zip(keep, responses)) if k < len(r)]
        revised: dict[int, str] = {}
        if todo:
            engine = HFEngine(self.model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
            ro = engine.generate([prompts[j] + responses[j][: keep[j]] for j in todo],
                                 max_new_tokens=self.max_new_tokens, greedy=True)
            for j, cont in zip(todo, ro.response_ids):
                revised[j] = tok.decode(responses[j][: keep[j]] + cont.tolist(), skip_special_tokens=True)
        return [revised.get(j, it.response) for j, it in enumerate(items)]


def _model(spec: str, **kw) -> Corrector:
    return ModelCorrector(spec, **kw)


def _function(spec: str, **_) -> Corrector:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise CorrectorError(f"opa_dpo.revise.corrector={spec}: cannot import it: {e}") from None
    if not callable(fn):
        raise CorrectorError(f"opa_dpo.revise.corrector={spec} is not callable")
    return FunctionCorrector(fn, spec)


CORRECTORS: dict[str, Callable[..., Corrector]] = {"ground_truth": lambda spec, **_: ground_truth, "model": _model}


def register(name: str, builder: Callable[..., Corrector]) -> None:
    """Add a corrector kind: ``builder(spec, device=..., max_new_tokens=...)`` -> corrector."""
    if name in CORRECTORS:
        raise ValueError(f"corrector {name!r} is already registered")
    CORRECTORS[name] = builder


def build_corrector(spec: str, *, device: str = "cpu", max_new_tokens: int = 16) -> Corrector:
    """The corrector ``spec`` names: ``ground_truth``, ``model:DIR``, another registered name (``name`` or
    ``name:ARG``), or ``package.module:fn``."""
    name, sep, arg = spec.partition(":")
    if name in CORRECTORS:
        if name == "model" and not arg:
            raise CorrectorError("opa_dpo.revise.corrector=model:DIR needs a model folder after 'model:'")
        if name == "ground_truth" and sep:
            raise CorrectorError(f"opa_dpo.revise.corrector={spec!r}: ground_truth takes no argument")
        return CORRECTORS[name](arg, device=device, max_new_tokens=max_new_tokens)
    if sep and arg:
        return _function(spec)
    raise CorrectorError(f"opa_dpo.revise.corrector={spec!r}: unknown corrector; built-in: "
                         f"{', '.join(k + (':DIR' if k == 'model' else '') for k in CORRECTORS)}, or "
                         "'package.module:fn'")

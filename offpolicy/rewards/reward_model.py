"""A learned reward: a scalar reward model ``r(x, y)`` (a causal LM with transformers' sequence-classification
head, ``num_labels=1``, trained by :mod:`offpolicy.train.reward_model`) scoring RL samples.

The score is the head's output at the last non-padding token, as transformers' ``*ForSequenceClassification``
reads it (the rightmost token that is not ``pad_token_id``), so a folder saved here scores the same in
transformers or TRL. A sample is the prompt's ids (:func:`~offpolicy.data.pairs.encode_prompt_text`), then
the response's ids and EOS — exactly how :func:`~offpolicy.data.pairs.pair_token_ids` builds the training
sequences of plain pairs, and, for a prompt rendered by the chat template, how it builds conversational ones.

:class:`RewardModelScorer` is a scorer in the sense of :mod:`offpolicy.rollout.workflow` (a batch of samples
in, one :class:`~offpolicy.rewards.guard.Scored` per sample out), but a sample is ``(response,
ground_truth, prompt)``: the reward model must see the prompt. It runs in-process, batched on its device,
with per-sample fault isolation: a batch whose forward raises is retried sample by sample, so only the
sample that raises is marked (``"exception"``), and a NaN/inf score is marked ``"non_finite"`` by
:func:`~offpolicy.rewards.guard.check_value`. Rule rewards combine by weights: ``weight * r_model +
rules(...)`` where ``rules`` is any scorer of ``(response, ground_truth)`` pairs (a
:class:`~offpolicy.rewards.guard.GuardedReward` of a weighted sum keeps their time limits); a fault in
either part faults the sample.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch

from offpolicy.data.pairs import encode_prompt_text, response_ids
from offpolicy.rewards.guard import Scored, check_value

_DTYPES = ("float32", "bfloat16", "float16")


def load_reward_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) of ``path`` ('bundled', 'bundled:<name>' or a folder) as a scalar reward model:
    ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a causal-LM folder gets a new, randomly
    initialised head), ``pad_token_id`` set from the tokenizer; in eval mode on ``device``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from offpolicy.rollout.model import check_device, load_tokenizer, resolve_model_path

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    check_device(device)
    folder = resolve_model_path(str(path))
    tokenizer = load_tokenizer(folder)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected on a causal-LM folder
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=getattr(torch, dtype), pad_token_id=tokenizer.pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def sequence_scores(model, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Scalar scores (B,) of token sequences, right-padded with ``pad_id`` into one batch on the model's
    device; the head's output at each sequence's last non-padding token."""
    device = next(model.parameters()).device
    longest = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BT[i, :len(s)] = 1
    return model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits[:, 0].float()


def sample_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The reward model's input for one RL sample (see the module docstring)."""
    return encode_prompt_text(tokenizer, prompt) + response_ids(tokenizer, response)


class RewardModelScorer:
    """Scores ``(response, ground_truth, prompt)`` samples with the reward model of ``path`` (or a given
    ``model`` and ``tokenizer``), ``batch_size`` sequences per forward on ``device``.

    ``weight`` multiplies the model's score; ``rules`` (optional) scores ``(response, ground_truth)`` pairs
    and its values are added; ``checker`` (optional, a rule reward) only decides each sample's ``correct``
    (the task's accuracy, for metrics), never its value. Calling returns one :class:`Scored` per sample; :meth:`scores` returns the raw
    model scores (floats, NaN kept) and raises on a fault.
    """

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 32, weight: float = 1.0,
                 rules: Callable[[Sequence[tuple[str, str]]], list[Scored]] | None = None,
                 model=None, tokenizer=None, checker: Callable[[Sequence[tuple[str, str]]], list[Scored]] | None = None):
        if (path is None) == (model is None):
            raise ValueError("RewardModelScorer: give a path, or a model and its tokenizer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            model, tokenizer = load_reward_model(path, device=device, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.weight, self.rules, self.checker = batch_size, float(weight), rules, checker
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Raw scores of (prompt, response) pairs, in batches; raises on any fault."""
        seqs = [sample_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for i in range(0, len(seqs), self.batch_size):
            out += sequence_scores(self.model, seqs[i:i + self.batch_size], self.pad_id).tolist()
        return out

    @torch.no_grad()
    def _model_scores(self, samples: Sequence[tuple[str, str, str]]) -> list[Scored]:
        out: list[Scored | None] = [None] * len(samples)
        seqs: dict[int, list[int]] = {}
        for i, (response, _, prompt) in enumerate(samples):
            try:
                seqs[i] = sample_ids(self.tokenizer, prompt, response)
            except Exception:  # an untokenisable sample (bad type, tokenizer error) is this sample's fault
                out[i] = Scored(None, "exception", traceback.format_exc(limit=4))
        todo = list(seqs)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            try:
                values = sequence_scores(self.model, [seqs[i] for i in chunk], self.pad_id).tolist()
            except Exception:  # find which sample: retry one at a time
                values = []
                for i in chunk:
                    try:
                        values.append(sequence_scores(self.model, [seqs[i]], self.pad_id).item())
                    except Exception:
                        values.append(Scored(None, "exception", traceback.format_exc(limit=4)))
            for i, v in zip(chunk, values):
                out[i] = v if isinstance(v, Scored) else check_value(v)
        return out

    def close(self) -> None:
        """Nothing to stop (the model lives in this process); the rules and checker scorers are closed."""
        for scorer in (self.rules, self.checker):
            if scorer is not None and hasattr(scorer, "close"):
                scorer.close()

    def __call__(self, samples: Sequence[tuple[str, str, str]]) -> list[Scored]:
        if any(len(s) != 3 for s in samples):
            raise TypeError("RewardModelScorer scores (response, ground_truth, prompt) triples: a reward model "
                            "must see the prompt")
        model = self._model_scores(samples)
        rules = self.rules([(r, t) for r, t, _ in samples]) if self.rules is not None else [Scored(0.0)] * len(model)
        checks = (self.checker([(r, t) for r, t, _ in samples]) if self.checker is not None
                  else [Scored(None)] * len(model))
        out = []
        for m, r, c in zip(model, rules, checks):
            bad = m if m.fault is not None else r if r.fault is not None else None
            s = bad if bad is not None else check_value(self.weight * m.value + r.value)
            out.append(s._replace(correct=None if c.value is None else c.value >= 1.0))
        return out

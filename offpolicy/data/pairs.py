"""Preference pairs in the standard format, their token ids, and arithmetic pairs for the bundled model.

The standard format (TRL's, and what most preference data sets on the hub use) is one row per pair with
``prompt``, ``chosen`` and ``rejected``, each either

- plain text: the prompt, and each response as the text that follows it; or
- conversational: a list of messages ``[{"role": ..., "content": ...}]`` (roles in :data:`ROLES`); each
  response starts and ends with an ``assistant`` message. ``prompt`` may then be omitted: the messages that
  ``chosen`` and ``rejected`` share from the start are the prompt, the rest are the responses (TRL's
  "implicit prompt").

Optional columns: ``margin`` (a number, the Bradley-Terry margin of the pair), ``answer`` (the ground
truth, when the pairs come from a task that has one: greedy accuracy can then be measured) and
``chosen_weights`` / ``rejected_weights`` (token weights of a token-weighted DPO loss, e.g. OPA-DPO's
revised spans: one number >= 0 per response token, its ids then EOS; checked against the tokens when the
pair is encoded). Other
columns are ignored. Rows come from JSON lines, Parquet (or CSV for plain text) files and ``datasets``
folders, read by :mod:`offpolicy.data.task_files`; each is checked when read, and a bad one is a
:class:`~offpolicy.data.task_files.DatasetError` that names its place (``file:line``, ``file row i``,
``dataset[split] row i``): a missing field, empty text, a wrong type, text and messages mixed in one
row, a role outside :data:`ROLES`, a response that does not start and end with an assistant message, or
``chosen`` equal to ``rejected``.

Token ids (:func:`pair_token_ids`): a conversational pair is rendered with the tokenizer's chat template
— the prompt with ``add_generation_prompt=True``, each response as the tokens the full conversation adds
after it, up to and including its last end-of-sequence token (the template's trailing newline is dropped:
generation stops at EOS) — and the prompt's ids must be a prefix of the full conversation's. A plain pair
is the prompt's ids (with the tokenizer's special tokens, as a rollout encodes a plain prompt) followed by
each response's ids and EOS. A conversational pair for a tokenizer without a chat template (the bundled
model's) is rendered as text the way a task prompt is without one (:class:`~offpolicy.data.task_files.
PromptFormat`): the prompt messages' contents joined by blank lines, each response's contents joined by
blank lines — and then encoded as a plain pair, so ``[user: "37+48="] / [assistant: "85"]`` trains on the
same tokens as ``"37+48=" / "85"``. Roles are not written: a model without a template has no way to mark
them that it was trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from offpolicy.data.arithmetic import generate
from offpolicy.data.task_files import DatasetError, _csv_rows, _hf_rows, _jsonl_rows, _parquet_rows, file_format

Messages = tuple[dict, ...]
ROLES = ("system", "developer", "user", "assistant", "tool")  # message roles a row may use
PLAIN_SEPARATOR = "\n\n"  # between messages when a tokenizer has no chat template (as PromptFormat's blocks)


@dataclass(frozen=True)
class Pair:
    """One preference pair. Plain rows: ``prompt``, ``chosen``, ``rejected`` are the texts and the
    ``*_messages`` are None. Conversational rows: the ``*_messages`` hold the turns, and the texts are
    for display (the last prompt message's content; each response's contents joined by newlines)."""

    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    prompt_messages: Messages | None = None
    chosen_messages: Messages | None = None
    rejected_messages: Messages | None = None
    margin: float | None = None
    answer: str | None = None
    where: str = ""  # file:line of the row, for messages
    chosen_weights: tuple[float, ...] | None = None  # per response token (its ids and EOS); None = 1
    rejected_weights: tuple[float, ...] | None = None

    @property
    def conversational(self) -> bool:
        return self.prompt_messages is not None


# ---------------------------------------------------------------------------- reading and checking rows


def _messages(where: str, key: str, value: list) -> Messages:
    if not value:
        raise DatasetError(f"{where}: field '{key}' is an empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: field '{key}' message {i} must be an object with text 'role' and "
                               f"'content', got {json.dumps(m, default=str)[:80]}")
        if m["role"] not in ROLES:
            raise DatasetError(f"{where}: field '{key}' message {i} has role {m['role']!r}; expected one of "
                               f"{', '.join(ROLES)}")
    return tuple(dict(m) for m in value)


def _field(where: str, row: dict, key: str) -> str | Messages:
    if key not in row or row[key] is None:
        raise DatasetError(f"{where}: missing field '{key}' (fields: {sorted(map(str, row))})")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(f"{where}: field '{key}' is empty")
        return value
    if isinstance(value, (list, tuple)):
        return _messages(where, key, list(value))
    raise DatasetError(f"{where}: field '{key}' holds a {type(value).__name__}; expected text or a list of "
                       "messages [{'role': ..., 'content': ...}]")


def _shared_prefix(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _text(where: str, key: str, msgs: Messages) -> str:
    for end, m in (("start", msgs[0]), ("end", msgs[-1])):
        if m["role"] != "assistant":
            raise DatasetError(f"{where}: the '{key}' response must {end} with an assistant message, got role "
                               f"{m['role']!r}")
    text = "\n".join(m["content"] for m in msgs)
    if not text.strip():
        raise DatasetError(f"{where}: field '{key}' is empty")
    return text


def pair_from_row(where: str, pair_id: str, row: dict) -> Pair:
    """A checked :class:`Pair` from one row of the standard format (see the module docstring)."""
    chosen, rejected = _field(where, row, "chosen"), _field(where, row, "rejected")
    if row.get("prompt") is None and isinstance(chosen, tuple) and isinstance(rejected, tuple):
        n = _shared_prefix(chosen, rejected)
        if n == 0:
            raise DatasetError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no leading messages")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen or not rejected:
            raise DatasetError(f"{where}: 'chosen' and 'rejected' are the same conversation" if chosen == rejected
                               else f"{where}: one of 'chosen' and 'rejected' is a prefix of the other; no response")
    else:
        prompt = _field(where, row, "prompt")
    kinds = {k: isinstance(v, tuple) for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
    if len(set(kinds.values())) > 1:
        texts = [k for k, v in kinds.items() if not v]
        raise DatasetError(f"{where}: fields {', '.join(k for k, v in kinds.items() if v)} are message lists but "
                           f"{', '.join(texts)} {'is' if len(texts) == 1 else 'are'} text; use one kind per row")
    if chosen == rejected:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are the same")
    margin = row.get("margin")
    if isinstance(margin, str):  # a CSV cell is text: a number in it, or empty for none
        try:
            margin = float(margin) if margin.strip() else None
        except ValueError:
            pass  # refused below, with the text
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DatasetError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    margin = None if margin is None else float(margin)
    weights = {k: _token_weights(where, row, k) for k in ("chosen_weights", "rejected_weights")}
    if not kinds["chosen"]:
        return Pair(pair_id, prompt, chosen, rejected, margin=margin, answer=answer, where=where, **weights)
    return Pair(pair_id, prompt[-1]["content"], _text(where, "chosen", chosen), _text(where, "rejected", rejected),
                prompt, chosen, rejected, margin=margin, answer=answer, where=where, **weights)


def _token_weights(where: str, row: dict, key: str) -> tuple[float, ...] | None:
    """Optional ``chosen_weights`` / ``rejected_weights``: one finite number >= 0 per token of the response
    (its ids, then EOS; the length is checked against the tokens when the pair is encoded)."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: field '{key}' must be a non-empty list of numbers (one per response token), "
                           f"got {json.dumps(value, default=str)[:80]}")
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DatasetError(f"{where}: field '{key}' item {i} must be a finite number >= 0, got {w!r}")
    return tuple(float(w) for w in value)


def check_token_weights(pair: Pair, chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> None:
    """DatasetError (naming the row) when a pair's token weights do not have one weight per response token."""
    for key, weights, ids in (("chosen_weights", pair.chosen_weights, chosen_ids),
                              ("rejected_weights", pair.rejected_weights, rejected_ids)):
        if weights is not None and len(weights) != len(ids):
            raise DatasetError(f"{pair.where}: field '{key}' has {len(weights)} weights but the response has "
                               f"{len(ids)} tokens (its text's tokens, then EOS)")


def _rows(source: str | Path, kind: str, split: str) -> Iterator[tuple[str, str, dict]]:
    if kind not in ("auto", "file", "hf"):
        raise ValueError(f"load_pairs: kind must be 'auto', 'file' or 'hf', got {kind!r}")
    path = Path(source).expanduser()
    if kind == "hf" or (kind == "auto" and path.is_dir()):
        return _hf_rows(str(source), split, None)
    return {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[file_format(path)](path)


def load_pairs(source: str | Path, *, kind: str = "auto", split: str = "train", limit: int | None = None) -> list[Pair]:
    """Checked pairs of ``source``: a ``.jsonl``/``.json``, ``.parquet`` or ``.csv`` file, or a ``datasets``
    folder (``kind="auto"`` tells them apart; ``kind="hf"`` also takes a hub name; ``split`` picks the
    split of a ``datasets`` source). Raises :class:`DatasetError` naming the first bad row."""
    pairs: list[Pair] = []
    for where, pair_id, row in _rows(source, kind, split):
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(pair_from_row(where, pair_id, row))
    if not pairs:
        raise DatasetError(f"{source}: no preference pairs")
    return pairs


def pair_row(pair: Pair, *, conversational: bool = False) -> dict:
    """The standard-format row of ``pair`` (messages when it has them or ``conversational``)."""
    if pair.conversational:
        row = {"prompt": list(pair.prompt_messages), "chosen": list(pair.chosen_messages),
               "rejected": list(pair.rejected_messages)}
    elif conversational:
        row = {"prompt": [{"role": "user", "content": pair.prompt}],
               "chosen": [{"role": "assistant", "content": pair.chosen}],
               "rejected": [{"role": "assistant", "content": pair.rejected}]}
    else:
        row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.margin is not None:
        row["margin"] = pair.margin
    if pair.answer is not None:
        row["answer"] = pair.answer
    for key in ("chosen_weights", "rejected_weights"):
        if getattr(pair, key) is not None:
            row[key] = list(getattr(pair, key))
    return row


def write_pairs(path: str | Path, pairs: Sequence[Pair], *, conversational: bool = False) -> Path:
    """Write ``pairs`` as a standard-format JSON lines file (plain text, or messages with
    ``conversational``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(pair_row(p, conversational=conversational)) + "\n")
    return path


# ---------------------------------------------------------------------------- token ids


class PairIds(NamedTuple):
    """Token ids of a pair: the prompt, and each response (the sequence is ``prompt_ids + chosen_ids``)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def encode_prompt_text(tokenizer, text: str) -> list[int]:
    """Ids of a prompt text: with the tokenizer's special tokens, unless the text already starts with its
    BOS token (a prompt rendered by a chat template that holds it, e.g. Llama 3's)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def response_ids(tokenizer, text: str) -> list[int]:
    """Ids of a plain response: its text, then EOS (the rollout's responses end the same way)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _chat_response_ids(tokenizer, pair: Pair, prompt_ids: list[int], reply: Messages, key: str) -> list[int]:
    text = tokenizer.apply_chat_template(list(pair.prompt_messages) + list(reply), tokenize=False)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full[:len(prompt_ids)] != prompt_ids:
        raise DatasetError(f"{pair.where}: the chat template's rendering of the prompt is not a prefix of the "
                           f"prompt with the '{key}' response (the template rewrites earlier turns, or the "
                           "tokens merge across the boundary); this pair cannot be scored token by token")
    out = full[len(prompt_ids):]
    eos = tokenizer.eos_token_id
    if eos in out:  # drop what the template adds after the turn's end (generation stops at EOS)
        out = out[:len(out) - out[::-1].index(eos)]
    if not out:
        raise DatasetError(f"{pair.where}: the '{key}' response renders to no tokens")
    return out


def plain_rendering(pair: Pair) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of a conversational pair for a tokenizer without a chat template:
    each part's message contents joined by :data:`PLAIN_SEPARATOR` (see the module docstring)."""
    return tuple(PLAIN_SEPARATOR.join(m["content"] for m in msgs)
                 for msgs in (pair.prompt_messages, pair.chosen_messages, pair.rejected_messages))


def _known(tokenizer, pair: Pair, ids: PairIds) -> PairIds:
    """``ids``, unless the tokenizer mapped text it does not know to its unknown token (a character-level
    tokenizer such as the bundled model's): that would train on placeholders, so it is an error."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk != tokenizer.pad_token_id or unk == tokenizer.eos_token_id:
        return ids  # a token of its own (it may be meant), or one that is also EOS (GPT-2): not checked
    for key, part in zip(PairIds._fields, ids):
        if unk in part:
            raise DatasetError(f"{pair.where}: the {key.removesuffix('_ids')} holds text the tokenizer cannot "
                               f"encode (it becomes the unknown token {tokenizer.unk_token!r}); the model "
                               f"cannot read it")
    return ids


def _encode(tokenizer, pair: Pair) -> PairIds:
    if not pair.conversational or not getattr(tokenizer, "chat_template", None):
        prompt, chosen, rejected = _plain_texts(pair)
        return _known(tokenizer, pair, PairIds(encode_prompt_text(tokenizer, prompt), response_ids(tokenizer, chosen),
                                               response_ids(tokenizer, rejected)))
    prompt_text = tokenizer.apply_chat_template(list(pair.prompt_messages), tokenize=False,
                                                add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return _known(tokenizer, pair, PairIds(
        prompt_ids, _chat_response_ids(tokenizer, pair, prompt_ids, pair.chosen_messages, "chosen"),
        _chat_response_ids(tokenizer, pair, prompt_ids, pair.rejected_messages, "rejected")))


def _plain_texts(pair: Pair) -> tuple[str, str, str]:
    return plain_rendering(pair) if pair.conversational else (pair.prompt, pair.chosen, pair.rejected)


# tokenizer -> {id(pair): (pair, the tokenizer's chat template then, its PairIds)}: the ids of the pairs
# that encode_pairs encoded (a run's training and held-out pairs), so that a training step does not
# tokenize its pairs again (96 tokenizer calls per step of 32 pairs: 10-25 ms, 10-20% of the bundled
# model's DPO step). Weak in the tokenizer; each entry holds its pair, so an id is never reused while cached.
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pair_token_ids(tokenizer, pair: Pair) -> PairIds:
    """Token ids of ``pair`` as the module docstring describes: a conversational pair through the
    tokenizer's chat template, or as plain text when it has none. Raises :class:`DatasetError` (naming the
    row) when the template breaks the prefix property, or when the text holds characters the tokenizer can
    only map to an unknown token that is also its padding token (the bundled tokenizer's). A pair that
    :func:`encode_pairs` encoded with this tokenizer is not encoded again (the lists are shared: do not
    modify them)."""
    try:
        hit = _ENCODED.get(tokenizer, {}).get(id(pair))
    except TypeError:  # a tokenizer that takes no weak reference (a stand-in in a test) has no cache
        hit = None
    if hit is not None and hit[0] is pair and hit[1] == getattr(tokenizer, "chat_template", None):
        return hit[2]
    return _encode(tokenizer, pair)


def encode_pairs(tokenizer, pairs: Sequence[Pair]) -> None:
    """Encode every pair of ``pairs`` now, so that a row the tokenizer cannot render (:func:`pair_token_ids`'s
    errors, each naming its ``file:line``) fails at start-up rather than when its batch comes up, and keep
    the ids for :func:`pair_token_ids`. Plain pairs are tokenized in three batched calls (the same ids as
    one call per text: tested)."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        memo = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # no weak reference to it: encode (check) all the same, keep nothing
        memo = {}
    plain = [p for p in pairs if not (p.conversational and template)]
    if plain:
        texts = [_plain_texts(p) for p in plain]
        bos = getattr(tokenizer, "bos_token", None)
        special = [not (bos and t[0].startswith(bos)) for t in texts]  # as encode_prompt_text decides
        batches = {flag: iter(tokenizer([t[0] for t, s in zip(texts, special) if s == flag],
                                        add_special_tokens=flag)["input_ids"]) if flag in special else iter(())
                   for flag in (True, False)}
        prompts = [next(batches[s]) for s in special]
        replies = tokenizer([t[1] for t in texts] + [t[2] for t in texts], add_special_tokens=False)["input_ids"]
        eos, n = tokenizer.eos_token_id, len(plain)
        for i, p in enumerate(plain):
            memo[id(p)] = (p, template, _known(tokenizer, p, PairIds(prompts[i], replies[i] + [eos],
                                                                     replies[n + i] + [eos])))
    for p in pairs:
        if p.conversational and template:
            memo[id(p)] = (p, template, _encode(tokenizer, p))
        if p.chosen_weights is not None or p.rejected_weights is not None:  # one weight per response token
            ids = memo[id(p)][2]
            check_token_weights(p, ids.chosen_ids, ids.rejected_ids)


# ---------------------------------------------------------------------------- arithmetic pairs


NEARBY = (-10, -2, -1, 1, 2, 10)


def arithmetic_pairs(split: str, n: int, *, seed: int = 0, levels: tuple[int, ...] = (1,)) -> list[Pair]:
    """``n`` pairs from the arithmetic generator (:func:`offpolicy.data.arithmetic.generate`, same split and
    seed): prompt ``37+48=``, chosen the correct answer, rejected the slipped answer (the bundled model's
    typical mistake, ``75``) when it differs, else a nearby wrong number (the answer plus one of
    ``NEARBY``, drawn from a generator seeded by the task). Each pair's ``answer`` is the correct answer."""
    out = []
    for task in generate(split, n, seed=seed, levels=levels):
        wrong = task.meta["slipped"]
        if wrong == task.answer:
            wrong = str(int(task.answer) + random.Random(f"pairs-{task.task_id}").choice(NEARBY))
        out.append(Pair(task.task_id, task.prompt, task.answer, wrong, answer=task.answer))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m offpolicy.data.pairs OUT.jsonl --split train --n 2000``: write arithmetic pairs."""
    p = argparse.ArgumentParser(prog="python -m offpolicy.data.pairs",
                                description="Write arithmetic preference pairs as a standard-format JSONL file.")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--split", choices=("train", "eval"), default="train")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, nargs="+", default=[1])
    p.add_argument("--conversational", action="store_true", help="message lists instead of plain text")
    a = p.parse_args(argv)
    path = write_pairs(a.out, arithmetic_pairs(a.split, a.n, seed=a.seed, levels=tuple(a.levels)),
                       conversational=a.conversational)
    print(f"wrote {a.n} {a.split} pairs to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

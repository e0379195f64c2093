"""Tasks from files and datasets, and how a row becomes the prompt the model sees.

Sources (``tasks.name``):

- ``file``: JSON lines (``.jsonl``/``.json``), Parquet (``.parquet``) or CSV (``.csv``/``.tsv``), the
  format read from the extension;
- ``hf``: a Hugging Face ``datasets`` dataset — a folder written by ``save_to_disk``, a local data
  folder (``load_dataset(dir)``), or a hub name when online; ``split`` picks the split.

Every row is checked when the source is read, before any compute: a row that is not an object or
lacks a mapped field is an error that names where it is — ``file:line`` for JSON lines and CSV,
``file row i`` for Parquet, ``dataset[split] row i`` for ``datasets`` (0-based).

Rows that cannot be trained on are left out by stated rules and counted (:class:`Skipped`), each with
where it is: a row over ``tasks.max_row_bytes`` (a JSON line is never held whole in memory past the
limit; for other formats the question and answer are measured), and a prompt that, formatted and
tokenized, leaves fewer than the response budget of the model's context (:func:`drop_long_prompts`).

A row's question becomes the prompt through a :class:`PromptFormat`: ``template`` (``{prompt}`` is
the question), an optional system prompt, optional few-shot examples, and — when the model has one
and ``chat_template`` allows it — the tokenizer's chat template. Without a chat template the blocks
(system prompt, each example as its formatted question then its answer, the question) are joined by
blank lines. With one, they become chat messages rendered by ``apply_chat_template(...,
add_generation_prompt=True)``; that text already holds the model's special tokens, so the task is
marked ``has_special_tokens`` and the rollout tokenizes it without adding them again.

Presets (``tasks.preset``) fill defaults for a known data set; see :data:`PRESETS` and docs/gsm8k.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from offpolicy.data.arithmetic import Task


class DatasetError(ValueError):
    """A malformed data file or row; the message names where (``file:line``, ``file row i``)."""


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def file_format(path: str | Path) -> str:
    """'jsonl' | 'parquet' | 'csv' from the extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DatasetError(f"{path}: unknown task file format {suffix!r}; expected one of {sorted(FORMATS)} "
                           "(or tasks.name=hf for a `datasets` folder or hub name)")
    return FORMATS[suffix]


# ---------------------------------------------------------------------------- raw rows: (where, id, row)


class Oversize(int):
    """Stands for a row over the size limit: its size in bytes (the row itself is not kept)."""


def _jsonl_rows(path: Path, max_bytes: int | None = None) -> Iterator[tuple[str, str, dict | Oversize]]:
    """Rows of a JSON lines file, read line by line; a line longer than ``max_bytes`` is skipped unread
    and yielded as :class:`Oversize` (its length), so one huge line cannot fill the memory."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DatasetError(f"cannot read task file {path}: {e.strerror}") from None
    with f:
        n = 0
        while raw := (f.readline() if max_bytes is None else f.readline(max_bytes + 2)):
            n += 1
            if max_bytes is not None and len(raw.rstrip(b"\r\n")) > max_bytes:
                size = len(raw.rstrip(b"\r\n"))
                while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):  # the rest, a chunk at a time
                    size += len(raw.rstrip(b"\r\n"))
                yield f"{path}:{n}", f"{path.stem}-{n}", Oversize(size)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{n}", f"{path.stem}-{n}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    text = _read_text(path)
    # Lines end at \n, \r\n or \r only (newline="", as the csv module asks): str.splitlines would also split at
    # \f, \v, \x1c-\x1e, \x85, \u2028 and \u2029 inside a field, cutting the row and shifting the line numbers.
    lines = io.StringIO(text, newline="")
    reader = csv.DictReader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if reader.fieldnames is None:
        raise DatasetError(f"{path}:1: no header row")
    for row in reader:
        n = reader.line_num  # the record's last physical line (= its line unless a field spans lines)
        if None in row:
            raise DatasetError(f"{path}:{n}: {len(row[None])} more field(s) than the header's {len(reader.fieldnames)}")
        yield f"{path}:{n}", f"{path.stem}-{n}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow (pip install 'offpolicy[data]')") from None
    try:
        table = pq.read_table(path)
    except OSError as e:
        raise DatasetError(f"cannot read task file {path}: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", f"{path.stem}-{i}", row


def _hf_rows(source: str, split: str, subset: str | None) -> Iterator[tuple[str, str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError("tasks.name=hf needs the `datasets` package (pip install 'offpolicy[data]')") from None
    folder = Path(source).expanduser()
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            ds = datasets.load_from_disk(str(folder))  # written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{source}: no split {split!r} (splits: {sorted(ds)})")
                ds = ds[split]
        else:  # a local data folder, or a hub name (downloads when online)
            ds = datasets.load_dataset(source, subset, split=split)
    except DatasetError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, hub errors)
        raise DatasetError(f"cannot load dataset {source!r} split {split!r}: {type(e).__name__}: {e}") from None
    name = folder.name or source
    for i, row in enumerate(ds):
        yield f"{source}[{split}] row {i}", f"{name}-{split}-{i}", row


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read task file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check(where: str, row: dict, key: str) -> str:
    if key not in row:
        raise DatasetError(f"{where}: missing field '{key}' (fields: {sorted(map(str, row))})")
    value = row[key]
    if value is None or value == "":
        raise DatasetError(f"{where}: field '{key}' is empty")
    if isinstance(value, (dict, list)):
        raise DatasetError(f"{where}: field '{key}' holds a {type(value).__name__}, expected text or a number")
    return str(value)


class Skipped:
    """Rows left out of a task source, per rule: ``rule -> {where: detail}`` (a row read twice, as training
    and evaluation task, counts once)."""

    def __init__(self):
        self.rows: dict[str, dict[str, str]] = {}

    def add(self, rule: str, where: str, detail: str) -> None:
        self.rows.setdefault(rule, {})[where] = detail

    def describe(self, shown: int = 3) -> list[str]:
        """One line per rule: the count and the first few places."""
        out = []
        for rule, found in self.rows.items():
            first = ", ".join(f"{w} ({d})" for w, d in list(found.items())[:shown])
            more = f" and {len(found) - shown} more" if len(found) > shown else ""
            out.append(f"{len(found)} row(s) left out, {rule}: {first}{more}")
        return out


def load_rows(source: str | Path, *, kind: str = "file", prompt_key: str = "prompt", answer_key: str = "answer",
              split: str = "train", subset: str | None = None, limit: int | None = None,
              max_row_bytes: int | None = None, skipped: Skipped | None = None) -> list[Task]:
    """Checked rows of ``source`` as tasks whose prompt is the raw question (no formatting yet).

    ``kind``: 'file' (format from the extension) or 'hf' (``datasets``; ``split``, ``subset``).
    ``max_row_bytes``: rows larger than this (a JSON line; else question + answer, UTF-8) are left out and
    recorded in ``skipped``; the task ids keep their place in the file (``<stem>-<line>``).
    """
    return [task for _, task in load_rows_where(source, kind=kind, prompt_key=prompt_key, answer_key=answer_key,
                                                split=split, subset=subset, limit=limit,
                                                max_row_bytes=max_row_bytes, skipped=skipped)]


def load_rows_where(source: str | Path, *, kind: str = "file", prompt_key: str = "prompt",
                    answer_key: str = "answer", split: str = "train", subset: str | None = None,
                    limit: int | None = None, max_row_bytes: int | None = None,
                    skipped: Skipped | None = None) -> list[tuple[str, Task]]:
    """:func:`load_rows` with where each task is (``file:line``, ``file row i``)."""
    if kind == "hf":
        rows = _hf_rows(str(source), split, subset)
    else:
        path = Path(source).expanduser()
        fmt = file_format(path)
        rows = _jsonl_rows(path, max_row_bytes) if fmt == "jsonl" else {"csv": _csv_rows, "parquet": _parquet_rows}[fmt](path)
    skipped = Skipped() if skipped is None else skipped
    rule = f"over tasks.max_row_bytes={max_row_bytes}"
    tasks: list[tuple[str, Task]] = []
    for where, task_id, row in rows:
        if limit is not None and len(tasks) >= limit:
            break
        if isinstance(row, Oversize):
            skipped.add(rule, where, f"{row:,} bytes")
            continue
        task = Task(task_id, _check(where, row, prompt_key), _check(where, row, answer_key))
        size = len(task.prompt.encode()) + len(task.answer.encode())
        if max_row_bytes is not None and size > max_row_bytes:
            skipped.add(rule, where, f"{size:,} bytes")
            continue
        tasks.append((where, task))
    if not tasks:
        reasons = "; ".join(skipped.describe()) if skipped.rows else ""
        raise DatasetError(f"{source}: no tasks{' (' + reasons + ')' if reasons else ''}")
    return tasks


def context_length(model_dir: str | Path) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or its older names in ``config.json``)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = {**cfg.get("text_config", {}), **cfg}  # multimodal configs keep it under text_config
    return next((int(cfg[k]) for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                 if isinstance(cfg.get(k), int)), None)


def drop_long_prompts(rows: list[tuple[str, Task]], tokenizer, *, context: int, response_tokens: int,
                      skipped: Skipped) -> list[tuple[str, Task]]:
    """The formatted rows whose prompt fits the model's context with ``response_tokens`` to spare; the
    others are recorded in ``skipped`` (a prompt cut to fit would change the question, so none is cut)."""
    from offpolicy.rollout.workflow import encode_prompt

    budget = context - response_tokens
    rule = f"prompt longer than the model's context {context} - {response_tokens} response tokens = {budget} tokens"
    kept = []
    for where, task in rows:
        n = len(encode_prompt(tokenizer, task))
        if n > budget:
            skipped.add(rule, where, f"{n} tokens")
        else:
            kept.append((where, task))
    return kept


def load_jsonl_tasks(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer",
                     template: str = "{prompt}", limit: int | None = None) -> list[Task]:
    """Rows of a task file; each prompt is ``template.format(prompt=row[prompt_key])``."""
    rows = load_rows(path, prompt_key=prompt_key, answer_key=answer_key, limit=limit)
    return [dataclasses.replace(t, prompt=template.format(prompt=t.prompt)) for t in rows]


# ---------------------------------------------------------------------------- prompt formatting


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes prompt text (see the module docstring)."""

    template: str = "{prompt}"
    system_prompt: str | None = None
    examples: tuple[tuple[str, str], ...] = ()  # few-shot (question, answer), unformatted
    tokenizer: object = None  # set: render with its chat template

    def messages(self, question: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, a in self.examples:
            msgs += [{"role": "user", "content": self.template.format(prompt=q)}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": self.template.format(prompt=question)}]

    def render(self, question: str) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.apply_chat_template(self.messages(question), tokenize=False,
                                                      add_generation_prompt=True)
        blocks = [self.system_prompt] if self.system_prompt else []
        for q, a in self.examples:
            shown = self.template.format(prompt=q)
            blocks.append(shown + ("" if shown[-1:].isspace() else "\n") + a)
        return "\n\n".join(blocks + [self.template.format(prompt=question)])

    def apply(self, task: Task) -> Task:
        return dataclasses.replace(task, prompt=self.render(task.prompt), has_special_tokens=self.tokenizer is not None)


def use_chat_template(mode: str, tokenizer) -> bool:
    """``tasks.chat_template``: 'on' (required), 'off', 'auto' (when the tokenizer has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise DatasetError("tasks.chat_template=on but the model's tokenizer has no chat_template")
    return mode == "on" or (mode == "auto" and has)


# ---------------------------------------------------------------------------- presets


def gsm8k_dir() -> Path:
    """The GSM8K jsonl folder: ``$OFFPOLICY_GSM8K_DIR``, else ``../shared/data/gsm8k`` beside the repository."""
    env = os.environ.get("OFFPOLICY_GSM8K_DIR")
    candidates = [Path(env).expanduser()] if env else [
        Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"]
    for folder in candidates:
        if (folder / "train.jsonl").is_file() and (folder / "test.jsonl").is_file():
            return folder.resolve()
    raise DatasetError(f"GSM8K files (train.jsonl, test.jsonl) not found in {', '.join(map(str, candidates))}; "
                       "set OFFPOLICY_GSM8K_DIR to their folder, or tasks.train_path and tasks.eval_path")


GSM8K_SYSTEM_PROMPT = ("Solve the math word problem. Reason step by step, then give the final answer "
                       "as a number on the last line, after '####'.")


def _gsm8k(tasks: dict) -> dict:
    """Defaults of ``tasks.preset=gsm8k`` (per section); ``tasks`` is what the user set."""
    out = {"tasks": {"prompt_key": "question", "answer_key": "answer", "system_prompt": GSM8K_SYSTEM_PROMPT,
                     "eval_size": 1319},
           "reward": {"function": "math"}, "rollout": {"max_new_tokens": 512}}
    if tasks.get("name", "file") in ("file", "jsonl"):
        missing = [k for k in ("train_path", "eval_path") if k not in tasks]
        out["tasks"]["name"] = "file"
        if missing:
            folder = gsm8k_dir()
            paths = {"train_path": str(folder / "train.jsonl"), "eval_path": str(folder / "test.jsonl")}
            out["tasks"].update({k: paths[k] for k in missing})
    return out


PRESETS = {"gsm8k": _gsm8k}


def preset_defaults(name: str, tasks: dict) -> dict:
    """``{section: {key: default}}`` of a task preset, given the user's ``tasks`` section."""
    if name not in PRESETS:
        raise DatasetError(f"tasks.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](tasks)

"""Tasks from JSON-lines files: one object per line with a prompt field and an answer field.

Every row is checked when the file is read, before any compute: a line that is not valid JSON, not
an object, or lacks a mapped field is an error naming ``file:line`` and the field. Blank lines are
skipped. ``answer_key`` values are turned into strings (GSM8K-style ``"... #### 18"`` answers are kept
whole: the reward parses them).
"""

from __future__ import annotations

import json
from pathlib import Path

from offpolicy.data.arithmetic import Task


class DatasetError(ValueError):
    """A malformed data file or row; the message names ``file:line``."""


def load_jsonl_tasks(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer",
                     template: str = "{prompt}", limit: int | None = None) -> list[Task]:
    """Read ``path``; each task's prompt is ``template.format(prompt=row[prompt_key])``."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"cannot read task file {path}: {e.strerror}") from None
    tasks: list[Task] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        for key in (prompt_key, answer_key):
            if key not in row:
                raise DatasetError(f"{path}:{n}: missing field '{key}' (fields: {sorted(row)})")
        tasks.append(Task(f"{path.stem}-{n}", template.format(prompt=row[prompt_key]), str(row[answer_key])))
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise DatasetError(f"{path}: no tasks")
    return tasks

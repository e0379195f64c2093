"""JSON-lines task files: now read by :mod:`offpolicy.data.task_files` (JSONL, Parquet, CSV, ``datasets``)."""

from offpolicy.data.task_files import DatasetError, load_jsonl_tasks

__all__ = ["DatasetError", "load_jsonl_tasks"]

"""The option reference: every config key with its type, default and description, read from the pydantic
models in :mod:`offpolicy.config` (the one source; ``docs/config.md`` is rendered from it).

``offpolicy config [SECTION]`` prints it; ``python -m offpolicy.config_docs`` rewrites ``docs/config.md``
(``tests/test_config_docs.py`` fails while that file differs from a fresh render).
"""

from __future__ import annotations

import difflib
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from offpolicy.config import ConfigError

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python -m offpolicy.config_docs"


class Option(NamedTuple):
    key: str  # dotted, e.g. "model.lora.r"
    type: str  # e.g. "int (>= 0)"
    default: str  # repr of the default
    description: str


class Section(NamedTuple):
    key: str  # dotted, e.g. "model.lora"
    description: str  # the field's description, else the model's docstring, else ""
    options: list[Option]  # its own options, not those of its subsections


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def sections(model: type[BaseModel] | None = None, prefix: str = "") -> list[Section]:
    """Every section under ``model`` (depth first, in declaration order); the top level itself is left out.
    The default: the training config plus ``opa_dpo``, the section only ``offpolicy opa-dpo`` reads."""
    if model is None:
        from offpolicy.pipeline.opa_dpo_config import OpaDpoConfig

        model = OpaDpoConfig
    out: list[Section] = []
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is None:
            continue
        key = f"{prefix}{name}"
        own = [Option(f"{key}.{n}", type_name(f.annotation) + _bounds(f.metadata), _default(f), f.description or "")
               for n, f in sub.model_fields.items() if _section_model(f.annotation) is None]
        out.append(Section(key, field.description or (sub.__doc__ or "").strip(), own))
        out += sections(sub, f"{key}.")
    return out


def type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``'memory' | 'sqlite' | None``, ``list[int]``, ``dict[str, Any]``."""
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))


def _bounds(metadata: list) -> str:
    """The field's range / pattern constraints, e.g. `` (>= 0, < 1)``."""
    parts = []
    for m in metadata:
        parts += [f"{sym} {getattr(m, attr)}" for cls, attr, sym in _BOUNDS if isinstance(m, cls)]
        if getattr(m, "pattern", None):
            parts.append(f"matches {m.pattern}")
    return f" ({', '.join(parts)})" if parts else ""


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    return repr(field.get_default(call_default_factory=True))


def select(found: list[Section], which: str | None) -> list[Section]:
    """The sections at and under ``which`` (a section such as ``model.lora``, or one option's key);
    ConfigError naming the valid sections for anything else."""
    if not which:
        return found
    inside = [s for s in found if s.key == which or s.key.startswith(which + ".")]
    if inside:
        return inside
    for s in found:
        one = [o for o in s.options if o.key == which]
        if one:
            return [s._replace(options=one)]
    keys = [s.key for s in found] + [o.key for s in found for o in s.options]
    close = difflib.get_close_matches(which, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown config section '{which}'{hint}; valid sections: {', '.join(s.key for s in found)}")


# ----------------------------------------------------------------------------------------- rendering


def render_markdown(found: Iterable[Section] | None = None) -> str:
    """The text of ``docs/config.md``."""
    found = sections() if found is None else found
    lines = [f"<!-- Generated from offpolicy/config.py; do not edit. Regenerate: {REGENERATE} -->",
             "", "# Configuration reference", "",
             "Every option of a run, by section. Set them in a YAML file (`train:` then `lr: 1e-4`) or on the",
             "command line as dotted overrides (`offpolicy train train.lr=1e-4`); unknown keys are errors.",
             "`offpolicy config [SECTION]` prints the same reference in a terminal.", ""]
    for s in found:
        lines += [f"## `{s.key}`", ""]
        if s.description:
            lines += [_text(s.description), ""]
        if not s.options:
            continue
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [f"| `{o.key}` | `{_code(o.type)}` | `{_code(o.default)}` | {_text(o.description)} |"
                  for o in s.options]
        lines.append("")
    return "\n".join(lines)


def _code(text: str) -> str:
    """A code span in a table cell: only the cell delimiter needs escaping."""
    return text.replace("|", "\\|").replace("\n", " ")


def _text(text: str) -> str:
    """Prose in a table cell: ``<run_dir>`` must not be read as an HTML tag, nor ``a * b * c`` as emphasis."""
    return _code(text).replace("<", "&lt;").replace("*", "\\*")


def render_plain(found: Iterable[Section], width: int = 100) -> str:
    """For pipes: one ``key: type = default`` line per option, its description indented below."""
    lines = []
    for s in found:
        lines.append(f"[{s.key}]" + (f"  {s.description}" if s.description else ""))
        for o in s.options:
            lines.append(f"{o.key}: {o.type} = {o.default}")
            lines += textwrap.wrap(o.description, width, initial_indent="    ", subsequent_indent="    ")
        lines.append("")
    return "\n".join(lines)


def print_reference(found: list[Section], console=None) -> None:
    """A table per section on a terminal, :func:`render_plain` when stdout is piped."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        sys.stdout.write(render_plain(found))
        return
    for s in found:
        table = Table(title=f"[bold]{s.key}[/bold]" + (f"  {escape(s.description)}" if s.description else ""),
                      title_justify="left", show_lines=False, expand=True)
        table.add_column("key", style="cyan", no_wrap=True)
        table.add_column("type", style="green")
        table.add_column("default", style="yellow")
        table.add_column("description", ratio=1)
        for o in s.options:
            table.add_row(escape(o.key), escape(o.type), escape(o.default), escape(o.description))
        console.print(table)


def main() -> int:
    DOC_PATH.write_text(render_markdown())
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

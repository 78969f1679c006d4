"""Click options derived from the config dataclasses, so each option is defined once: on its field.

    @option(ShuffleConfig, "chunk_bytes")                                 # --chunk-bytes SIZE [default: 8MiB]
    @option(ImportConfig, "format", "--format", "fmt", choices=FORMATS)   # another parameter name, choices

The option's name comes from the field's name (chunk_bytes -> --chunk-bytes), its default and type from the
field (bool -> a flag; bool | None -> --x/--no-x; int | None -> an optional int; an int named *_bytes or
memory -> SIZE, defaulting to e.g. "8MiB"), its help from the field's docstring (the string literal after the
field, read with ast). Keyword arguments override what a command's contract needs (another name, a required
option, choices, a narrower type); `extra` is appended to the docstring. `mismatches` is the check
tests/test_cli_options.py runs on every command: each option that stands for a field has the field's default
and a help that starts with the field's docstring, so editing one side only fails the tests.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping

import click

from shuffler.cli import SIZE

_SIZE_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
               ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def format_size(n: int) -> str:
    """Bytes in the shortest exact form shuffler.units.parse_size reads back: 8MiB, 500MB, 1000."""
    exact = [(n // mult, unit) for unit, mult in _SIZE_UNITS if n and n % mult == 0]
    if not exact:
        return str(n)
    count, unit = min(exact, key=lambda e: e[0])
    return f"{count}{unit}"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (whitespace folded to single spaces), read from the class's source."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs = {}
    for stmt, nxt in itertools.pairwise(node.body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = as_help(" ".join(nxt.value.value.split()))
    return docs


def as_help(doc: str) -> str:
    """A field docstring as command-line help: Python's `None` (the option left out) reads as "unset"."""
    return re.sub(r"\bNone\b", "unset", doc)


def _field(cls: type, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}; its fields are {', '.join(fields)}")
    return fields[name]


def field_default(cls: type, name: str):
    """The field's default, or dataclasses.MISSING when the field is required."""
    f = _field(cls, name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _click_kwargs(cls: type, name: str) -> dict:
    """type, default, show_default and flag form of the option for field `name`."""
    f = _field(cls, name)
    default = field_default(cls, name)
    kinds = {k.strip() for k in str(f.type).split("|")}
    optional = "None" in kinds
    kinds.discard("None")
    kw: dict = {"default": None if default is dataclasses.MISSING else default}
    if kinds == {"bool"}:
        if optional:
            return dict(kw, secondary=True)
        return dict(kw, is_flag=True)
    if kinds == {"int"} and (name.endswith("_bytes") or name == "memory"):
        kw["type"] = SIZE
        if isinstance(default, int):  # "8MiB", which SIZE converts back to the field's int
            kw.update(default=format_size(default), show_default=True)
        return kw
    kw["type"] = {"int": int, "float": float}.get(next(iter(kinds)), str) if len(kinds) == 1 else str
    if kw["default"] is not None:
        kw["show_default"] = True
    return kw


class FieldOption(click.Option):
    """A click Option that knows the config field it stands for (click.option's documented cls= hook)."""

    def __init__(self, *args, config_field: tuple[type, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.config_field = config_field


def option(cls: type, name: str, *decls: str, extra: str = "", choices: Iterable[str] | None = None,
           **overrides) -> Callable:
    """click.option for field `name` of dataclass `cls`; decls rename it (default --field-name)."""
    kw = _click_kwargs(cls, name)
    flag = "--" + name.replace("_", "-")
    if not decls:
        decls = (f"{flag}/--no-{name.replace('_', '-')}",) if kw.pop("secondary", False) else (flag,)
    kw.pop("secondary", None)
    if choices is not None:
        kw["type"] = click.Choice(list(choices))
    kw.update(overrides)
    if kw.get("required") and kw.get("default") is None:
        # click 8.3+ takes an explicit default=None as a value given, so a required option left out would
        # reach the command as None instead of failing with "Missing option".
        kw.pop("default")
    doc = field_docs(cls).get(name)
    if doc is None:
        raise ValueError(f"{cls.__name__}.{name} has no docstring; the option's help is the field's docstring")
    kw["help"] = f"{doc} {extra}".strip()
    return click.option(*decls, cls=FieldOption, config_field=(cls, name), **kw)


def options(cls: type, *names: str) -> Callable:
    """option() for each of `names` with no override, shown in the order given."""

    def decorate(f):
        for name in reversed(names):  # click lists the options in the order the decorators were written
            f = option(cls, name)(f)
        return f

    return decorate


def option_fields(command: click.Command, cls: type, *, renames: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parameter name -> the field of `cls` it stands for, for each of `command`'s options that stands for one.

    An option stands for a field if option() made it (FieldOption), if renames maps its parameter name to the
    field, or if its parameter name is a field's name.
    """
    renames = dict(renames or {})
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for p in command.params:
        if not isinstance(p, click.Option):
            continue
        tagged = getattr(p, "config_field", None)
        if tagged is not None:
            if tagged[0] is cls:
                out[p.name] = tagged[1]
        elif p.name in renames or p.name in names:
            out[p.name] = renames.get(p.name, p.name)
    return out


def mismatches(command: click.Command, cls: type, *, renames: Mapping[str, str] | None = None) -> list[str]:
    """What differs between `command`'s options and the fields of `cls` they stand for (option_fields); [] if nothing.

    Each such option's help must start with the field's docstring, and its default (as the option's type
    converts it) must equal the field's, unless the option is required or the field has no default (the command
    line may ask for what the Python API defaults, and the reverse).
    """
    docs = field_docs(cls)
    # What the command would run with when no option is given: click's defaults, converted by each type.
    defaults = command.make_context(command.name or "command", [], resilient_parsing=True).params
    params = {p.name: p for p in command.params}
    out = []
    for pname, field in option_fields(command, cls, renames=renames).items():
        p = params[pname]
        where = f"{command.name} {p.opts[0]} vs {cls.__name__}.{field}"
        doc = docs.get(field)
        if doc is None:
            out.append(f"{where}: the field has no docstring")
        elif not " ".join((p.help or "").split()).startswith(doc):
            out.append(f"{where}: help {p.help!r} does not start with the field's docstring {doc!r}")
        default = field_default(cls, field)
        if p.required or default is dataclasses.MISSING:
            continue
        value = defaults.get(pname)
        if p.multiple and value is not None:
            value = tuple(value)
        if value != default:
            out.append(f"{where}: default {value!r} differs from the field's {default!r}")
    return out

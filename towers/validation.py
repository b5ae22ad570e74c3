"""Job settings validated in one place: a pydantic model per job holds every default and every
constraint, one line per setting::

    class TrainConfig(JobConfig):
        epochs: PositiveInt = 4          # the constraint is the type
        dropout: Fraction = 0.0

A bad value raises ``ConfigError`` (a ValueError) that names the setting, what it must be and the
value given, whether the model is built from Python, a saved config.json or a command line. A CLI
only parses: ``add_flag`` derives a flag's parser, default and choices from the setting, and
``config_from_args`` builds the model and reports a ``ConfigError`` as an argparse error naming
the flag. No CLI checks a range of its own.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# a share that cannot be everything (a dropout rate: 1.0 would drop every input)
Fraction = Annotated[float, Field(ge=0, lt=1)]
# a share that can be everything (a recall floor of 1.0 asks for exact agreement)
UnitInterval = Annotated[float, Field(ge=0, le=1)]

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A setting has a value it cannot take. ``field`` names it, ``expected`` says what it takes."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field, self.value, self.expected = field, value, expected
        if expected == "a known setting":
            super().__init__(f"unknown setting {field!r}")
        else:
            super().__init__(f"{field.replace('_', ' ')} must be {expected}, got {value!r}")


class JobConfig(BaseModel):
    """Base of every job's settings: unknown names are refused, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(type(self), exc, values) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _config_error(type(self), exc, {name: value}) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Build from a saved dict, ignoring names this version does not know (an older config.json)."""
        return cls(**{k: v for k, v in d.items() if k in cls.model_fields})

    @classmethod
    def expected(cls, field: str) -> str:
        """What ``field`` takes, in words ("a positive integer", "one of dssm, youtubednn")."""
        info = cls.model_fields[field]
        return describe(info.annotation, info.metadata)


def _config_error(cls: type[JobConfig], exc: ValidationError, values: dict[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    loc = err.get("loc") or ("?",)
    field = str(loc[0])
    if err.get("type") == "extra_forbidden" or field not in cls.model_fields:
        return ConfigError(field, values.get(field), "a known setting")
    expected = cls.expected(field)
    if err.get("type") == "value_error":  # a rule of the config's own (one setting against another)
        expected = str(err.get("ctx", {}).get("error") or err.get("msg", "")).removeprefix("Value error, ")
    return ConfigError(field, values.get(field, err.get("input")), expected)


# ------------------------------------------------------------------------------------------------
# a setting's type in words


def _bounds(metadata: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):
            out.update(_bounds(m.metadata))
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(at, name.capitalize())):
                out[name] = getattr(m, name)
    return out


def describe(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """A type annotation with its constraints, in words."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return describe(base, [*metadata, *extra])
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return describe(inner[0], metadata) if len(inner) == 1 else " or ".join(describe(a) for a in inner)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is tuple:  # "a positive integer" -> "a list of positive integers"
        one = describe(get_args(tp)[0]).split(" ", 1)[1]
        return "a list of " + one.replace("integer", "integers", 1).replace("number", "numbers", 1)
    if tp is bool:
        return "true or false (on or off)"
    if tp in (int, float):
        noun = "integer" if tp is int else "number"
        b = _bounds(metadata)
        if b == {"ge": 1} and tp is int or b == {"gt": 0}:
            return f"a positive {noun}"
        if set(b) == {"ge", "lt"}:
            return f"a number in [{b['ge']}, {b['lt']})"
        if set(b) == {"ge", "le"}:
            return f"a number within [{b['ge']}, {b['le']}]"
        parts = [f"{op} {b[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in b]
        return f"{'an' if tp is int else 'a'} {noun}" + (f" {' and '.join(parts)}" if parts else "")
    return f"a {getattr(tp, '__name__', str(tp))}"


# ------------------------------------------------------------------------------------------------
# the CLI side: flags that only parse


def _scalar(tp: Any) -> Any:
    """The base type under Annotated / Optional."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise ValueError(text)


def parser_for(cls: type[JobConfig], field: str) -> Callable[[str], Any]:
    """An argparse ``type=`` for ``field``: turns the text into the setting's Python type (integer,
    number, on/off, comma-separated list) and nothing more; the range is the model's to check."""
    tp = _scalar(cls.model_fields[field].annotation)
    expected = cls.expected(field)
    cast: Callable[[str], Any]
    if get_origin(tp) is tuple:
        item = _scalar(get_args(tp)[0])

        def cast(text: str) -> Any:
            return tuple(item(x) for x in text.split(",") if x.strip())
    elif tp is bool:
        cast = on_off
    elif tp in (int, float):
        cast = tp
    else:
        cast = str

    def parse(text: str) -> Any:
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def add_flag(group: Any, flag: str, cls: type[JobConfig], field: str | None = None, **kw: Any) -> argparse.Action:
    """``group.add_argument(flag, ...)`` for a setting of ``cls``: dest, default, parser, choices
    (for a Literal) and a metavar come from the setting; ``kw`` overrides any of them."""
    field = field or flag.lstrip("-").replace("-", "_")
    info = cls.model_fields[field]
    tp = _scalar(info.annotation)
    opts: dict[str, Any] = {"dest": field, "default": info.get_default(call_default_factory=True)}
    if kw.get("action") is None:
        if get_origin(tp) is Literal:
            opts["choices"] = get_args(tp)
        else:
            opts["type"] = parser_for(cls, field)
            if tp is bool:
                opts["metavar"] = "on|off"
    opts.update(kw)
    return group.add_argument(flag, **opts)


def config_from_args(cls: type[C], args: argparse.Namespace, parser: argparse.ArgumentParser,
                     **values: Any) -> C:
    """``cls`` from every parsed flag whose dest is a setting (``values`` add or override). A bad
    value exits like any argparse error, naming the flag: ``argument --lr: expected a positive
    number, got -1.0``."""
    given = {f: getattr(args, f) for f in cls.model_fields if hasattr(args, f)}
    try:
        return cls(**{**given, **values})
    except ConfigError as exc:
        flags = [a.option_strings[0] for a in parser._actions if a.dest == exc.field and a.option_strings]
        if not flags:
            raise
        parser.error(f"argument {flags[0]}: expected {exc.expected}, got {exc.value!r}")

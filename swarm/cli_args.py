"""Command-line flags generated from frozen config dataclasses.

DESIGN: one typed config object per component, and the CLI is derived from it, so a
flag can never drift from the field it sets. Each field becomes `--field-name`; its
`metadata["help"]` is the help text; `Literal[...]` fields become choices; tuple fields
take several values; `bool` fields become `--flag/--no-flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", "")}
        if not required:
            factory: Any = field.default_factory
            default = field.default if field.default is not dataclasses.MISSING else factory()
            kwargs["default"] = default
            if kwargs["help"] and default not in (None, (), ""):
                kwargs["help"] += f" (default: {default})"
        else:
            kwargs["required"] = True
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif origin is tuple:
            kwargs["nargs"] = "*" if not required else "+"
            kwargs["type"] = typing.get_args(tp)[0]
        elif tp in (int, float, str):
            kwargs["type"] = tp
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        del optional  # None is simply the default of optional fields
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.init and hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)

"""Typed, frozen settings objects filled from CLI flags, then env vars, then defaults.

Each service declares one frozen dataclass; `load_settings(Cls, argv, env_prefix="LLMESH_ROUTER_")` gives
`--triton-url` / `LLMESH_ROUTER_TRITON_URL` for a field `triton_url`. Only scalar field types are supported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS: dict[Any, Any] = {int: int, float: float, str: str, Path: Path}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _converter(tp: Any) -> Any:
    if tp is bool:
        return _parse_bool
    if tp in _SCALARS:
        return _SCALARS[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and args[0] in _SCALARS:
        return _SCALARS[args[0]]
    raise TypeError(f"unsupported settings field type {tp!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any], env_prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        convert = _converter(hints[field.name])
        env_name = env_prefix + field.name.upper()
        default = field.default if field.default is not dataclasses.MISSING else None
        if env_name in os.environ:
            default = convert(os.environ[env_name])
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=convert,
            default=default,
            help=f"(env {env_name}; default {default!r})",
        )


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(namespace).items() if k in names and v is not None}
    return cls(**values)


def load_settings(cls: type[T], argv: list[str] | None, env_prefix: str, description: str = "") -> T:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, cls, env_prefix)
    return from_namespace(cls, parser.parse_args(argv))

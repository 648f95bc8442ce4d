"""Typed, frozen settings objects filled from CLI flags, then env vars, then defaults.

Each service declares one frozen dataclass; `load_settings(Cls, argv, env_prefix="LLMESH_ROUTER_")` gives
`--triton-url` / `LLMESH_ROUTER_TRITON_URL` for a field `triton_url`. Field types: scalars, `X | None`, and
`tuple[X, ...]` (a flag taking one or more values, space- or comma-separated; env likewise). Optional field metadata:
`help` (the flag's help text) and `flag` (another flag name, e.g. `--gguf`; a bool field whose flag starts with
`--no-` takes no value and sets False).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Iterable
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


def _tuple_item(tp: Any) -> Any:
    """X for `tuple[X, ...]`, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any], env_prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        item = _tuple_item(hints[field.name])
        convert = _converter(hints[field.name] if item is None else item)
        env_name = env_prefix + field.name.upper()
        default = field.default if field.default is not dataclasses.MISSING else None
        if env_name in os.environ:
            raw = os.environ[env_name]
            default = convert(raw) if item is None else tuple(convert(v) for v in raw.replace(",", " ").split())
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        about = f"(env {env_name}; default {default!r})"
        if "help" in field.metadata:
            shown = "" if default is None else f"; default {default!r}"
            about = f"{field.metadata['help']} (env {env_name}{shown})"
        if hints[field.name] is bool and flag.startswith("--no-"):
            parser.add_argument(flag, dest=field.name, action="store_const", const=False, default=default, help=about)
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            type=convert,
            default=default,
            help=about,
            nargs="+" if item is not None else None,
            metavar=flag.removeprefix("--").replace("-", "_").upper(),
        )


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(namespace).items() if k in names and v is not None}
    # nargs="+" gives lists; "a,b" is taken as "a b" too (`--variants a,b`).
    values = {k: _split_commas(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def _split_commas(values: list[Any]) -> tuple[Any, ...]:
    return tuple(
        part for value in values for part in (value.split(",") if isinstance(value, str) else [value]) if part != ""
    )


def load_settings(cls: type[T], argv: list[str] | None, env_prefix: str, description: str = "") -> T:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, cls, env_prefix)
    return from_namespace(cls, parser.parse_args(argv))


# ---- writing settings back as flags ------------------------------------------------------------------------


def _flag(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("flag", "--" + field.name.replace("_", "-")))


def _default(field: dataclasses.Field[Any]) -> Any:
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def to_argv(settings: Any, *, only_changed: bool = False) -> list[str]:
    """The flags that `load_settings` (or `add_arguments` + `from_namespace`) parses back into `settings`.

    Every field, or with `only_changed` only those that differ from their defaults (the parsing side then takes
    the others from its env vars, or defaults). Values are written `--flag=value`, so that empty strings and values
    starting with `-` survive. A composite (fields with `section` metadata) is written as its `flat_class`.
    Raises ValueError for a value no flag can express (None where the default is not None, an empty tuple).
    """
    if is_composite(type(settings)):
        settings = flatten(settings)
    hints = typing.get_type_hints(type(settings))
    argv: list[str] = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        flag = _flag(field)
        # _default only when needed: a default factory may be costly, or fail (a file that is not there).
        if only_changed and value == _default(field):
            continue
        item = _tuple_item(hints[field.name])
        negated = hints[field.name] is bool and flag.startswith("--no-")
        if value is None or (negated and value):
            # No flag says this; leaving the flag out says the default.
            if value != _default(field):
                raise ValueError(f"{flag}: {value!r} cannot be written as a flag (the default is {_default(field)!r})")
        elif negated:
            argv.append(flag)
        elif item is not None:
            if not value or any(str(v).startswith("-") for v in value):
                raise ValueError(f"{flag}: {value!r} cannot be written as flag values")
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, bool):
            argv.append(f"{flag}={'true' if value else 'false'}")
        else:
            argv.append(f"{flag}={value}")
    return argv


# ---- composite settings: one object made of several parts' settings (the launcher's) ------------------------
#
# A field with `section(...)` metadata holds one part's whole settings object. On the command line the composite is
# flat (`flat_class`): its own fields, then each section's field `name` as `<section>_<name>` (flag
# `--<section>-<name>`, env `<prefix><SECTION>_<NAME>`: with prefix LLMESH_ and a section named after the service,
# the very env var the service reads). Fields listed as `wired` get no flag: the composite sets them itself
# (in its __post_init__) from its own fields.

_SECTION = "llmesh.settings.section"


@dataclasses.dataclass(frozen=True)
class Section:
    # Fields the composite sets itself: no flag.
    wired: frozenset[str]
    # Fields whose flag is their own name, without the section's prefix (flags kept from before).
    unprefixed: frozenset[str]


def section(*, wired: Iterable[str] = (), unprefixed: Iterable[str] = ()) -> dict[str, Section]:
    """Field metadata making a composite's field hold one part's settings:
    `gateway: GatewaySettings = field(default_factory=GatewaySettings, metadata=section(wired=("host",)))`."""
    return {_SECTION: Section(frozenset(wired), frozenset(unprefixed))}


def is_composite(cls: type[Any]) -> bool:
    return dataclasses.is_dataclass(cls) and any(_SECTION in f.metadata for f in dataclasses.fields(cls))


def _sections(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Section | None]]:
    return [(f, f.metadata.get(_SECTION)) for f in dataclasses.fields(cls)]


def _flat_name(section_name: str, meta: Section, field_name: str) -> str:
    return field_name if field_name in meta.unprefixed else f"{section_name}_{field_name}"


_FLAT_CLASSES: dict[type[Any], type[Any]] = {}


def flat_class(cls: type[Any]) -> type[Any]:
    """A frozen dataclass with one field per flag of composite `cls`, defaults from `cls`'s defaults.

    Raises TypeError when a section names a field (wired, unprefixed) its part's settings do not have, or when two
    flags collide: a renamed field of a service fails here, in a unit test, not in a user's launch.
    """
    if cls not in _FLAT_CLASSES:
        _FLAT_CLASSES[cls] = _make_flat_class(cls)
    return _FLAT_CLASSES[cls]


def _make_flat_class(cls: type[Any]) -> type[Any]:
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for field, meta in _sections(cls):
        if meta is None:
            copy = dataclasses.field(
                default=field.default, default_factory=field.default_factory, metadata=field.metadata
            )
            specs.append((field.name, hints[field.name], copy))
            continue
        if field.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name}: a section needs a default_factory")
        part = field.default_factory()
        part_fields = {f.name: f for f in dataclasses.fields(part)}
        unknown = (meta.wired | meta.unprefixed) - part_fields.keys()
        if unknown:
            raise TypeError(f"{cls.__name__}.{field.name}: {type(part).__name__} has no field {sorted(unknown)}")
        part_hints = typing.get_type_hints(type(part))
        for name, part_field in part_fields.items():
            if name in meta.wired:
                continue
            metadata = {k: v for k, v in part_field.metadata.items() if k != "flag"}
            flat = dataclasses.field(default=getattr(part, name), metadata=metadata)
            specs.append((_flat_name(field.name, meta, name), part_hints[name], flat))
    names = [name for name, _, _ in specs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{cls.__name__}: more than one field would be the flag of {clashes}")
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", specs, frozen=True)


def flatten(settings: Any) -> Any:
    """The `flat_class` instance of a composite (its wired fields dropped)."""
    values: dict[str, Any] = {}
    for field, meta in _sections(type(settings)):
        value = getattr(settings, field.name)
        if meta is None:
            values[field.name] = value
            continue
        for part_field in dataclasses.fields(value):
            if part_field.name not in meta.wired:
                values[_flat_name(field.name, meta, part_field.name)] = getattr(value, part_field.name)
    return flat_class(type(settings))(**values)


def unflatten(cls: type[T], flat: Any) -> T:
    """The composite from its `flat_class` instance: each section is its default with the flat values set (wired
    fields are left to the composite's __post_init__)."""
    values: dict[str, Any] = {}
    for field, meta in _sections(cls):  # type: ignore[arg-type]
        if meta is None:
            values[field.name] = getattr(flat, field.name)
            continue
        assert field.default_factory is not dataclasses.MISSING
        part = field.default_factory()
        changes = {
            f.name: getattr(flat, _flat_name(field.name, meta, f.name))
            for f in dataclasses.fields(part)
            if f.name not in meta.wired
        }
        values[field.name] = dataclasses.replace(part, **changes)
    return cls(**values)


def with_flags(settings: T, **values: Any) -> T:
    """`settings` with some values changed, named as its flags (`gateway_port=...` for `--gateway-port`)."""
    if not is_composite(type(settings)):
        return dataclasses.replace(settings, **values)  # type: ignore[type-var]
    return unflatten(type(settings), dataclasses.replace(flatten(settings), **values))

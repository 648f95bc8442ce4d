import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmesh.settings import (
    add_arguments,
    flat_class,
    from_namespace,
    load_settings,
    section,
    to_argv,
    unflatten,
    with_flags,
)


@dataclass(frozen=True)
class Example:
    port: int = 1
    url: str = "a"
    path: Path | None = None
    enabled: bool = False
    ratio: float = 0.5


def test_flags_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_URL", "from-env")
    monkeypatch.setenv("X_ENABLED", "yes")
    s = load_settings(Example, ["--port", "7", "--path", "/tmp/x"], "X_")
    assert s == Example(port=7, url="from-env", path=Path("/tmp/x"), enabled=True, ratio=0.5)


def test_bad_value_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        load_settings(Example, ["--port", "many"], "X_")


# ---- to_argv: the inverse of load_settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Flagged:
    name: str = "x"
    items: tuple[str, ...] = ("a", "b")
    cache: bool = field(default=True, metadata={"flag": "--no-cache"})
    where: Path | None = None


def test_to_argv_writes_values_that_need_care() -> None:
    s = Example(port=2, url="", path=Path("-odd"), enabled=True, ratio=-0.25)
    argv = to_argv(s)
    assert argv == ["--port=2", "--url=", "--path=-odd", "--enabled=true", "--ratio=-0.25"]
    assert load_settings(Example, argv, "NO_SUCH_PREFIX_") == s


def test_to_argv_only_changed() -> None:
    assert to_argv(Example(), only_changed=True) == []
    assert to_argv(Example(url="b"), only_changed=True) == ["--url=b"]


def test_to_argv_tuples_negated_flags_and_none() -> None:
    s = Flagged(items=("c",), cache=False)
    assert to_argv(s) == ["--name=x", "--items", "c", "--no-cache"]
    assert load_settings(Flagged, to_argv(s), "NO_SUCH_PREFIX_") == s
    assert load_settings(Flagged, to_argv(Flagged()), "NO_SUCH_PREFIX_") == Flagged()
    for unwritable in (Flagged(items=()), Flagged(items=("-a",)), Example(path=None, port=None)):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            to_argv(unwritable)


# ---- composite settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    host: str = "h"
    port: int = 1
    limit: int = 5


@dataclass(frozen=True)
class Whole:
    url: str = "u"
    part: Part = field(default_factory=lambda: Part(port=2), metadata=section(wired=("host",), unprefixed=("limit",)))

    def __post_init__(self) -> None:
        object.__setattr__(self, "part", dataclasses.replace(self.part, host=self.url))


def test_composite_flags_and_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [f.name for f in dataclasses.fields(flat_class(Whole))] == ["url", "part_port", "limit"]
    monkeypatch.setenv("X_PART_PORT", "7")
    parser = argparse.ArgumentParser()
    add_arguments(parser, flat_class(Whole), "X_")
    s = unflatten(Whole, from_namespace(flat_class(Whole), parser.parse_args(["--url", "v", "--limit", "3"])))
    assert s == Whole(url="v", part=Part(port=7, limit=3)) and s.part.host == "v"
    assert to_argv(s) == ["--url=v", "--part-port=7", "--limit=3"]
    assert to_argv(s, only_changed=True) == ["--url=v", "--part-port=7", "--limit=3"]
    assert with_flags(Whole(), part_port=9, url="w") == Whole(url="w", part=Part(port=9))


def test_a_section_naming_a_missing_field_fails_early() -> None:
    @dataclass(frozen=True)
    class Renamed:
        part: Part = field(default_factory=Part, metadata=section(wired=("hostname",)))

    with pytest.raises(TypeError, match="hostname"):
        flat_class(Renamed)


def test_clashing_flags_fail_early() -> None:
    @dataclass(frozen=True)
    class Clash:
        part_port: int = 0
        part: Part = field(default_factory=Part, metadata=section())

    with pytest.raises(TypeError, match="part_port"):
        flat_class(Clash)


def test_list_flags_take_commas_as_well_as_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton_models.config import add_build_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(["--variants", "smollm2-135m-int8,qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    assert settings_from(args).variants == ("smollm2-135m-int8", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    monkeypatch.setenv("LLMESH_BUILD_VARIANTS", "smollm2-135m-int8,qwen2.5-coder-0.5b")
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    assert settings_from(parser.parse_args([])).variants == ("smollm2-135m-int8", "qwen2.5-coder-0.5b")

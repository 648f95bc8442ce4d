from dataclasses import dataclass
from pathlib import Path

import pytest

from llmesh.settings import load_settings


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

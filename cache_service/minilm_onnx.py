"""The onnxruntime all-MiniLM-L6-v2 encoder; it lives in llmesh/minilm_onnx.py, shared with the embedding model
Triton serves (triton_models/embedding_model.py)."""

from __future__ import annotations

from llmesh.minilm_onnx import OnnxMiniLMEncoder, build_graph

__all__ = ["OnnxMiniLMEncoder", "build_graph"]

"""llmesh: an LLM serving mesh (Envoy -> gateway -> router -> Triton), with Redis-backed cache and limits."""

__version__ = "0.1.0"

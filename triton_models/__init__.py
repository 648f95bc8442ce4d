"""SmolLM2 (and other Llama-family checkpoints) as ONNX decoder graphs served by Triton's python backend:
continuous batching, paged KV budget, prefix cache, speculative decoding, token streaming.

Serving-path modules (`tokenizer`, `engine`, `python_model`, `runtime`, `config`) import neither torch nor
the `gguf` package; `gguf_loader`, `graph`, `weights` and `repository` (the build) and `reference` (tests) do,
lazily.
"""

"""SmolLM2 exported to ONNX and served by Triton's python backend with token streaming.

Serving-path modules (`tokenizer`, `engine`, `python_model`, `runtime`, `config`) import neither torch nor
the `gguf` package; `gguf_loader`, `reference`, `export` and `repository` (the build) do, lazily.
"""

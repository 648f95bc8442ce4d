"""The whole mesh (Envoy -> gateway -> router -> Triton) against llama.cpp's llama-server.

python -m benchmarks.mesh --help
"""

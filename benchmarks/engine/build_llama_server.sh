#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, for the engine benchmark's anchor only (never needed by tests or CI).
# Source: the llama-cpp-python sdist from PyPI, which vendors llama.cpp. Takes ~8 min on 2 cores; the binary is
# kept under <cache_dir>/llama.cpp/<sdist version>/ and reused. Prints the binary's path.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${LLMESH_CACHE_DIR:-$HOME/.cache/llmesh}
ROOT="$CACHE/llama.cpp/$VERSION"
BIN="$ROOT/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null && command -v g++ >/dev/null || { echo "cmake and g++ are needed" >&2; exit 1; }
PY=${PYTHON:-python3}
mkdir -p "$ROOT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
rm -rf "$ROOT/src" && mv "$src" "$ROOT/src"
cd "$ROOT/src"
cmake -B "$ROOT/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DCMAKE_BUILD_TYPE=Release >&2
nice -n 10 cmake --build "$ROOT/build" --target llama-server llama-bench -j"$(nproc)" >&2
echo "$BIN"

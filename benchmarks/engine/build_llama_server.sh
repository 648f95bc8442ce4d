#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, for the engine benchmark's anchor only (never needed by tests or CI).
# Source: the llama-cpp-python sdist from PyPI, which vendors llama.cpp. Takes ~8 min on 2 cores; the binaries are
# kept under <cache_dir>/llama.cpp/<sdist version>-noamx/build/bin/ and reused. Also builds llama-perplexity and
# llama-tokenize there (qwen_reference.py regenerates the tests' golden data with them). Prints llama-server's path.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${LLMESH_CACHE_DIR:-$HOME/.cache/llmesh}
# "-noamx": builds from before AMX was turned off (below) crash on machines like ours; this name retires them.
ROOT="$CACHE/llama.cpp/$VERSION-noamx"
BIN="$ROOT/build/bin/llama-server"
TARGETS=(llama-server llama-bench llama-perplexity llama-tokenize)
built() { for t in "${TARGETS[@]}"; do [ -x "$ROOT/build/bin/$t" ] || return 1; done; }
if built; then echo "$BIN"; exit 0; fi
# One build at a time: a second caller (two benchmarks started together) waits for the first, then reuses its
# binaries, instead of replacing the source tree under it.
mkdir -p "$ROOT"
exec 9>"$ROOT.lock"
flock 9
if built; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null && command -v g++ >/dev/null || { echo "cmake and g++ are needed" >&2; exit 1; }
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
rm -rf "$ROOT/src" && mv "$src" "$ROOT/src"
cd "$ROOT/src"
# -march=native compiles ggml's AMX kernels in wherever the CPU reports AMX, but where the kernel or hypervisor
# does not enable AMX state their first tile instruction is SIGILL (seen here: Xeon with amx_int8, llama-server
# died loading any model). So never AMX; the AVX-512 kernels remain.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -B "$ROOT/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" -DCMAKE_BUILD_TYPE=Release >&2
nice -n 10 cmake --build "$ROOT/build" --target "${TARGETS[@]}" -j"$(nproc)" >&2
echo "$BIN"

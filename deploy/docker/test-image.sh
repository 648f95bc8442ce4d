#!/usr/bin/env bash
# Proves the image end to end on a host without a registry: makes a Debian base (make-base-image.sh), builds the
# image on it (build-image.sh), runs the mesh from it, one container per role (--network host, free loopback ports,
# read-only root filesystems, plaintext gRPC inside), and answers a chat request with the openai SDK through the
# Envoy container. Redis is a redis-server this script starts on a free port; the model repository is
# `llmesh build --variants smollm2-135m-int8` (cached), mounted read-only. Containers, Redis and the temp folder are
# removed on exit, failure included.
#
#   deploy/docker/test-image.sh        (needs: docker, debootstrap, redis-server, the project's .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${LLMESH_VENV:-.venv}
BASE_TAG=llmesh-base:bookworm
TAG=llmesh:test
RUN_ID=llmesh-test-$$
started=$SECONDS
log() { printf '\033[1m[test-image +%ss]\033[0m %s\n' "$((SECONDS - started))" "$*" >&2; }

tmp=$(mktemp -d)
containers=()
redis_pid=
cleanup() {
  local status=$?
  if ((status != 0)); then
    for c in "${containers[@]}"; do
      echo "----- last log lines of $c -----" >&2
      docker logs --tail 30 "$c" >&2 2>&1 || true
    done
  fi
  ((${#containers[@]})) && docker rm -f "${containers[@]}" >/dev/null 2>&1
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
  rm -rf "$tmp"
  log "cleaned up (exit $status)"
}
trap cleanup EXIT

log "base image $BASE_TAG (debootstrap; cached by recipe hash)"
deploy/docker/make-base-image.sh --tag "$BASE_TAG"
log "image $TAG on $BASE_TAG"
deploy/docker/build-image.sh --base "$BASE_TAG" --tag "$TAG"
log "image size: $(docker image inspect "$TAG" --format '{{.Size}}' | numfmt --to=iec) (base $(docker image inspect \
  "$BASE_TAG" --format '{{.Size}}' | numfmt --to=iec))"

repository=$("$VENV/bin/llmesh" build --variants smollm2-135m-int8 | tail -n1)
# The repository links its large files into <cache>/model-artifacts (relative links): both are mounted, in the same
# layout. A repository copied with `cp -rL` (links resolved) needs only the one mount.
cache_root=$(dirname "$(dirname "$repository")")
models_mounts=(-v "$repository:/models/models/$(basename "$repository"):ro"
  -v "$cache_root/model-artifacts:/models/model-artifacts:ro")
model_repository=/models/models/$(basename "$repository")
log "model repository: $repository"

read -r redis_port triton_grpc triton_http triton_metrics router_port limiter_port limiter_metrics cache_port \
  cache_metrics gateway_port envoy_port envoy_admin < <("$VENV/bin/python" -c \
  'from control.process import free_ports; print(*free_ports(12))')
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp" --save '' --appendonly no >"$tmp/redis.log" 2>&1 &
redis_pid=$!
redis_url=redis://127.0.0.1:$redis_port/0

# One container per role, as in Kubernetes: read-only root, /tmp writable, uid 10001 (the image's default user).
run() {
  local role=$1
  shift
  docker run -d --name "$RUN_ID-$role" --network host --read-only --tmpfs /tmp "$@" >/dev/null
  containers+=("$RUN_ID-$role")
}

# wait_ready NAME PYTHON-EXPRESSION: polls the expression (a probe from control.process) while the container runs.
wait_ready() {
  local name=$1 probe=$2 deadline=$((SECONDS + ${3:-180}))
  until "$VENV/bin/python" -c "import sys; from control.process import *; sys.exit(not $probe())" 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$RUN_ID-$name")" != true ]; then
      log "$name exited"
      return 1
    fi
    ((SECONDS < deadline)) || { log "$name not ready in time"; return 1; }
    sleep 1
  done
  log "$name ready"
}

log "starting the mesh from $TAG"
run triton --shm-size 256m "${models_mounts[@]}" "$TAG" serve triton --model-repository "$model_repository" \
  --host 127.0.0.1 --grpc-port "$triton_grpc" --http-port "$triton_http" --metrics-port "$triton_metrics"
run limiter "$TAG" serve limiter --host 127.0.0.1 --port "$limiter_port" --metrics-port "$limiter_metrics" \
  --redis-url "$redis_url"
run cache "$TAG" serve cache --host 127.0.0.1 --port "$cache_port" --metrics-port "$cache_metrics" \
  --redis-url "$redis_url"
wait_ready triton "http_ok_probe('http://127.0.0.1:$triton_http/v2/health/ready')" 300
run router "${models_mounts[@]}" "$TAG" serve router --host 127.0.0.1 --port "$router_port" \
  --triton-url "127.0.0.1:$triton_grpc" --model-repository "$model_repository"
wait_ready limiter "grpc_health_probe('127.0.0.1:$limiter_port', 'llmesh.v1.LimiterService')"
wait_ready cache "grpc_health_probe('127.0.0.1:$cache_port')"
wait_ready router "grpc_health_probe('127.0.0.1:$router_port')"
run gateway "$TAG" serve gateway --host 127.0.0.1 --port "$gateway_port" --router-url "127.0.0.1:$router_port" \
  --redis-url "$redis_url" --cache-url "127.0.0.1:$cache_port" --limiter-url "127.0.0.1:$limiter_port"
wait_ready gateway "grpc_health_probe('127.0.0.1:$gateway_port')"
# The gateway by DNS name (a STRICT_DNS cluster, as a Kubernetes Service name would be).
run envoy "$TAG" serve envoy --host 127.0.0.1 --port "$envoy_port" --admin-port "$envoy_admin" \
  --gateways "localhost:$gateway_port" --limiter "127.0.0.1:$limiter_port"
wait_ready envoy "http_ok_probe('http://127.0.0.1:$envoy_admin/ready')"
"$VENV/bin/python" -c "import httpx; print(*(l for l in httpx.get('http://127.0.0.1:$envoy_admin/clusters').text.split()
  if l.startswith('gateway::') and ('hostname' in l or 'health_flags' in l)), sep='\n')"
docker ps --filter "name=$RUN_ID" --format 'table {{.Names}}\t{{.Status}}\t{{.Command}}'

key=$("$VENV/bin/llmesh" keys create --tier free --note test-image --redis-url "$redis_url" --json |
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["key"])')
log "API key created (free tier); asking through the Envoy container at 127.0.0.1:$envoy_port"
"$VENV/bin/python" - "$envoy_port" "$key" <<'PY'
import sys
import time

from openai import OpenAI

port, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
question = "What is the capital of France? Answer in one word."
# Envoy marks the gateway healthy after its first health check; until then it answers 503.
for attempt in range(30):
    try:
        started = time.monotonic()
        reply = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30
        )
        break
    except Exception as exc:  # a 503 before the first health check passes
        if attempt == 29:
            raise
        print(f"not yet: {type(exc).__name__}: {exc}", file=sys.stderr)
        time.sleep(1)
print(f"Q: {question}")
print(f"A: {reply.choices[0].message.content!r}")
print(f"model {reply.model}, finish_reason {reply.choices[0].finish_reason}, usage {reply.usage}, "
      f"{time.monotonic() - started:.2f}s")
assert reply.choices[0].message.content, "empty answer"
PY
log "PASS: the mesh from $TAG answered through Envoy (total $((SECONDS - started))s)"

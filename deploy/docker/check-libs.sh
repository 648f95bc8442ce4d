#!/bin/sh
# Fails (listing them) when a shared library that llmesh's wheels load is missing from the image: what tritonserver,
# its python backend stub (for this Python), Envoy, onnxruntime, ... need beyond what the wheels bundle. Run at image
# build time, so a base without them (libpython3.X shared, libstdc++, zlib, libexpat) fails the build, not a pod.
set -eu
venv=${1:-/opt/llmesh}
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stub="$site/pytriton/tritonserver/python_backend_stubs/$version/triton_python_backend_stub"
[ -f "$stub" ] || { echo "nvidia-pytriton has no python backend stub for Python $version" >&2; exit 1; }
# Libraries a wheel bundles carry auditwheel's hash in their name (libssl-57118d4e.so.3) and are found through
# their RPATH when loaded; ldd on them alone reports their siblings as missing, so those lines are ignored.
missing=$(
  { find "$site" -path '*/python_backend_stubs' -prune -o -type f \( -name '*.so' -o -name '*.so.*' \) -print
    echo "$site/pytriton/tritonserver/bin/tritonserver"; echo "$stub"; echo "$site/envoy/_bin/envoy"; } |
    xargs ldd 2>/dev/null | grep 'not found' | grep -vE -- '-[0-9a-f]{8}[.0-9]*\.so' | sort -u || true
)
if [ -n "$missing" ]; then
  echo "the base image lacks shared libraries llmesh needs:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "shared libraries: all found (Python $version)"

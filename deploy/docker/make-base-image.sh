#!/usr/bin/env bash
# A Debian minimal base image made here, for hosts that cannot pull python:3.11-slim (no registry reachable):
# debootstrap of Debian bookworm (minbase) with Python 3.11 and what tritonserver's Python backend needs, imported
# with `docker import`. The Debian mirror is the host's own (its apt sources), read at run time.
#
#   deploy/docker/make-base-image.sh [--tag llmesh-base:bookworm] [--suite bookworm]
#
# The root filesystem is cached as a tarball under <llmesh cache dir>/docker/, named by the hash of the recipe
# (suite, packages, the steps between the recipe markers below), so a second run only re-imports it when the tag is
# missing.
set -euo pipefail

TAG=llmesh-base:bookworm
SUITE=bookworm
while (($#)); do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --suite) SUITE=$2; shift 2 ;;
    *) echo "usage: $0 [--tag NAME:TAG] [--suite bookworm]" >&2; exit 2 ;;
  esac
done

# python3 (3.11 in bookworm) and its venv module; libpython3.11: the shared library the python backend stub
# (triton_python_backend_stub) links; libstdc++6, zlib1g, libexpat1: the rest of what ldd lists for tritonserver,
# libtriton_python.so and the stub beyond the libraries the pytriton wheel bundles (libnuma among them).
PACKAGES=python3,python3-venv,libpython3.11,libstdc++6,zlib1g,libexpat1,ca-certificates

log() { printf '\033[1m[make-base-image]\033[0m %s\n' "$*" >&2; }

cache_root=${LLMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmesh}
key=$({ echo "$SUITE $PACKAGES"; sed -n '/^# --- base recipe/,/^# --- end/p' "$0"; } | sha256sum | cut -c1-16)
tarball="$cache_root/docker/base-$SUITE-$key.tar"

if docker image inspect "$TAG" --format '{{index .Config.Labels "llmesh.base.key"}}' 2>/dev/null | grep -qx "$key"; then
  log "$TAG is up to date (recipe $key)"
  exit 0
fi

# The first mirror in the host's apt sources that serves $SUITE itself (not -updates or -security).
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    awk -v s="$SUITE" '$1 == "deb" {
      i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i+1) == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 stanzas: a URIs line and a Suites line per stanza, separated by blank lines.
    awk -v s="$SUITE" '
      /^$/ { if (ok && uri) { print uri; exit } uri = ""; ok = 0 }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
      END { if (ok && uri) print uri }' "$f"
  done
}

# --- base recipe (part of the cache key)
if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
  mirror=$(host_mirror | head -n1)
  [ -n "$mirror" ] || { log "no apt source for $SUITE in /etc/apt/sources.list*"; exit 1; }
  mkdir -p "$cache_root/docker"
  rootfs=$(mktemp -d "$cache_root/docker/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  started=$SECONDS
  log "debootstrap $SUITE (minbase + $PACKAGES) from the host's mirror; takes a few minutes"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -n 40 "$rootfs.log" >&2; log "debootstrap failed (log: $rootfs.log)"; exit 1; }
  rm -f "$rootfs.log"
  # Package caches, lists, docs and locales are not needed to run.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  log "debootstrap done in $((SECONDS - started))s"
  tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  # Older recipes' root filesystems are not used again.
  find "$cache_root/docker" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "${tarball##*/}" -delete
  rm -rf "$rootfs"
  trap - EXIT
fi
# --- end

log "importing $tarball as $TAG"
docker import \
  --change "LABEL llmesh.base.key=$key" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$TAG" >&2
log "$TAG ready ($(docker image inspect "$TAG" --format '{{.Size}}' | numfmt --to=iec))"

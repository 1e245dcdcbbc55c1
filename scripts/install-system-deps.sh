#!/usr/bin/env bash
# Install the Debian packages the columnhub test-suite needs, when missing.
#
# - xrootd-server: the `xrootd` daemon, started on loopback by tests/conftest.py
# - xrootd-client: `xrdfs`/`xrdcp`, used to check that the server is ready
# - postgresql: a real PostgreSQL for the service's several-replica tests
#   (started by the tests as an unprivileged user on loopback)
# - chromium: the dashboard's browser test (driven by Playwright)
# - xfsprogs: `mkfs.xfs`, for the test that a reused result is cloned (reflink)
#   on a file system that shares blocks (a loop-mounted XFS image, root only)
#
# Idempotent and quick when everything is present: `apt-get update` runs only
# when something has to be installed. Runs as root on Debian 12; as another
# user it uses sudo when available.
set -euo pipefail

# package -> a command it provides (checked first, so a present tool is enough)
declare -A PACKAGES=(
  [xrootd-server]=xrootd
  [xrootd-client]=xrdfs
  [postgresql]=/usr/lib/postgresql/*/bin/initdb
  [chromium]=chromium
  [xfsprogs]=mkfs.xfs
)

missing=()
for pkg in "${!PACKAGES[@]}"; do
  cmd=${PACKAGES[$pkg]}
  if command -v $cmd >/dev/null 2>&1; then  # unquoted: a path glob expands
    continue
  fi
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    continue
  fi
  missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-system-deps: all present (${!PACKAGES[*]})"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: missing ${missing[*]} and no apt-get here;" \
       "install them with your system's package manager" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install-system-deps: missing ${missing[*]}; run this script as root" >&2
    exit 1
  fi
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

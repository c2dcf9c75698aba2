#!/usr/bin/env bash
# System packages the tests need, from Debian: nginx (nginx-light) for the
# HTTP range-read tests of crates/tensafe-remote, which start it themselves
# on a loopback port with a private configuration. Idempotent: installs only
# what is missing, and refreshes the package lists only when apt cannot find
# the package.
set -euo pipefail
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update -q
fi
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"

#!/usr/bin/env bash
# Everything FlashMesh's lab and tests need on a fresh Debian 12 machine, idempotent:
# Debian packages, a virtualenv in .venv with FlashMesh and its dev tools, and the
# control plane built from Go modules (cached outside the repository; see tools/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

packages=(make openssl python3 python3-venv iproute2 ca-certificates)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v go >/dev/null || { say "Go 1.26 is needed to build the control plane (go not found)"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  say "installing FlashMesh and its dev tools into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi

bash tools/build.sh
say "ready"

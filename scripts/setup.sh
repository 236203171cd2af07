#!/usr/bin/env bash
# Everything FlashMesh's lab and tests need on a fresh Debian 12 machine, idempotent:
# Debian packages, a virtualenv in .venv with FlashMesh and its dev tools, and the
# control plane built from Go modules (cached outside the repository; see tools/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The control plane and tests; then the kernel lab: QEMU, the initramfs tools, and the data
# path's userland that the VMs share with the host (installed before any VM boots: the VMs
# cache the host's files). lvm2 only recommends thin-provisioning-tools, which thin pools need.
# fdisk: scenarios partition a volume as its user would (sfdisk).
# prometheus: the lab runs its own, scraping every component (the packaged service is not
# wanted and is stopped where systemd runs it).
packages=(make openssl python3 python3-venv iproute2 ca-certificates curl
          qemu-system-x86 busybox-static cpio kmod xz-utils
          nvme-cli fio python3-pyverbs ibverbs-providers rdma-core
          lvm2 thin-provisioning-tools mdadm xfsprogs e2fsprogs fdisk
          prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# The virtualenv is made from Debian's /usr/bin/python3 with its system packages visible:
# pyverbs exists only as Debian's python3-pyverbs, and the lab's VMs run the same .venv.
if ! grep -qs '^home = /usr/bin$' .venv/pyvenv.cfg \
   || ! grep -qs '^include-system-site-packages = true$' .venv/pyvenv.cfg; then
  say "creating .venv on /usr/bin/python3"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  say "installing FlashMesh and its dev tools into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi

# The control plane now: every test session and the demo start one. The CSI sidecars,
# csi-sanity and helm, if not cached, build in the background (at a lower priority) while
# the tests run: only some tests need them, and flashmesh.lab.binaries makes those wait for
# this build. It holds the build lock from here until it ends, so nothing starts a second.
bash tools/build.sh k8s etcd kwok
if ! bash tools/build.sh --check csi sanity helm 2>/dev/null; then
  cache=${FLASHMESH_CACHE:-$HOME/.cache/flashmesh}
  log="$cache/bin/background-build.log"
  mkdir -p "$cache/bin"
  exec 9>>"$cache/bin/.build.lock"
  flock 9
  say "building the CSI sidecars, csi-sanity and helm in the background (log: $log)"
  FLASHMESH_BUILD_LOCK_HELD=1 setsid nice -n 10 bash tools/build.sh csi sanity helm \
    </dev/null >"$log" 2>&1 &
  exec 9>&-  # the background build keeps the lock (its copy of this descriptor) until it ends
fi
.venv/bin/python -m flashmesh.lab.kernel
say "ready"

#!/usr/bin/env bash
# Builds the control-plane binaries from their Go modules, through the module proxy, into
# a cache outside the repository ($FLASHMESH_CACHE, default ~/.cache/flashmesh), one folder
# per component and version. A folder that is complete is reused; nothing is rebuilt.
#   usage: tools/build.sh [k8s|etcd|kwok ...]   (default: all)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${FLASHMESH_CACHE:-$HOME/.cache/flashmesh}
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

say() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# run_build NAME DEST BINARIES... -- COMMAND...: runs COMMAND unless every binary exists,
# building into a temporary folder that is renamed into place only when complete.
run_build() {
  local name=$1 dest=$2; shift 2
  local bins=()
  while [ "$1" != "--" ]; do bins+=("$1"); shift; done; shift
  local missing=0
  for b in "${bins[@]}"; do [ -x "$dest/$b" ] || missing=1; done
  if [ $missing = 0 ]; then say "$name: cached in $dest"; return; fi
  say "$name: building ${bins[*]} (a cold build takes minutes)"
  local start=$SECONDS tmp="$dest.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  # Print a line every 30 s so a long compile shows it is alive.
  ( while sleep 30; do say "$name: still building ($((SECONDS - start)) s)"; done ) &
  local ticker=$!
  local rc=0
  OUT="$tmp" "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true; wait "$ticker" 2>/dev/null || true
  if [ $rc != 0 ]; then rm -rf "$tmp"; say "$name: build FAILED"; return $rc; fi
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "$name: built in $((SECONDS - start)) s"
}

build_k8s() {
  local v=$KUBERNETES_VERSION minor
  minor=$(echo "$v" | cut -d. -f2)
  local p=k8s.io/component-base/version c=k8s.io/client-go/pkg/version
  # Version stamps: without them every binary reports v0.0.0 and clients such as helm
  # misjudge the server.
  local ldf="-s -w -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  ldf="$ldf -X $c.gitVersion=$v -X $c.gitMajor=1 -X $c.gitMinor=$minor -X $c.gitTreeState=clean"
  (cd "$here/k8s" && go build -tags=notest -ldflags="$ldf" -o "$OUT/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  (cd "$here/etcd" && go build -ldflags="-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3 \
     && go build -ldflags="-s -w" -o "$OUT/etcdctl" go.etcd.io/etcd/etcdctl/v3)
}

build_kwok() {
  local v=$KWOK_VERSION
  GOBIN="$OUT" go install -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$v"
  # Standalone kwok has no built-in stages; keep the upstream stage files beside it.
  local stages
  stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$v/kustomize/stage"
  mkdir -p "$OUT/stages"
  cp -r "$stages/." "$OUT/stages/"
  chmod -R u+w "$OUT/stages"
}

targets=("$@")
[ ${#targets[@]} = 0 ] && targets=(k8s etcd kwok)
for t in "${targets[@]}"; do
  case $t in
    k8s)  run_build kubernetes "$cache/bin/kubernetes-$KUBERNETES_VERSION" \
            kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_k8s ;;
    etcd) run_build etcd "$cache/bin/etcd-$ETCD_VERSION" etcd etcdctl -- build_etcd ;;
    kwok) run_build kwok "$cache/bin/kwok-$KWOK_VERSION" kwok -- build_kwok ;;
    *) echo "tools/build.sh: unknown target '$t' (use k8s, etcd or kwok)" >&2; exit 2 ;;
  esac
done

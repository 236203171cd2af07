#!/usr/bin/env bash
# Builds the control-plane binaries, the CSI sidecars, csi-sanity and helm from their Go
# modules, through the module proxy, into a cache outside the repository ($FLASHMESH_CACHE,
# default ~/.cache/flashmesh), one folder per component and version. A folder that is
# complete is reused; nothing is rebuilt.
#   usage: tools/build.sh [--check] [k8s|etcd|kwok|csi|sanity|helm|mock ...]
#   (default: all but mock, which only the benchmarks use; --check builds nothing and
#   exits 1 when any of them is not cached)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${FLASHMESH_CACHE:-$HOME/.cache/flashmesh}
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"
# The compiler collects garbage less often: a fifth less compile time on this 2-core machine
# (csi-sanity from an empty build cache: 40 s against 50 s), for memory it has plenty of.
export GOGC=${GOGC:-400}

say() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A machine without Go gets the toolchain from the Go module proxy (golang.org/toolchain,
# the module `go` itself downloads toolchains from), checked against the pinned sha256 and
# unpacked once into the cache (unpacked beside it, then renamed into place).
ensure_go() {
  command -v go >/dev/null && return
  local goroot="$cache/go-$GO_VERSION"
  "$goroot/bin/go" version >/dev/null 2>&1 || fetch_go "$goroot"
  export PATH="$goroot/bin:$PATH"
  say "using $(go version)"
}

# fetch_go GOROOT, in a subshell so that its temporary folder goes whatever happens.
fetch_go() (
  local goroot=$1 proxy="" p mod="v0.0.1-go$GO_VERSION.linux-amd64" tmp
  for p in $(echo "${GOPROXY:-https://proxy.golang.org}" | tr ',|' '  '); do
    case $p in http*) proxy=${p%/}; break ;; esac
  done
  [ -n "$proxy" ] || { say "go not found, and GOPROXY=$GOPROXY names no proxy to fetch it from"; exit 1; }
  say "go not found: fetching Go $GO_VERSION from $proxy (about 70 MB)"
  mkdir -p "$cache"; tmp=$(mktemp -d "$cache/.go-fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/go.zip" "$proxy/golang.org/toolchain/@v/$mod.zip"
  echo "$GO_ZIP_SHA256  $tmp/go.zip" | sha256sum -c --quiet - \
    || { say "the Go $GO_VERSION zip does not match GO_ZIP_SHA256 in tools/versions.env"; exit 1; }
  # zipfile drops the mode bits the zip records: set back. The module zip names each
  # go.mod _go.mod (so no nested module is cut out of it): named back, as go does.
  python3 - "$tmp/go.zip" "$tmp/out" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = info.external_attr >> 16 & 0o777
        if mode:
            os.chmod(path, mode)
        if os.path.basename(path) == "_go.mod":
            os.rename(path, os.path.join(os.path.dirname(path), "go.mod"))
PY
  rm -rf "$goroot"; mv "$tmp/out/golang.org/toolchain@$mod" "$goroot"
)

# run_build NAME DEST BINARIES... -- COMMAND...: runs COMMAND unless every binary exists,
# building into a temporary folder that is renamed into place only when complete.
run_build() {
  local name=$1 dest=$2; shift 2
  local bins=()
  while [ "$1" != "--" ]; do bins+=("$1"); shift; done; shift
  local missing=0
  for b in "${bins[@]}"; do [ -x "$dest/$b" ] || missing=1; done
  if [ "$check_only" = 1 ]; then [ $missing = 0 ] || uncached+=("$name"); return 0; fi
  if [ $missing = 0 ]; then say "$name: cached in $dest"; return; fi
  ensure_go
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

# The CSI sidecars and snapshot-controller, each stamped with its own release (they print
# main.version for --version), plus the snapshot CRDs that snapshot-controller serves.
# run_build calls this in an || list, where set -e is off: every step checks itself.
build_csi() {
  local m=github.com/kubernetes-csi line name pkg module want got
  for line in \
    "csi-provisioner external-provisioner/v6 cmd/csi-provisioner $CSI_PROVISIONER_VERSION" \
    "csi-attacher external-attacher/v4 cmd/csi-attacher $CSI_ATTACHER_VERSION" \
    "csi-resizer external-resizer/v2 cmd/csi-resizer $CSI_RESIZER_VERSION" \
    "csi-snapshotter external-snapshotter/v8 cmd/csi-snapshotter $CSI_SNAPSHOTTER_VERSION" \
    "snapshot-controller external-snapshotter/v8 cmd/snapshot-controller $CSI_SNAPSHOTTER_VERSION" \
    "- external-snapshotter/client/v8 - $CSI_SNAPSHOTTER_VERSION"; do
    read -r name module pkg want <<<"$line"
    # tools/csi/go.mod pins the modules; it must agree with versions.env.
    got=$(cd "$here/csi" && go list -m -f '{{.Version}}' "$m/$module") || return 1
    if [ "$got" != "$want" ]; then
      echo "tools/csi/go.mod has $m/$module $got, versions.env says $want" >&2; return 1
    fi
    [ "$name" = - ] && continue
    (cd "$here/csi" && go build -ldflags="-s -w -X main.version=$want" -o "$OUT/$name" \
       "$m/$module/$pkg") || return 1
  done
  # The VolumeSnapshot CRDs ship in the client module (kustomization.yaml is not one).
  local crds
  crds="$(cd "$here/csi" && go list -m -f '{{.Dir}}' "$m/external-snapshotter/client/v8")" \
    || return 1
  crds="$crds/config/crd"
  mkdir -p "$OUT/crds" || return 1
  find "$crds" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml -exec cp {} "$OUT/crds/" \; \
    || return 1
  chmod -R u+w "$OUT/crds" || return 1
  [ -n "$(ls "$OUT/crds")" ] || { echo "no snapshot CRDs in $crds" >&2; return 1; }
}

build_sanity() {
  GOBIN="$OUT" go install -ldflags="-s -w -X main.VERSION=$CSI_SANITY_VERSION" \
    "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
}

build_helm() {
  local v=$HELM_VERSION p=helm.sh/helm/v3 gomod kv major minor
  # As helm's Makefile does: stamp the release, and the Kubernetes version that
  # `helm template` and `helm lint` assume, taken from the client-go helm builds with.
  gomod=$(go mod download -json "$p@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  kv=$(awk '$1 == "k8s.io/client-go" { sub(/^v/, "", $2); print $2 }' "$gomod" 2>/dev/null)
  case $kv in [0-9]*.[0-9]*) ;; *) echo "no k8s.io/client-go version in helm's go.mod" >&2; return 1 ;; esac
  major=$(( ${kv%%.*} + 1 )); minor=$(echo "$kv" | cut -d. -f2)
  local ldf="-s -w -X $p/internal/version.version=$v -X $p/internal/version.gitTreeState=clean"
  ldf="$ldf -X $p/pkg/lint/rules.k8sVersionMajor=$major -X $p/pkg/lint/rules.k8sVersionMinor=$minor"
  ldf="$ldf -X $p/pkg/chartutil.k8sVersionMajor=$major -X $p/pkg/chartutil.k8sVersionMinor=$minor"
  GOBIN="$OUT" go install -ldflags="$ldf" "$p/cmd/helm@$v"
}

# csi-test's mock driver, pinned by tools/mockdriver/go.mod (csi-test v3 is the last with it).
build_mock() {
  local m=github.com/kubernetes-csi/csi-test/v3 got
  got=$(cd "$here/mockdriver" && go list -m -f '{{.Version}}' "$m") || return 1
  if [ "$got" != "$CSI_MOCK_DRIVER_VERSION" ]; then
    echo "tools/mockdriver/go.mod has $m $got, versions.env says $CSI_MOCK_DRIVER_VERSION" >&2
    return 1
  fi
  (cd "$here/mockdriver" && go build -ldflags="-s -w" -o "$OUT/mock-driver" "$m/cmd/mock-driver")
}

# The CSI folder is named after every release it holds.
csi_dir="$cache/bin/csi-provisioner-$CSI_PROVISIONER_VERSION-attacher-$CSI_ATTACHER_VERSION"
csi_dir="$csi_dir-resizer-$CSI_RESIZER_VERSION-snapshotter-$CSI_SNAPSHOTTER_VERSION"

check_only=0 uncached=()
if [ "${1:-}" = --check ]; then check_only=1; shift; fi
targets=("$@")
[ ${#targets[@]} = 0 ] && targets=(k8s etcd kwok csi sanity helm)

# One build at a time: a second tools/build.sh (or anything that waits for the tools, such
# as flashmesh.lab.binaries) waits for the running one and then finds what it built. A
# caller that already holds the lock for this run (scripts/setup.sh's background build)
# says so with FLASHMESH_BUILD_LOCK_HELD=1.
if [ "$check_only" = 0 ] && [ "${FLASHMESH_BUILD_LOCK_HELD:-}" != 1 ]; then
  mkdir -p "$cache/bin"
  exec 9>>"$cache/bin/.build.lock"
  if ! flock -n 9; then
    say "waiting for the build already running (its log: $cache/bin/background-build.log)"
    flock 9
  fi
fi
for t in "${targets[@]}"; do
  case $t in
    k8s)  run_build kubernetes "$cache/bin/kubernetes-$KUBERNETES_VERSION" \
            kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_k8s ;;
    etcd) run_build etcd "$cache/bin/etcd-$ETCD_VERSION" etcd etcdctl -- build_etcd ;;
    kwok) run_build kwok "$cache/bin/kwok-$KWOK_VERSION" kwok -- build_kwok ;;
    csi)  run_build csi "$csi_dir" csi-provisioner csi-attacher csi-resizer csi-snapshotter \
            snapshot-controller -- build_csi ;;
    sanity) run_build csi-sanity "$cache/bin/csi-sanity-$CSI_SANITY_VERSION" csi-sanity \
            -- build_sanity ;;
    helm) run_build helm "$cache/bin/helm-$HELM_VERSION" helm -- build_helm ;;
    mock) run_build csi-mock-driver "$cache/bin/csi-mock-driver-$CSI_MOCK_DRIVER_VERSION" \
            mock-driver -- build_mock ;;
    *) echo "tools/build.sh: unknown target '$t' (use k8s, etcd, kwok, csi, sanity, helm or mock)" >&2
       exit 2 ;;
  esac
done
if [ "$check_only" = 1 ] && [ ${#uncached[@]} -gt 0 ]; then
  say "not built yet: ${uncached[*]}"; exit 1
fi

#!/usr/bin/env bash
# Builds the Kubernetes components the cluster tests run (kube-apiserver, controller-manager,
# scheduler, kubelet, kube-proxy, kubectl), etcd and CoreDNS from their Go modules at the
# versions pinned in go.mod / coredns/go.mod, plus the pause binary from Kubernetes' own
# source, into a versioned cache outside the repository:
#   ${MOAT_K8S_CACHE:-~/.cache/moat/k8s}/<version>/bin/
# A complete cache is reused as is (a second run takes well under a second); a partial one is
# finished. Prints the bin directory on stdout; progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/versions.sh
. "$here/versions.sh"
bin="$K8S_CACHE/$K8S_VERSION/bin"
log() { printf 'cluster build: %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go is not installed (needed only to build Kubernetes' components)"; exit 1; }
mkdir -p "$bin"
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
start=$(date +%s)

k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
missing=()
for c in "${k8s_cmds[@]}"; do [[ -x "$bin/$c" ]] || missing+=("k8s.io/kubernetes/cmd/$c"); done
if ((${#missing[@]})); then
    log "building ${missing[*]##*/} (Kubernetes $K8S_VERSION; about 10 minutes on 2 cores the first time)"
    v=k8s.io/component-base/version
    cv=k8s.io/client-go/pkg/version
    minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    ld="-s -w"
    for p in $v $cv; do
        ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$here" && go build -trimpath -ldflags "$ld" -o "$bin/" "${missing[@]}")
fi
if [[ ! -x "$bin/etcd" ]]; then
    log "building etcd $ETCD_VERSION"
    (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
fi
if [[ ! -x "$bin/coredns" ]]; then
    log "building CoreDNS $COREDNS_VERSION"
    (cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$bin/coredns" github.com/coredns/coredns)
fi
if [[ ! -x "$bin/pause" ]]; then
    # The sandbox image's one program, from the same Kubernetes release (build/pause/linux).
    src="$(cd "$here" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
    log "building pause from $src"
    gcc -Os -static -Wall -Werror -DVERSION="$K8S_VERSION" -o "$bin/pause.tmp" "$src"
    strip "$bin/pause.tmp" && mv "$bin/pause.tmp" "$bin/pause"
fi
log "binaries ready in $bin ($(( $(date +%s) - start )) s)"
echo "$bin"

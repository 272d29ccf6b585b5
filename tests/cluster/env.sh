# The cluster's layout, shared by up.sh and down.sh: one node on this machine, its state in
# one directory, its processes tracked by PID files. Override MOAT_CLUSTER_DIR to run a second
# cluster elsewhere (ports and interface names are fixed, so never two at once).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/versions.sh
. "$here/versions.sh"
CLUSTER_DIR="${MOAT_CLUSTER_DIR:-/var/lib/moat-cluster}"
RUN_DIR="$CLUSTER_DIR/run"
PKI="$CLUSTER_DIR/pki"
LOGS="$CLUSTER_DIR/logs"
K8S_BIN="$K8S_CACHE/$K8S_VERSION/bin"
NODE_NAME=moat-node
# The node's address, on the loopback interface (no dummy interfaces on every kernel), outside
# 10.0.0.0/8 (the mesh's default MOAT_MESH_NETWORKS), so traffic to the node (probes, the API
# server) is never meshed.
NODE_IP=192.168.240.1
POD_CIDR=10.244.0.0/24
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
BRIDGE=moat-cni0
CONTAINERD_SOCK="$RUN_DIR/containerd/containerd.sock"
log() { printf '%s cluster: %s\n' "$(date +%T)" "$*" >&2; }

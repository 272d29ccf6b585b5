# The pinned versions of the cluster the tests run (sourced by build.sh and up.sh). Keep them
# in step with go.mod (k8s.io/kubernetes, go.etcd.io/etcd/server/v3) and coredns/go.mod.
K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.4
COREDNS_VERSION=v1.12.4
K8S_CACHE="${MOAT_K8S_CACHE:-${HOME:-/root}/.cache/moat/k8s}"

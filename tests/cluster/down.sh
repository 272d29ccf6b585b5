#!/usr/bin/env bash
# Stops the cluster tests/cluster/up.sh started and removes everything it created: its
# containers, the processes it recorded by PID, their iptables chains, network interfaces and
# namespaces, cgroups, mounts and $MOAT_CLUSTER_DIR. Idempotent: safe to run at any time,
# also when up.sh failed halfway or nothing is running.
set -uo pipefail
# shellcheck source=tests/cluster/env.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
[[ $(id -u) -eq 0 ]] || { log "error: must run as root"; exit 1; }

pid_of() { [[ -f "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
# stop NAME: SIGTERM, then SIGKILL after 10 s, the process recorded by up.sh.
stop() {
    local pid
    pid=$(pid_of "$1") || return 0
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$RUN_DIR/$1.pid"
}

# The kubelet first, so nothing restarts containers; then every container, while containerd
# still answers; then the rest.
stop kubelet
if [[ -S "$CONTAINERD_SOCK" ]] && [[ -n "$(pid_of containerd)" ]]; then
    ctr() { command ctr -a "$CONTAINERD_SOCK" -n k8s.io "$@"; }
    tasks=$(ctr tasks ls -q 2>/dev/null)
    if [[ -n "$tasks" ]]; then
        log "killing $(wc -w <<<"$tasks") containers"
        for t in $tasks; do ctr tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1; done
        for t in $tasks; do
            for _ in $(seq 50); do ctr tasks delete "$t" >/dev/null 2>&1 && break; sleep 0.1; done
        done
    fi
fi
for c in coredns kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do
    stop "$c"
done
# Shims that outlived containerd (their containers are gone by now).
pkill -KILL -f -- "-address $CONTAINERD_SOCK" 2>/dev/null

# kube-proxy's rules (its own cleanup), then what kubelet and the CNI plugins left: chains
# named KUBE-* and CNI-* and every rule that jumps to them.
if [[ -x "$K8S_BIN/kube-proxy" ]]; then "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1; fi
for fam in iptables ip6tables; do
    command -v "$fam-save" >/dev/null || continue
    if "$fam-save" 2>/dev/null | grep -qE '(KUBE|CNI)-'; then
        log "removing KUBE-*/CNI-* chains ($fam)"
        "$fam-save" | python3 -c '
import re, sys
for line in sys.stdin:
    # drop declarations of our chains and any rule in or jumping to one
    if re.match(r"^:(KUBE|CNI)-", line) or re.search(r"(^-A |-[jg] )(KUBE|CNI)-", line):
        continue
    sys.stdout.write(line)' | "$fam-restore"
    fi
done

# Pod network namespaces the CNI plugin created, the bridge and the node address.
for ns in /run/netns/cni-*; do
    [[ -e "$ns" ]] || continue
    umount "$ns" 2>/dev/null; rm -f "$ns"
done
ip link del "$BRIDGE" 2>/dev/null
ip addr del "$NODE_IP/32" dev lo 2>/dev/null

# Mounts under the cluster directory (volumes, container root filesystems), deepest first.
if [[ -d "$CLUSTER_DIR" ]]; then
    awk -v d="$CLUSTER_DIR" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
fi
# The kubelet's cgroups (kubepods), deepest first.
for hierarchy in /sys/fs/cgroup/*/; do
    [[ -d "$hierarchy/kubepods" ]] || continue
    find "$hierarchy/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done
# The kubelet's links to container logs (it always writes them to /var/log/containers).
find /var/log/containers -maxdepth 1 -type l -lname "$CLUSTER_DIR/*" -delete 2>/dev/null
rm -rf "$CLUSTER_DIR"
log "cluster removed"

#!/usr/bin/env bash
# Starts a one-node Kubernetes cluster on this machine for Moat's cluster tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, containerd + runc with the CNI
# bridge plugin, kubelet, kube-proxy (iptables mode) and CoreDNS (cluster.local), all built
# from their Go modules by build.sh, and imports locally built images (oci.py): the pause
# image, the test app `localhost/moat-e2e-app:latest` and Moat's three images.
#
# Run as root. Waits until the cluster is usable, then prints exactly two lines on stdout:
#   KUBECONFIG=<path>
#   KUBECTL=<path of kubectl of the same release>
# Everything else goes to stderr; component logs are under $MOAT_CLUSTER_DIR/logs. Idempotent:
# a running cluster is checked and reused. tests/cluster/down.sh stops and removes it all.
# MOAT_BIN_DIR: where Moat's release binaries are (default: target/release of this repo).
set -euo pipefail
# shellcheck source=tests/cluster/env.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
repo="$(cd "$here/../.." && pwd)"
MOAT_BIN_DIR="${MOAT_BIN_DIR:-$repo/target/release}"
started=$(date +%s)

die() { log "error: $*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (it starts a kubelet, containerd and iptables rules)"
for tool in containerd containerd-shim-runc-v2 runc ctr iptables ip openssl conntrack curl python3; do
    command -v "$tool" >/dev/null || die "missing tool '$tool' (run tests/setup.sh)"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
    die "missing CNI plugins in /usr/lib/cni (run tests/setup.sh: containernetworking-plugins)"
for b in moat-ca moat-injector moat-proxy moat-destination; do
    [[ -x "$MOAT_BIN_DIR/$b" ]] || die "missing $MOAT_BIN_DIR/$b (build it: cargo build --release)"
done
"$here/build.sh" >/dev/null

mkdir -p "$RUN_DIR" "$PKI" "$LOGS" "$CLUSTER_DIR/etc"
KUBECONFIG_ADMIN="$PKI/admin.kubeconfig"
kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# --- processes ---------------------------------------------------------------------------
running() { [[ -f "$RUN_DIR/$1.pid" ]] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }
# Writes stdin to FILE only when it differs: kube-proxy exits when its config file is rewritten
# (even unchanged), which would break a running cluster on a second up.sh.
write_if_changed() {
    local tmp="$1.new"
    cat > "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}
# start NAME COMMAND...: runs COMMAND in the background (its own session, so a test's Ctrl-C
# does not reach it), logs to $LOGS/NAME.log, records its PID for down.sh.
start() {
    local name=$1; shift
    if running "$name"; then return; fi
    log "starting $name"
    setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/$name.pid"
}
# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds; on timeout, shows the
# last lines of the logs and fails.
wait_for() {
    local what=$1 secs=$2; shift 2
    local deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) > deadline )); then
            log "timed out after ${secs}s waiting for $what; last log lines:"
            for f in "$LOGS"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
            exit 1
        fi
        sleep 0.5
    done
}

# --- node network --------------------------------------------------------------------------
ip addr replace "$NODE_IP/32" dev lo
# Pod-to-Service traffic that kube-proxy sends back to a pod on the same bridge must pass
# iptables (br_netfilter), and the node forwards pod traffic.
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 ||
    die "net.bridge.bridge-nf-call-iptables is unavailable (the kernel lacks br_netfilter)"

# --- PKI -------------------------------------------------------------------------------------
# One cluster CA signs every component's certificate; each component gets its own identity so
# Node authorization and RBAC apply as on a real cluster.
if [[ ! -f "$PKI/ca.crt" ]]; then
    log "writing the cluster PKI"
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=moat-cluster-ca" -days 30 \
        -out "$PKI/ca.crt" 2>/dev/null
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
fi
# cert NAME SUBJECT [SANS] [USAGE]: a key and certificate signed by the cluster CA.
cert() {
    local name=$1 subj=$2 sans=${3:-} usage=${4:-clientAuth}
    [[ -f "$PKI/$name.crt" ]] && return
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
    openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$usage"
        [[ -n "$sans" ]] && echo "subjectAltName=$sans"
    } > "$PKI/$name.ext"
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -days 30 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
    rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
# kubeconfig NAME: a kubeconfig for the API server authenticating with NAME's certificate.
kubeconfig() {
    local name=$1
    write_if_changed "$PKI/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: moat
    cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$PKI/ca.crt"}
users:
  - name: $name
    user: {client-certificate: "$PKI/$name.crt", client-key: "$PKI/$name.key"}
contexts:
  - name: moat
    context: {cluster: moat, user: $name}
current-context: moat
EOF
}
cert apiserver "/CN=kube-apiserver" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$API_SERVICE_IP,IP:$NODE_IP,IP:127.0.0.1" \
    serverAuth
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert kubelet-serving "/CN=$NODE_NAME" "DNS:$NODE_NAME,IP:$NODE_IP" serverAuth
for c in "admin:/O=system:masters/CN=moat-cluster-admin" \
         "controller-manager:/CN=system:kube-controller-manager" \
         "scheduler:/CN=system:kube-scheduler" \
         "kubelet:/O=system:nodes/CN=system:node:$NODE_NAME" \
         "kube-proxy:/CN=system:kube-proxy" \
         "coredns:/CN=moat-cluster:coredns"; do
    cert "${c%%:*}" "${c#*:}"
    kubeconfig "${c%%:*}"
done

# --- control plane ---------------------------------------------------------------------------
start etcd "$K8S_BIN/etcd" --name "$NODE_NAME" --data-dir "$CLUSTER_DIR/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:2380" --unsafe-no-fsync \
    --log-level warn
wait_for etcd 60 curl -fsS http://127.0.0.1:2379/health
start kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$NODE_IP" --secure-port 6443 \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true --profiling=false --v=1
wait_for "the API server" 120 kubectl get --raw /readyz
start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$PKI/controller-manager.kubeconfig" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1 \
    --cluster-cidr "$CLUSTER_CIDR" --service-cluster-ip-range "$SERVICE_CIDR" \
    --profiling=false --v=1
start kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig "$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig "$PKI/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --profiling=false --v=1

# --- node: containerd, CNI, kubelet, kube-proxy ------------------------------------------------
mkdir -p "$CLUSTER_DIR/cni/net.d" "$RUN_DIR/containerd"
write_if_changed "$CLUSTER_DIR/cni/net.d/10-moat-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "moat-pods",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$CLUSTER_DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
write_if_changed "$CLUSTER_DIR/etc/containerd.toml" <<EOF
version = 2
root = "$CLUSTER_DIR/containerd"
state = "$RUN_DIR/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  # Images are imported, never pulled (there is no registry): the sandbox image is local.
  sandbox_image = "localhost/pause:3.10"
  # Without CAP_SYS_RESOURCE (these machines) no process may lower its OOM score below ours:
  # clamp the kubelet's adjustments (-998 for sandboxes) instead of failing every container.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CLUSTER_DIR/cni/net.d"
EOF
start containerd containerd --config "$CLUSTER_DIR/etc/containerd.toml"
ctr() { command ctr -a "$CONTAINERD_SOCK" -n k8s.io "$@"; }
wait_for containerd 60 ctr version

# Images: assembled from local binaries (oci.py) and imported, again when they changed.
images_dir="$CLUSTER_DIR/images"
mkdir -p "$images_dir"
log "building images from $MOAT_BIN_DIR"
python3 "$here/oci.py" --out "$images_dir" --bin-dir "$MOAT_BIN_DIR" --k8s-bin "$K8S_BIN" >/dev/null
for archive in "$images_dir"/*.tar; do
    sum=$(sha256sum "$archive" | cut -d' ' -f1)
    if [[ "$(cat "$archive.imported" 2>/dev/null)" != "$sum" ]]; then
        ctr images import "$archive" >/dev/null
        echo "$sum" > "$archive.imported"
    fi
done

write_if_changed "$CLUSTER_DIR/etc/resolv.conf" <<EOF
nameserver $NODE_IP
EOF
write_if_changed "$CLUSTER_DIR/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
containerRuntimeEndpoint: "unix://$CONTAINERD_SOCK"
cgroupDriver: cgroupfs
# These machines mount cgroup v1; Kubernetes $K8S_VERSION still runs on it when told to.
failCgroupV1: false
clusterDomain: cluster.local
clusterDNS: ["$DNS_SERVICE_IP"]
resolvConf: "$CLUSTER_DIR/etc/resolv.conf"
podCIDR: "$POD_CIDR"
failSwapOn: false
serializeImagePulls: false
# A test node shares its disk with everything else: evict only when it is really full, and
# never garbage-collect the imported images (they cannot be pulled again).
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
staticPodPath: ""
# Mounted ConfigMaps (a namespace's moat-policy) reach pods within seconds, not a minute.
syncFrequency: 10s
podLogsDir: "$CLUSTER_DIR/pod-logs"
EOF
start kubelet "$K8S_BIN/kubelet" --config "$CLUSTER_DIR/etc/kubelet.yaml" \
    --kubeconfig "$PKI/kubelet.kubeconfig" --root-dir "$CLUSTER_DIR/kubelet" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
write_if_changed "$CLUSTER_DIR/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: "$CLUSTER_CIDR"
hostnameOverride: "$NODE_NAME"
clientConnection: {kubeconfig: "$PKI/kube-proxy.kubeconfig"}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Leave the machine's conntrack table size alone.
conntrack: {maxPerCore: 0}
EOF
start kube-proxy "$K8S_BIN/kube-proxy" --config "$CLUSTER_DIR/etc/kube-proxy.yaml" --v=1
wait_for "node $NODE_NAME to be Ready" 120 \
    kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s

# --- cluster DNS ---------------------------------------------------------------------------------
# CoreDNS runs on the node (it needs no image), behind the usual kube-dns Service: a Service
# without selector whose EndpointSlice names the node address.
kubectl apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "moat-cluster:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "moat-cluster:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "moat-cluster:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "moat-cluster:coredns"}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_SERVICE_IP
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
endpoints: [{addresses: ["$NODE_IP"], conditions: {ready: true}}]
ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
write_if_changed "$CLUSTER_DIR/etc/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:18080
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $PKI/coredns.kubeconfig moat
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
start coredns "$K8S_BIN/coredns" -conf "$CLUSTER_DIR/etc/Corefile"
wait_for "CoreDNS" 60 python3 - "$NODE_IP" <<'EOF'
import socket, struct, sys
# A real DNS query for kubernetes.default.svc.cluster.local (A); succeeds on an answer.
q = struct.pack(">HHHHHH", 0x4d4f, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in "kubernetes.default.svc.cluster.local".split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.sendto(q, (sys.argv[1], 53))
r = s.recv(512)
sys.exit(0 if struct.unpack(">H", r[6:8])[0] >= 1 else 1)
EOF
wait_for "the default ServiceAccount" 60 kubectl -n default get serviceaccount default

log "cluster $K8S_VERSION is up ($(( $(date +%s) - started )) s); logs in $LOGS"
echo "KUBECONFIG=$KUBECONFIG_ADMIN"
echo "KUBECTL=$K8S_BIN/kubectl"

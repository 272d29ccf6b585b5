#!/usr/bin/env bash
# Installs what Moat's tests use, when it is missing: Debian packages (network tools for the
# namespace lab, real third-party peers and load generators) and Python tools in .venv/
# (validators, and matplotlib for benches/plot.py).
# Idempotent; prints what it installs. Run as root (CI and these machines are root).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iptables tcpdump curl openssl util-linux procps psmisc
              haproxy nginx-light libnginx-mod-stream iperf3 wrk nghttp2-client hey
              containerd runc containernetworking-plugins conntrack busybox-static)
declare -A PROVIDES=([iproute2]=ip [iptables]=iptables-restore [tcpdump]=tcpdump [curl]=curl
  [openssl]=openssl [util-linux]=setpriv [procps]=ps [psmisc]=killall [haproxy]=haproxy
  [nginx-light]=nginx [iperf3]=iperf3 [wrk]=wrk [nghttp2-client]=h2load [hey]=hey
  [containerd]=containerd [runc]=runc [containernetworking-plugins]=/usr/lib/cni/bridge
  [conntrack]=conntrack [busybox-static]=/bin/busybox)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  tool=${PROVIDES[$p]:-}
  if [[ -n "$tool" ]] && command -v "$tool" >/dev/null 2>&1; then continue; fi
  if [[ "$p" == libnginx-mod-stream ]]; then
    [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] && continue
  fi
  missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY_TOOLS=(jsonpatch==1.33 kubernetes-validate==1.37.0 yamllint==1.38.0 checkov==3.3.30 matplotlib==3.11.2)
if [[ ! -x .venv/bin/checkov || ! -x .venv/bin/kubernetes-validate || ! -x .venv/bin/jsonpatch || ! -x .venv/bin/yamllint ]] ||
   ! .venv/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  echo "setup: installing Python tools into .venv/: ${PY_TOOLS[*]}"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "${PY_TOOLS[@]}"
fi
# rustfmt and clippy, when the toolchain came without them (tests/run.sh skips loudly otherwise).
for component in rustfmt:fmt clippy:clippy; do
  if ! cargo "${component#*:}" --version >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
    echo "setup: installing the Rust component ${component%%:*}"
    rustup component add "${component%%:*}" >/dev/null 2>&1 || echo "setup: warning: could not install ${component%%:*}" >&2
  fi
done

# cargo-fuzz for the fuzz smoke run (fuzz/run.sh); built once into ~/.cargo/bin.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz 0.13.2"
  cargo install -q cargo-fuzz --version 0.13.2 --locked
fi

# Kubernetes for the cluster suite (tests/cluster/): built from its Go modules once, then
# cached outside the repository. Only root can run the cluster, so only root builds it.
if [[ $(id -u) -eq 0 ]]; then
  k8s_start=$(date +%s)
  tests/cluster/build.sh >/dev/null
  echo "setup: Kubernetes binaries ready in $(( $(date +%s) - k8s_start ))s (measured: 440 s on a fresh 2-core machine, under a second cached)"
else
  echo "setup: not root: Kubernetes binaries not built (the cluster suite needs root)" >&2
fi
command -v kubectl >/dev/null 2>&1 || echo "setup: warning: kubectl not found; deploy/ rendering will fail (install kubectl >= 1.27)" >&2
echo "setup: ok"

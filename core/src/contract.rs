//! The contract between the injector, `moat-proxy init` and the sidecar: the ports, the proxy's
//! uid/gid and the paths and environment variables the injector wires into every pod. Defined
//! once here so the three can never disagree (docs/interfaces.md is the prose version).

/// Transparent outbound listener (the app's captured connections).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound listener (captured connections into the pod, and peer sidecars).
pub const INBOUND_PORT: u16 = 15006;
/// Admin listener: metrics, health, rewritten app probes. Never redirected.
pub const ADMIN_PORT: u16 = 15020;
/// Every port the proxy itself listens on: never a destination a peer may open.
pub const PROXY_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT];

/// The sidecar container's name: how the injector, the lab and discovery recognise a meshed pod.
pub const PROXY_CONTAINER: &str = "moat-proxy";

/// The proxy's uid: its own traffic is exempt from redirection, so no app may run as it.
pub const PROXY_UID: u32 = 7777;
/// The proxy's gid: exempt from redirection like the uid, so no app may run with it.
pub const PROXY_GID: u32 = 7777;

/// Where the pod's shared in-memory `moat-run` volume is mounted in the sidecar and (read-only)
/// in the app containers.
pub const RUN_DIR: &str = "/run/moat";
/// The sidecar's local control socket inside [`RUN_DIR`]: state-changing admin actions
/// (`POST /shutdown`) are served only here, never on a TCP port a peer could reach.
pub const ADMIN_SOCKET: &str = "/run/moat/admin.sock";

/// Environment variable naming the admin socket path (set by the injector).
pub const ENV_ADMIN_SOCKET: &str = "MOAT_ADMIN_SOCKET";
/// Environment variable with the node's IP (downward API `status.hostIP`): the kubelet's
/// probes come from the node.
pub const ENV_HOST_IP: &str = "MOAT_HOST_IP";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_lives_in_the_shared_volume() {
        assert!(ADMIN_SOCKET.starts_with(RUN_DIR));
        assert!(!PROXY_PORTS.contains(&0));
    }
}

//! Network-namespace "pods" on one machine (root only): a node namespace holding a bridge,
//! pod namespaces attached to it by veth pairs, no route out of the lab, and everything torn
//! down on drop — even when a test fails.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use anyhow::{bail, Context};

/// Whether this process may build namespaces; `Err` carries the reason to print when not.
pub fn check_privileges() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces, veth, iptables)".into());
    }
    for tool in ["ip", "iptables", "iptables-save", "iptables-restore"] {
        if crate::tools::find_tool(tool).is_none() {
            return Err(format!(
                "needs `{tool}` (apt-get install iproute2 iptables)"
            ));
        }
    }
    Ok(())
}

/// Skips the calling test loudly when namespaces cannot be built here. CI runs as root with
/// the tools installed, so nothing is skipped there (and `MOAT_REQUIRE_ROOT_TESTS=1` turns the
/// skip into a failure).
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Err(why) = $crate::netns::check_privileges() {
            if std::env::var_os("MOAT_REQUIRE_ROOT_TESTS").is_some() {
                panic!("MOAT_REQUIRE_ROOT_TESTS is set but this test cannot run: {why}");
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

fn ip<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new("ip")
        .args(&args)
        .output()
        .context("cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "ip {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// One network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
    /// Its address on the lab bridge (pods only).
    pub ip: Option<Ipv4Addr>,
}

impl Netns {
    /// A command that runs inside this namespace.
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a command inside the namespace and returns its output (failing on a non-zero exit).
    pub fn run<I, S>(&self, program: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} in {} failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Runs `f` on a fresh thread that has entered this namespace: sockets it creates live in
    /// the namespace. Use it for in-process apps and for reaching admin ports.
    pub fn enter<T, F>(&self, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            f()
        })
    }

    /// Like [`Netns::enter`], waiting for the result.
    pub fn within<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        self.enter(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// The namespace's network device: the pod end of its veth (the first link that is not
    /// `lo`; for the node namespace, `br0`).
    pub fn device(&self) -> anyhow::Result<String> {
        let out = ip(["-n", &self.name, "-o", "link", "show"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| !n.is_empty() && n != "lo")
            .collect();
        if names.iter().any(|n| n == "br0") {
            return Ok("br0".into());
        }
        names
            .into_iter()
            .next()
            .with_context(|| format!("{} has no network device besides lo", self.name))
    }

    /// The kernel's IPv6 link-local address of the namespace's device, as a socket address
    /// scoped to that device (what a neighbour on the same bridge dials), waiting up to 5 s
    /// for duplicate address detection to finish.
    pub fn link_local(&self, port: u16) -> anyhow::Result<std::net::SocketAddrV6> {
        let dev = self.device()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let out = ip([
                "-n", &self.name, "-6", "-o", "addr", "show", "dev", &dev, "scope", "link",
            ])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // `4: eth0    inet6 fe80::.../64 scope link ...`; `tentative` until DAD is done.
            let found = text
                .lines()
                .find(|l| !l.contains("tentative"))
                .and_then(|l| {
                    let index: u32 = l.split(':').next()?.trim().parse().ok()?;
                    let addr = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                    let ip: std::net::Ipv6Addr = addr.split('/').next()?.parse().ok()?;
                    Some(std::net::SocketAddrV6::new(ip, port, 0, index))
                });
            match found {
                Some(a) => return Ok(a),
                None if std::time::Instant::now() >= deadline => {
                    bail!(
                        "{} has no IPv6 link-local address on {dev}: {text}",
                        self.name
                    )
                }
                None => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    /// The IPv4 addresses on the namespace's device, primary first.
    pub fn addresses(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        let dev = self.device()?;
        let out = ip(["-n", &self.name, "-o", "-4", "addr", "show", "dev", &dev])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect())
    }

    /// Adds `addr/prefix_len` to the namespace's device (a second address in the same subnet
    /// becomes a secondary address; the namespace then answers ARP for it).
    pub fn add_address(&self, addr: Ipv4Addr, prefix_len: u8) -> anyhow::Result<()> {
        let dev = self.device()?;
        ip([
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/{prefix_len}"),
            "dev",
            &dev,
        ])?;
        Ok(())
    }

    /// Removes `addr/prefix_len` from the namespace's device. Removing the primary address
    /// also removes the routes through it; see [`Netns::readdress`].
    pub fn remove_address(&self, addr: Ipv4Addr, prefix_len: u8) -> anyhow::Result<()> {
        let dev = self.device()?;
        ip([
            "-n",
            &self.name,
            "addr",
            "del",
            &format!("{addr}/{prefix_len}"),
            "dev",
            &dev,
        ])?;
        Ok(())
    }

    /// Moves the namespace from address `old` to `new` (both `/prefix_len`) and restores its
    /// default route via `gateway`, which went away with the old address.
    pub fn readdress(
        &self,
        old: Ipv4Addr,
        new: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
    ) -> anyhow::Result<()> {
        self.remove_address(old, prefix_len)?;
        self.add_address(new, prefix_len)?;
        ip([
            "-n",
            &self.name,
            "route",
            "replace",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        Ok(())
    }

    /// Forgets every learned link-layer address (what a spoofed gratuitous ARP achieves: the
    /// next packet to an address asks again who has it).
    pub fn flush_neighbours(&self) -> anyhow::Result<()> {
        ip(["-n", &self.name, "neigh", "flush", "all"])?;
        Ok(())
    }
}

/// Names of the network namespaces under /var/run/netns (`ip netns list`).
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = ip(["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// A lab: a node namespace with a bridge, pods attached to it, removed on drop.
pub struct Lab {
    prefix: String,
    /// The node namespace (bridge, and the address `gateway`).
    pub node: Netns,
    /// Pod namespaces in creation order.
    pub pods: Vec<Netns>,
    subnet: [u8; 3],
    next_host: u8,
}

impl Lab {
    /// Creates the node namespace with bridge `br0` at `<subnet>.1/24`. `tag` keeps
    /// concurrent labs apart (it is combined with the process id).
    pub fn new(tag: &str, subnet: [u8; 3]) -> anyhow::Result<Self> {
        let prefix = format!("moat{}{}", tag, std::process::id() % 100_000);
        let node = Netns {
            name: format!("{prefix}-node"),
            ip: Some(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1)),
        };
        let lab = Self {
            prefix,
            node,
            pods: Vec::new(),
            subnet,
            next_host: 2,
        };
        ip(["netns", "add", &lab.node.name])?;
        let n = &lab.node.name;
        ip(["-n", n, "link", "set", "lo", "up"])?;
        ip(["-n", n, "link", "add", "br0", "type", "bridge"])?;
        ip([
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/24", lab.gateway()),
            "dev",
            "br0",
        ])?;
        ip(["-n", n, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// The prefix of every namespace name of this lab (`<prefix>-node`, `<prefix>-<pod>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// The lab's pod network, e.g. `10.77.0.0/24`.
    pub fn cidr(&self) -> String {
        format!(
            "{}.{}.{}.0/24",
            self.subnet[0], self.subnet[1], self.subnet[2]
        )
    }

    /// Adds a pod namespace with the next free address. Its only route is the lab subnet.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Netns> {
        let host = self.next_host;
        self.next_host = self.next_host.checked_add(1).context("lab is full")?;
        let addr = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host);
        let pod = Netns {
            name: format!("{}-{name}", self.prefix),
            ip: Some(addr),
        };
        ip(["netns", "add", &pod.name])?;
        self.pods.push(pod.clone());
        let (inside, outside) = (
            format!("eth{host}"),
            format!("v{}{host}", &self.prefix[4..]),
        );
        let outside: String = outside.chars().take(15).collect();
        ip(["-n", &pod.name, "link", "set", "lo", "up"])?;
        ip([
            "-n",
            &pod.name,
            "link",
            "add",
            &inside,
            "type",
            "veth",
            "peer",
            "name",
            &outside,
            "netns",
            &self.node.name,
        ])?;
        ip([
            "-n",
            &pod.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inside,
        ])?;
        ip(["-n", &pod.name, "link", "set", &inside, "up"])?;
        ip([
            "-n",
            &self.node.name,
            "link",
            "set",
            &outside,
            "master",
            "br0",
        ])?;
        ip(["-n", &self.node.name, "link", "set", &outside, "up"])?;
        // The default route points at the node, which has no way out: traffic to anywhere
        // else dies there instead of failing before the pod's own rules see it.
        ip([
            "-n",
            &pod.name,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        Ok(pod)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth ends and iptables rules with it.
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            let _ = Command::new("ip")
                .args(["netns", "pids", &ns.name])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<u32>() {
                            let _ = crate::proc::kill_pid(pid, crate::proc::SIGKILL);
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        }
    }
}

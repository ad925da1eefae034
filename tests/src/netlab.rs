//! Real network partitions: nodes in network namespaces of their own, joined by veth
//! pairs to a bridge (itself in a namespace), with nftables rules that drop packets
//! silently — a cut link as a dead switch or a Wi-Fi drop makes it, not a proxy closing
//! sockets. TCP connections across a cut stay half-open until a keepalive notices.
//!
//! Addresses: `10.77.<n>.0/24`, with `<n>` picked so that no interface on this machine
//! has it yet. The test process reaches the nodes (as their sensors and an operator
//! would) through one veth pair from its own namespace to the bridge, at `.1`; that link
//! is never cut. Nothing is routed anywhere else.
//!
//! Names carry the test process's pid (`flab-<pid>-<node>`, host side `flab<pid>`), so
//! the leftovers of a lab whose process died are recognised and removed by the next one.
//! [`NetLab`]'s drop removes every namespace and link it made; processes started with
//! [`LabProc`] are killed by pid when dropped.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{http_get, run_bounded};

const NFT_TABLE: &str = "fogline_lab";

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let (bin, rest) = args.split_first().context("empty command")?;
    let out = run_bounded(Command::new(bin).args(rest), Duration::from_secs(20))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), out.stderr.trim());
    }
    Ok(out.stdout)
}

/// Whether namespaces, veths, bridges and nftables can be used here.
pub fn netlab_available() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("not root");
    }
    for tool in ["ip", "nft", "nsenter"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` is not installed (iproute2, nftables, util-linux)");
        }
    }
    Ok(())
}

/// One node of a [`NetLab`].
#[derive(Debug, Clone)]
pub struct NetNode {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl NetNode {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Namespaces joined by a bridge, with silent-drop partitions between them.
pub struct NetLab {
    tag: String,
    bridge_ns: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    nodes: Vec<NetNode>,
    /// Pairs of node indexes whose packets are dropped.
    blocked: Mutex<BTreeSet<(usize, usize)>>,
}

/// Removes namespaces and host links left by labs whose process is gone.
fn remove_stale() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("flab-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
            let _ = sh(&["ip", "link", "del", &format!("flab{pid}")]);
        }
    }
}

impl NetLab {
    /// Makes a namespace per name, all on one bridge, no partition yet.
    pub fn create(names: &[&str]) -> anyhow::Result<NetLab> {
        netlab_available()?;
        remove_stale();
        let pid = std::process::id();
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // One lab at a time per process is the rule; the sequence keeps names unique
        // even if a previous lab of this process is still being torn down.
        let tag = format!("{pid}-{seq}");
        let used = sh(&["ip", "-4", "-o", "addr", "show"]).unwrap_or_default();
        let subnet = (0u32..200)
            .map(|i| 20 + (pid + seq + i) % 200)
            .find(|n| !used.contains(&format!("10.77.{n}.")))
            .context("no free 10.77.x.0/24 subnet")?;
        let subnet = u8::try_from(subnet).context("subnet")?;
        let host_if = format!("flab{pid}");
        let host_if = if seq == 0 {
            host_if
        } else {
            format!("flab{pid}x{seq}")
        };
        anyhow::ensure!(host_if.len() <= 15, "interface name {host_if} too long");
        let mut lab = NetLab {
            bridge_ns: format!("flab-{tag}-br"),
            host_if,
            host_ip: Ipv4Addr::new(10, 77, subnet, 1),
            nodes: Vec::new(),
            blocked: Mutex::new(BTreeSet::new()),
            tag,
        };
        // From here on, drop cleans up whatever was made.
        lab.build(names, subnet)?;
        Ok(lab)
    }

    fn build(&mut self, names: &[&str], subnet: u8) -> anyhow::Result<()> {
        let br = self.bridge_ns.clone();
        sh(&["ip", "netns", "add", &br])?;
        sh(&["ip", "-n", &br, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &br, "link", "set", "br0", "up"])?;
        // The test process's own link into the lab.
        sh(&[
            "ip",
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "vhost",
            "netns",
            &br,
        ])?;
        sh(&[
            "ip", "-n", &br, "link", "set", "vhost", "master", "br0", "up",
        ])?;
        let host_cidr = format!("{}/24", self.host_ip);
        sh(&["ip", "addr", "add", &host_cidr, "dev", &self.host_if])?;
        sh(&["ip", "link", "set", &self.host_if, "up"])?;
        let ruleset = self.ruleset_file()?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("flab-{}-{name}", self.tag);
            let ip = Ipv4Addr::new(10, 77, subnet, 10 + u8::try_from(i).context("too many")?);
            sh(&["ip", "netns", "add", &ns])?;
            self.nodes.push(NetNode {
                name: (*name).to_owned(),
                ns: ns.clone(),
                ip,
            });
            let port = format!("v{i}");
            sh(&[
                "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &br,
            ])?;
            sh(&["ip", "-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            let file = ruleset.to_string_lossy().into_owned();
            sh(&["ip", "netns", "exec", &ns, "nft", "-f", &file])?;
        }
        let _ = std::fs::remove_file(&ruleset);
        // Every node answers the host before anything starts.
        for node in self.nodes.iter().filter(|_| which("ping")) {
            let ok = (0..50).any(|_| {
                let ping = sh(&["ping", "-c", "1", "-W", "1", &node.ip.to_string()]).is_ok();
                if !ping {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ping
            });
            if !ok {
                bail!(
                    "{} ({}) does not answer pings from the host",
                    node.name,
                    node.ip
                );
            }
        }
        Ok(())
    }

    fn ruleset_file(&self) -> anyhow::Result<PathBuf> {
        let path = std::env::temp_dir().join(format!("flab-{}.nft", self.tag));
        let ruleset = format!(
            "table inet {NFT_TABLE} {{\n\
             \tset blocked {{ type ipv4_addr; }}\n\
             \tchain input {{ type filter hook input priority 0; policy accept; ip saddr @blocked drop; }}\n\
             \tchain output {{ type filter hook output priority 0; policy accept; ip daddr @blocked drop; }}\n\
             }}\n"
        );
        std::fs::write(&path, ruleset)?;
        Ok(path)
    }

    pub fn nodes(&self) -> &[NetNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NetNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in the lab"))
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name} in the lab"))
    }

    /// Writes every node's set of dropped peers from `blocked`.
    fn apply(&self, blocked: &BTreeSet<(usize, usize)>) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let peers: Vec<String> = blocked
                .iter()
                .filter_map(|&(a, b)| {
                    let other = if a == i {
                        b
                    } else if b == i {
                        a
                    } else {
                        return None;
                    };
                    Some(self.nodes[other].ip.to_string())
                })
                .collect();
            let mut script = format!("flush set inet {NFT_TABLE} blocked\n");
            if !peers.is_empty() {
                script.push_str(&format!(
                    "add element inet {NFT_TABLE} blocked {{ {} }}\n",
                    peers.join(", ")
                ));
            }
            let path = std::env::temp_dir().join(format!("flab-{}-{i}.nft", self.tag));
            std::fs::write(&path, script)?;
            let file = path.to_string_lossy().into_owned();
            let result = sh(&["ip", "netns", "exec", &node.ns, "nft", "-f", &file]);
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Ok(())
    }

    fn edit(&self, f: impl FnOnce(&mut BTreeSet<(usize, usize)>)) -> anyhow::Result<()> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut blocked);
        self.apply(&blocked)
    }

    /// Drops every packet between `a` and `b`, both ways, from now on.
    pub fn cut(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        self.edit(|s| {
            s.insert((a.min(b), a.max(b)));
        })
    }

    /// Lets packets between `a` and `b` through again.
    pub fn heal(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        self.edit(|s| {
            s.remove(&(a.min(b), a.max(b)));
        })
    }

    /// Cuts `node` off from every other node (not from the host).
    pub fn isolate(&self, node: &str) -> anyhow::Result<()> {
        let i = self.index(node)?;
        let n = self.nodes.len();
        self.edit(|s| {
            for j in (0..n).filter(|&j| j != i) {
                s.insert((i.min(j), i.max(j)));
            }
        })
    }

    /// Splits the nodes into groups that cannot reach each other; names not listed
    /// keep their links.
    pub fn split(&self, groups: &[&[&str]]) -> anyhow::Result<()> {
        let mut idx: Vec<Vec<usize>> = Vec::new();
        for g in groups {
            idx.push(
                g.iter()
                    .map(|n| self.index(n))
                    .collect::<anyhow::Result<_>>()?,
            );
        }
        self.edit(|s| {
            for (gi, g) in idx.iter().enumerate() {
                for h in idx.iter().skip(gi + 1) {
                    for &a in g {
                        for &b in h {
                            s.insert((a.min(b), a.max(b)));
                        }
                    }
                }
            }
        })
    }

    /// No partition any more.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        self.edit(BTreeSet::clear)
    }

    /// Removes every namespace and link of the lab.
    fn teardown(&mut self) {
        for node in &self.nodes {
            let _ = sh(&["ip", "netns", "del", &node.ns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.bridge_ns]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        self.nodes.clear();
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A fogline process (agent or gateway) with its own log, optionally inside a network
/// namespace (`nsenter --net`, which leaves the mount namespace alone: its data dir may
/// be a power-cut mount). Dropping it kills the process by pid.
pub struct LabProc {
    pub name: String,
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    netns: Option<String>,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl LabProc {
    pub fn new(
        name: &str,
        bin: &Path,
        args: Vec<OsString>,
        env: Vec<(String, String)>,
        netns: Option<&str>,
        log_path: PathBuf,
    ) -> LabProc {
        LabProc {
            name: name.to_owned(),
            bin: bin.to_path_buf(),
            args,
            env,
            netns: netns.map(str::to_owned),
            log_path,
            child: None,
            starts: 0,
        }
    }

    /// Starts the process (it must not be running).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("{} already runs", self.name);
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(log, "===== fogline-tests: start #{} =====", self.starts)?;
        let err = log.try_clone()?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(&self.args);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("FOGLINE_") {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?,
        );
        Ok(())
    }

    /// Waits until `GET /healthz` on `http` answers 200; fails early if the process exits.
    pub fn wait_ready(&mut self, http: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut() {
                Some(child) => {
                    if let Some(status) = child.try_wait()? {
                        self.child = None;
                        bail!(
                            "{} exited with {status} before it was ready; log tail:\n{}",
                            self.name,
                            self.log_tail(30)
                        );
                    }
                }
                None => bail!("{} is not running", self.name),
            }
            if let Ok((200, _)) = http_get(http, "/healthz") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("reaping")?;
        }
        Ok(())
    }

    /// SIGTERM, and SIGKILL after `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = run_bounded(
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string()),
            Duration::from_secs(5),
        );
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "{} exited with {status}; log tail:\n{}",
                        self.name,
                        self.log_tail(30)
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::tail(&self.log_path, lines)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for LabProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} log tail ({}) -----\n{}\n-----",
                self.name,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

//! Debian's Mosquitto: the `mosquitto-clients` tools (`mosquitto_pub`, `mosquitto_sub`), as
//! an operator would use them against the agent's broker, and [`Broker`], a `mosquitto`
//! process with its own config file and persistence directory (the setup fogline is
//! compared with: an edge broker bridged to an upstream one).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{local, run_bounded};

/// Where Debian installs the broker.
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Installs Debian's `mosquitto` and `mosquitto-clients` with apt when the broker or the
/// clients are missing (non-interactive; does nothing when both are there).
pub fn ensure_installed() -> anyhow::Result<()> {
    if Path::new(MOSQUITTO).is_file() && require_clients().is_ok() {
        return Ok(());
    }
    let root = crate::is_root();
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("running {cmd:?}");
        let out = run_bounded(&mut cmd, Duration::from_secs(600))?;
        if !out.status.success() {
            bail!("{cmd:?} failed ({}): {}", out.status, out.stderr.trim());
        }
        Ok(())
    };
    apt(&["update"])?;
    apt(&[
        "install",
        "-y",
        "--no-install-recommends",
        "mosquitto",
        "mosquitto-clients",
    ])?;
    if !Path::new(MOSQUITTO).is_file() {
        bail!("{MOSQUITTO} is still missing after installing the mosquitto package");
    }
    require_clients()
}

/// The broker's version line, e.g. `mosquitto version 2.0.11`.
pub fn version() -> anyhow::Result<String> {
    // `mosquitto -h` prints its usage (version first) and exits non-zero.
    let out = run_bounded(Command::new(MOSQUITTO).arg("-h"), Duration::from_secs(5))?;
    let text = format!("{}{}", out.stdout, out.stderr);
    text.lines()
        .find(|l| l.contains("version"))
        .map(|l| l.trim().to_owned())
        .context("no version line in `mosquitto -h`")
}

/// A `mosquitto` process listening on a free 127.0.0.1 port, with a config file, a
/// persistence directory and a log in its own temp dir. It is stopped by its pid: SIGKILL
/// (as a crash) with [`Broker::kill9`], and when dropped.
pub struct Broker {
    name: String,
    _root: tempfile::TempDir,
    config: PathBuf,
    log_path: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker whose config is `listener PORT 127.0.0.1`, persistence in its temp
    /// dir, then `extra` (more lines: limits, a bridge). Waits until it accepts connections.
    /// As root, Mosquitto would switch to the `mosquitto` user and then fail to write its
    /// persistence file into the (root-owned) temp dir, silently: it runs as root then.
    pub fn start(name: &str, extra: &str) -> anyhow::Result<Broker> {
        let root = tempfile::Builder::new()
            .prefix("fogline-mosquitto-")
            .tempdir()
            .context("creating a temp dir")?;
        let port = crate::free_port()?;
        let data = root.path().join("data");
        std::fs::create_dir_all(&data)?;
        let config = root.path().join("mosquitto.conf");
        let text = format!(
            "# {name}: written by the fogline benchmark\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             {user}\
             {extra}\n",
            data.display(),
            user = if crate::is_root() { "user root\n" } else { "" },
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut broker = Broker {
            name: name.to_owned(),
            log_path: root.path().join("mosquitto.log"),
            _root: root,
            config,
            port,
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// Starts the process (again) with the same config, port and persistence directory;
    /// waits up to 30 s until the port accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {MOSQUITTO} for {}", self.name))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "{} exited with {status}; log tail:\n{}",
                        self.name,
                        self.log_tail(20)
                    );
                }
            }
            if std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not listening within 30 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL")?;
            child.wait().context("reaping mosquitto")?;
        }
        Ok(())
    }

    /// SIGTERM (Mosquitto writes its persistence file then), and wait up to `timeout` for
    /// a clean exit.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id().to_string();
        let out = run_bounded(
            Command::new("kill").args(["-TERM", &pid]),
            Duration::from_secs(5),
        )?;
        if !out.status.success() {
            bail!("kill -TERM {pid} failed: {}", out.stderr.trim());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "{} exited with {status} after SIGTERM; log tail:\n{}",
                        self.name,
                        self.log_tail(20)
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} still running {timeout:?} after SIGTERM; killed it",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> std::net::SocketAddr {
        local(self.port)
    }

    /// The last `lines` lines of the broker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::tail(&self.log_path, lines)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fails with a clear message when `mosquitto_pub` / `mosquitto_sub` are not installed.
pub fn require_clients() -> anyhow::Result<()> {
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        match Command::new(tool)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{tool} is not installed: install the Debian package mosquitto-clients \
                 (tests/run.sh does this)"
            ),
            Err(e) => bail!("cannot run {tool}: {e}"),
        }
    }
    Ok(())
}

/// What `mosquitto_pub` sends.
pub enum Message<'a> {
    /// `-m TEXT`
    Text(&'a str),
    /// `-f FILE` (the file's bytes, e.g. a postcard frame)
    File(&'a Path),
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT -q 1 -t TOPIC`, to add the message and options to.
pub fn pub_command(port: u16, topic: &str) -> Command {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ]);
    cmd
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT -q 1 -t TOPIC (-m TEXT | -f FILE)`.
pub fn publish(port: u16, topic: &str, message: Message<'_>) -> anyhow::Result<()> {
    run_pub(pub_command(port, topic), topic, message)
}

/// The same with `-r`: the broker keeps the message for every later subscriber.
pub fn publish_retained(port: u16, topic: &str, message: Message<'_>) -> anyhow::Result<()> {
    let mut cmd = pub_command(port, topic);
    cmd.arg("-r");
    run_pub(cmd, topic, message)
}

fn run_pub(mut cmd: Command, topic: &str, message: Message<'_>) -> anyhow::Result<()> {
    match message {
        Message::Text(text) => cmd.args(["-m", text]),
        Message::File(path) => cmd.arg("-f").arg(path),
    };
    let out = run_bounded(&mut cmd, Duration::from_secs(15))?;
    if !out.status.success() {
        bail!(
            "mosquitto_pub -t {topic} failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
    }
    Ok(())
}

/// `mosquitto_sub -C 1 -W SECS -t TOPIC`: the first message (e.g. a retained one), or
/// `None` if none arrived within `wait_secs`.
pub fn subscribe_one(port: u16, topic: &str, wait_secs: u32) -> anyhow::Result<Option<String>> {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        &wait_secs.to_string(),
        "-t",
        topic,
    ]);
    let out = run_bounded(&mut cmd, Duration::from_secs(u64::from(wait_secs) + 10))?;
    if out.status.success() {
        return Ok(Some(out.stdout.trim_end_matches('\n').to_string()));
    }
    if out.stdout.trim().is_empty() && out.stderr.contains("Timed out") {
        return Ok(None);
    }
    bail!(
        "mosquitto_sub -t {topic} failed ({}): {}",
        out.status,
        out.stderr.trim()
    )
}

/// Config lines for Mosquitto's dynamic security plugin with one client `user` (password
/// `password`) that may publish only under `publish` and subscribe only to `subscribe`;
/// every other SUBSCRIBE of that client is refused in its SUBACK. Writes the plugin's JSON
/// file into `dir` (made with `mosquitto_ctrl dynsec init`, then given that one role).
/// Anonymous clients are not affected. `None` when the plugin is not installed.
pub fn dynsec_device(
    dir: &Path,
    user: &str,
    password: &str,
    publish: &str,
    subscribe: &str,
) -> anyhow::Result<Option<String>> {
    let Some(plugin) = dynsec_plugin() else {
        return Ok(None);
    };
    let file = dir.join("dynsec.json");
    let out = run_bounded(
        Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&file)
            .args([user, password]),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("mosquitto_ctrl dynsec init failed: {}", out.stderr.trim());
    }
    let text = std::fs::read_to_string(&file)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).context("mosquitto_ctrl wrote no JSON")?;
    // `init` makes an admin (allowed to subscribe to everything): make it a device.
    json["roles"] = serde_json::json!([{
        "rolename": "device",
        "acls": [
            {"acltype": "publishClientSend", "topic": publish, "allow": true},
            {"acltype": "subscribePattern", "topic": subscribe, "allow": true},
        ],
    }]);
    let clients = json["clients"]
        .as_array_mut()
        .context("no clients in the dynsec file")?;
    for client in clients {
        client["roles"] = serde_json::json!([{"rolename": "device"}]);
    }
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    Ok(Some(format!(
        "plugin {}\nplugin_opt_config_file {}\n",
        plugin.display(),
        file.display()
    )))
}

/// `mosquitto_dynamic_security.so` in the multiarch library directory, if installed.
fn dynsec_plugin() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("mosquitto_dynamic_security.so"))
        .find(|p| p.is_file())
}

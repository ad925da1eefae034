//! Starting, stopping and inspecting a real `fogline-agent` process.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::{free_port, http_get, local, metric, run_bounded};

const AGENT: &str = "fogline-agent";

/// The `fogline-agent` binary: `FOGLINE_AGENT_BIN`, else found next to this executable.
pub fn agent_bin() -> anyhow::Result<PathBuf> {
    find_bin(AGENT, "FOGLINE_AGENT_BIN")
}

/// Finds the binary `name`: the path in env var `env_var` if set, else the file `name`
/// in the cargo profile directory this executable was built into (test executables live
/// in `target/<profile>/deps/`, binaries in `target/<profile>/`).
pub fn find_bin(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env_var}={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    // Look in the executable's own directory and at most two levels up (deps/ → profile/).
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {} (nor in the two directories above it); \
         run `cargo build --workspace --bins` first, or set {env_var}",
        exe.display()
    )
}

/// One buffered raw reading as printed by `fogline-agent buffer export --format jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExportedReading {
    /// Position in the agent's origin log.
    pub offset: u64,
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Boot id of the device.
    pub boot: u32,
    /// Sequence number within the boot, when the sensor sent one.
    pub seq: Option<u32>,
    /// The value.
    pub value: f64,
    /// Unix milliseconds.
    pub ts: i64,
}

/// How to start an [`Agent`].
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra environment, e.g. `("FOGLINE_BUFFER__MAX_BYTES", "200000")`.
    pub env: Vec<(String, String)>,
    /// Use this data directory instead of a fresh one inside the agent's temp dir.
    pub data_dir: Option<PathBuf>,
    /// Pass `--config FILE`.
    pub config: Option<PathBuf>,
    /// Also open the MQTT 5 listener on a free port (off otherwise).
    pub mqtt_v5: bool,
    /// Binary to run instead of [`agent_bin`].
    pub bin: Option<PathBuf>,
    /// A label for log lines printed by the harness (defaults to "agent").
    pub name: Option<String>,
    /// Listen for MQTT 3.1.1 on this port instead of a free one (peers need it up front).
    pub mqtt_port: Option<u16>,
    /// Extra command-line arguments after `run`, e.g. `--peers …`.
    pub args: Vec<String>,
}

impl AgentOptions {
    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }
}

/// A running (or stopped) `fogline-agent` with its own ports, data dir and log file.
///
/// Dropping it kills the process if it still runs. When dropped during a panic it prints
/// the tail of the agent's log and keeps its temp dir for inspection.
pub struct Agent {
    bin: PathBuf,
    opts: AgentOptions,
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    mqtt_port: u16,
    mqtt_v5_port: Option<u16>,
    http_port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    /// Spawns the agent (does not wait for readiness; see [`Agent::wait_ready`]).
    pub fn spawn(opts: AgentOptions) -> anyhow::Result<Agent> {
        let bin = match &opts.bin {
            Some(bin) => bin.clone(),
            None => agent_bin()?,
        };
        let root = tempfile::Builder::new()
            .prefix("fogline-test-")
            .tempdir()
            .context("creating a temp dir")?;
        let root_path = root.path().to_path_buf();
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| root_path.join("data"));
        let agent_opts_port = opts.mqtt_port;
        let mqtt_v5_port = if opts.mqtt_v5 {
            Some(free_port()?)
        } else {
            None
        };
        let mut agent = Agent {
            bin,
            opts,
            log_path: root_path.join("agent.log"),
            root: Some(root),
            root_path,
            data_dir,
            mqtt_port: match agent_opts_port {
                Some(p) => p,
                None => free_port()?,
            },
            mqtt_v5_port,
            http_port: free_port()?,
            child: None,
            starts: 0,
        };
        agent.start_process()?;
        Ok(agent)
    }

    /// Spawns the agent and waits (up to 30 s) until `/healthz` answers 200.
    pub fn start(opts: AgentOptions) -> anyhow::Result<Agent> {
        let mut agent = Agent::spawn(opts)?;
        agent.wait_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    fn name(&self) -> &str {
        self.opts.name.as_deref().unwrap_or("agent")
    }

    fn start_process(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name());
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(log, "===== fogline-tests: start #{} =====", self.starts)?;
        let log_err: File = log.try_clone()?;
        let mut cmd = Command::new(&self.bin);
        crate::clean_env(&mut cmd);
        cmd.arg("run");
        if let Some(config) = &self.opts.config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--mqtt-listen")
            .arg(local(self.mqtt_port).to_string())
            .arg("--http-listen")
            .arg(local(self.http_port).to_string())
            .args(&self.opts.args);
        // Without it the agent serves 3.1.1 and 5 on --mqtt-listen only (the default).
        if let Some(port) = self.mqtt_v5_port {
            cmd.arg("--mqtt-listen-v5").arg(local(port).to_string());
        }
        cmd.env("NO_COLOR", "1");
        for (key, value) in &self.opts.env {
            cmd.env(key, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the agent again on the same data dir and ports and waits until it is ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.start_process()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// Polls `/healthz` until it answers 200 "ok"; fails early if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "{} exited with {status} before it was ready; log tail:\n{}",
                        self.name(),
                        self.log_tail(40)
                    );
                }
            } else {
                bail!("{} is not running", self.name());
            }
            if let Ok((200, body)) = http_get(self.http_addr(), "/healthz") {
                if body.trim() == "ok" {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {timeout:?}; log tail:\n{}",
                    self.name(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap the process.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL")?;
            child.wait().context("reaping the killed agent")?;
        }
        Ok(())
    }

    /// Sends SIGTERM (does not wait; see [`Agent::wait_exit`]).
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("agent is not running")?;
        let out = run_bounded(
            Command::new("kill").arg("-TERM").arg(pid.to_string()),
            Duration::from_secs(5),
        )?;
        if !out.status.success() {
            bail!("kill -TERM {pid} failed: {}", out.stderr.trim());
        }
        Ok(())
    }

    /// Waits for the process to exit and returns its status; fails after `timeout`
    /// (the process keeps running then).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("agent is not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("agent still running {timeout:?} after being asked to stop");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait up to `timeout` for a clean (status 0) exit.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.terminate()?;
        let status = self.wait_exit(timeout)?;
        if !status.success() {
            bail!(
                "agent exited with {status} after SIGTERM; log tail:\n{}",
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// MQTT 3.1.1 listener.
    pub fn mqtt_addr(&self) -> SocketAddr {
        local(self.mqtt_port)
    }

    /// MQTT 3.1.1 port.
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    /// MQTT 5 listener, when enabled.
    pub fn mqtt_v5_addr(&self) -> Option<SocketAddr> {
        self.mqtt_v5_port.map(local)
    }

    /// HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        local(self.http_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temp dir holding the log (and the data dir unless one was given).
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// The binary this agent runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The last `lines` lines of the agent's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::tail(&self.log_path, lines)
    }

    /// `GET path`, failing on a non-200 answer.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = http_get(self.http_addr(), path)?;
        if code != 200 {
            bail!("GET {path} answered {code}: {body}");
        }
        Ok(body)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.get("/metrics")
    }

    /// One value from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric(&self.metrics()?, name, labels))
    }

    /// `/status` as JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let body = self.get("/status")?;
        serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body}"))
    }

    fn buffer_cmd(&self, args: &[&str]) -> anyhow::Result<crate::BoundedOutput> {
        let mut cmd = Command::new(&self.bin);
        crate::clean_env(&mut cmd);
        cmd.arg("buffer")
            .arg(args[0])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&args[1..])
            .env("NO_COLOR", "1");
        run_bounded(&mut cmd, Duration::from_secs(60))
    }

    /// The raw readings of `fogline-agent buffer export --format jsonl` on the (stopped)
    /// agent's data dir.
    pub fn export(&self) -> anyhow::Result<Vec<ExportedReading>> {
        let (readings, _) = self.export_all()?;
        Ok(readings)
    }

    /// The summaries of downsampled readings in the export (`"kind":"summary"` lines).
    pub fn export_summaries(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let (_, summaries) = self.export_all()?;
        Ok(summaries)
    }

    fn export_all(&self) -> anyhow::Result<(Vec<ExportedReading>, Vec<serde_json::Value>)> {
        let out = self.buffer_cmd(&["export", "--format", "jsonl"])?;
        if !out.status.success() {
            bail!(
                "buffer export failed ({}): {}",
                out.status,
                out.stderr.trim()
            );
        }
        crate::split_export(&out.stdout)
    }

    /// `fogline-agent buffer export --format csv` output, as text.
    pub fn export_csv(&self) -> anyhow::Result<String> {
        let out = self.buffer_cmd(&["export", "--format", "csv"])?;
        if !out.status.success() {
            bail!(
                "buffer export failed ({}): {}",
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// `fogline-agent buffer stats` as JSON.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.buffer_cmd(&["stats"])?;
        if !out.status.success() {
            bail!(
                "buffer stats failed ({}): {}",
                out.status,
                out.stderr.trim()
            );
        }
        serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("buffer stats is not JSON: {}", out.stdout))
    }

    /// `fogline-agent buffer check`: `Ok(())` when it exits 0 and prints "ok".
    pub fn check(&self) -> anyhow::Result<()> {
        let out = self.buffer_cmd(&["check"])?;
        if !out.status.success() || out.stdout.trim() != "ok" {
            let lines: Vec<&str> = out.stdout.lines().collect();
            let shown = if lines.len() > 12 {
                let mut shown = lines[..8].join("\n");
                shown.push_str(&format!("\n... ({} lines in all) ...\n", lines.len()));
                shown.push_str(&lines[lines.len() - 4..].join("\n"));
                shown
            } else {
                lines.join("\n")
            };
            bail!(
                "buffer check failed ({}):\n{shown}\nstderr: {}",
                out.status,
                out.stderr.trim()
            );
        }
        Ok(())
    }

    /// Resident memory of the running agent from `/proc/<pid>/status`: (VmRSS, VmHWM) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        crate::proc::rss_kib(self.pid().context("agent is not running")?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} log tail ({}) -----\n{}\n-----",
                self.name(),
                self.log_path.display(),
                self.log_tail(60)
            );
            if let Some(root) = self.root.take() {
                let kept = root.keep();
                eprintln!(
                    "kept the agent's temp dir for inspection: {}",
                    kept.display()
                );
            }
        }
    }
}

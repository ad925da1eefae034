//! Starting, stopping and inspecting a real `fogline-gateway` process.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::{find_bin, free_port, http_get, local, metric, run_bounded};

/// One stored reading as printed by `fogline-gateway store export --format jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GatewayReading {
    pub site: String,
    pub origin: String,
    pub offset: u64,
    pub device: String,
    pub metric: String,
    pub boot: u32,
    pub seq: Option<u32>,
    pub value: f64,
    pub ts: i64,
}

/// A running (or stopped) gateway with its own ports, data dir and log file. Dropping it
/// kills the process.
pub struct Gateway {
    bin: PathBuf,
    _root: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    mqtt_port: u16,
    http_port: u16,
    env: Vec<(String, String)>,
    /// `--config FILE`, if any.
    config: Option<PathBuf>,
    /// `--store URL`: the store in PostgreSQL; `None`: the embedded store.
    store_url: Option<String>,
    child: Option<Child>,
}

impl Gateway {
    /// Starts a gateway on free local ports and a fresh data dir; waits until ready.
    pub fn start(env: &[(&str, &str)]) -> anyhow::Result<Gateway> {
        Gateway::start_with(env, None)
    }

    /// [`Gateway::start`] with `--config FILE`.
    pub fn start_with(env: &[(&str, &str)], config: Option<PathBuf>) -> anyhow::Result<Gateway> {
        Gateway::start_on(env, config, None)
    }

    /// [`Gateway::start_with`] on the PostgreSQL store at `store_url` (`--store URL`), or
    /// the embedded one.
    pub fn start_on(
        env: &[(&str, &str)],
        config: Option<PathBuf>,
        store_url: Option<&str>,
    ) -> anyhow::Result<Gateway> {
        let root = tempfile::Builder::new()
            .prefix("fogline-gw-")
            .tempdir()
            .context("creating a temp dir")?;
        let mut gw = Gateway {
            bin: find_bin("fogline-gateway", "FOGLINE_GATEWAY_BIN")?,
            data_dir: root.path().join("data"),
            log_path: root.path().join("gateway.log"),
            _root: root,
            mqtt_port: free_port()?,
            http_port: free_port()?,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            config,
            store_url: store_url.map(str::to_owned),
            child: None,
        };
        gw.restart()?;
        Ok(gw)
    }

    /// Starts the process (again) on the same data dir and ports; waits until ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("gateway already running");
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        writeln!(log, "===== fogline-tests: gateway start =====")?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.bin);
        crate::clean_env(&mut cmd);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--mqtt-listen")
            .arg(self.mqtt_addr().to_string())
            .arg("--http-listen")
            .arg(local(self.http_port).to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(url) = &self.store_url {
            cmd.arg("--store").arg(url);
        }
        self.child = Some(cmd.spawn().context("starting fogline-gateway")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "gateway exited with {status}; log tail:\n{}",
                        self.log_tail(30)
                    );
                }
            }
            if let Ok((200, _)) = http_get(local(self.http_port), "/healthz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway not ready in 30 s; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait up to `timeout` for a clean exit.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        run_bounded(
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string()),
            Duration::from_secs(5),
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "gateway exited with {status}; log tail:\n{}",
                        self.log_tail(30)
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("gateway did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        local(self.mqtt_port)
    }

    /// Where its HTTP listener is (`/status`, `/metrics`, `/api/v1/…`).
    pub fn http_addr(&self) -> SocketAddr {
        local(self.http_port)
    }

    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A gauge or counter from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (status, body) = http_get(local(self.http_port), "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(metric(&body, name, labels))
    }

    /// `/status` as JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = http_get(local(self.http_port), "/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// The next offset the gateway expects from (site, origin): everything below is stored.
    /// The gateway's watermark of an origin log: `origin` is a full origin id
    /// (`<node>.<incarnation>`) or a node id, which matches that node's logs (the
    /// highest watermark if a wiped data directory gave it several).
    pub fn next_offset(&self, site: &str, origin: &str) -> anyhow::Result<u64> {
        let status = self.status()?;
        let prefix = format!("{origin}.");
        let next = status["origins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| {
                o["site"] == site
                    && o["origin"]
                        .as_str()
                        .is_some_and(|id| id == origin || id.starts_with(&prefix))
            })
            .filter_map(|o| o["next_offset"].as_u64())
            .max()
            .unwrap_or(0);
        Ok(next)
    }

    /// `--store URL` or `--data-dir DIR`: where `store export|stats` read.
    fn which_store<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        match &self.store_url {
            Some(url) => cmd.arg("--store").arg(url),
            None => cmd.arg("--data-dir").arg(&self.data_dir),
        }
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The readings of `store export` on the (stopped) gateway's data dir, or on its
    /// PostgreSQL store (running or not).
    pub fn export(&self) -> anyhow::Result<Vec<GatewayReading>> {
        Ok(self.export_all()?.0)
    }

    /// The summaries of readings downsampled at the edge in `store export`.
    pub fn export_summaries(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(self.export_all()?.1)
    }

    fn export_all(&self) -> anyhow::Result<(Vec<GatewayReading>, Vec<serde_json::Value>)> {
        let mut cmd = Command::new(&self.bin);
        crate::clean_env(&mut cmd).arg("store").arg("export");
        let out = run_bounded(
            self.which_store(&mut cmd).arg("--format").arg("jsonl"),
            Duration::from_secs(120),
        )?;
        if !out.status.success() {
            bail!("store export failed: {}", out.stderr);
        }
        crate::split_export(&out.stdout)
    }

    /// `store stats` on the (stopped) gateway's data dir: per origin as JSON.
    pub fn stats(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = Command::new(&self.bin);
        crate::clean_env(&mut cmd).arg("store").arg("stats");
        let out = run_bounded(self.which_store(&mut cmd), Duration::from_secs(60))?;
        if !out.status.success() {
            bail!("store stats failed: {}", out.stderr);
        }
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("store stats is not JSON: {}", out.stdout))?;
        Ok(v["origins"].as_array().cloned().unwrap_or_default())
    }

    /// The origins for which the (stopped) gateway recorded readings skipped at the edge
    /// (dropped before they could be sent): a problem unless the test made it happen.
    pub fn skipped_at_edge(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .stats()?
            .iter()
            .filter(|o| o["skipped_at_edge"].as_u64().unwrap_or(0) > 0)
            .map(|o| o.to_string())
            .collect())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::tail(&self.log_path, lines)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- gateway log tail ---\n{}", self.log_tail(40));
        }
    }
}

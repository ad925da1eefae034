//! A real PostgreSQL 15 for a test: `initdb` in a temp dir (as the `postgres` user when
//! this runs as root, because initdb refuses root), the server on a free loopback port,
//! stopped by its pid when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{free_port, is_root, run_bounded};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL server of a test's own.
pub struct Postgres {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    _root: tempfile::TempDir,
}

/// Why PostgreSQL cannot run here, if it cannot (`tests/run.sh` installs it).
pub fn unavailable() -> Option<String> {
    let missing: Vec<&str> = ["initdb", "postgres"]
        .into_iter()
        .filter(|b| !Path::new(BIN).join(b).exists())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "{} not found in {BIN} (apt-get install postgresql-15)",
            missing.join(", ")
        ));
    }
    None
}

/// Starts PostgreSQL, or says (through [`crate::cannot_run`]: a failure in CI) why it
/// cannot; `Ok(None)` is a visible skip.
pub fn start_or_skip(test: &str) -> anyhow::Result<Option<Postgres>> {
    if let Some(why) = unavailable() {
        crate::cannot_run(test, &why)?;
        return Ok(None);
    }
    Postgres::start(&[]).map(Some)
}

impl Postgres {
    /// `initdb`, then the server with `settings` (`name=value`) on top of test defaults.
    pub fn start(settings: &[&str]) -> anyhow::Result<Postgres> {
        let root = tempfile::Builder::new()
            .prefix("fogline-pg-")
            .tempdir()
            .context("creating a temp dir")?;
        let data = root.path().join("data");
        std::fs::create_dir(&data)?;
        let root_user = is_root();
        if root_user {
            // The postgres user must reach the data dir; it owns the dir itself.
            run_bounded(
                Command::new("chmod").arg("0755").arg(root.path()),
                Duration::from_secs(5),
            )?;
            run_bounded(
                Command::new("chown").arg("postgres:postgres").arg(&data),
                Duration::from_secs(5),
            )?;
        }
        let as_postgres = |program: &str| {
            let path = Path::new(BIN).join(program);
            if root_user {
                let mut c = Command::new("runuser");
                c.arg("-u").arg("postgres").arg("--").arg(path);
                c
            } else {
                Command::new(path)
            }
        };
        let out = run_bounded(
            as_postgres("initdb").arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            Duration::from_secs(120),
        )
        .context("initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}{}", out.stdout, out.stderr);
        }
        let port = free_port()?;
        let log = root.path().join("postgres.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = as_postgres("postgres");
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=256MB"])
            .args(["-c", "max_wal_size=2GB"]);
        for s in settings {
            cmd.arg("-c").arg(s);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file));
        let child = cmd.spawn().context("starting postgres")?;
        let mut pg = Postgres {
            child: Some(child),
            port,
            data,
            log,
            _root: root,
        };
        pg.wait_ready()?;
        Ok(pg)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("postgres exited with {status}:\n{}", self.log_tail(20));
                }
            }
            if postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres not ready in 30 s:\n{}", self.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name`; returns its URL.
    pub fn create_db(&self, name: &str) -> anyhow::Result<String> {
        let mut c = self.client("postgres")?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    pub fn client(&self, db: &str) -> anyhow::Result<postgres::Client> {
        postgres::Client::connect(&self.url(db), postgres::NoTls)
            .with_context(|| format!("connecting to {}", self.url(db)))
    }

    /// The pid of the process started (the server, or `runuser` above it when this runs
    /// as root): the root of the server's process tree, backends included.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::proc::tail(&self.log, lines)
    }

    /// Fast shutdown (SIGINT to the server, by pid); SIGKILL if it has not stopped in 10 s.
    /// As root the process started is `runuser`, which does not pass SIGINT on (and
    /// killing it would leave the server running, orphaned): the server's pid is read
    /// from its `postmaster.pid`.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let server = self.server_pid().unwrap_or(child.id());
        let signal = |sig: &str| {
            let _ = run_bounded(
                Command::new("kill").arg(sig).arg(server.to_string()),
                Duration::from_secs(5),
            );
        };
        signal("-INT");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal("-KILL");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The postmaster's pid: the first line of `postmaster.pid` in the data directory.
    fn server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

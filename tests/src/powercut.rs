//! A power-cut disk for tests: a `fogline-powercut` mount that loses everything not
//! fsynced when [`PowercutDisk::power_cut`] cuts it (see `tests/powercut` for the model).
//!
//! A power cut is the disk and the programs on it stopping at the same instant: the
//! mount is frozen first (requests wait, nothing more becomes durable), the programs
//! get SIGKILL while they wait, then the cut fails their waiting requests, throws away
//! everything unsynced and mounts what survived in the same place.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{find_bin, run_bounded};

/// What a cut reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutOutcome {
    /// 4 KiB pages written and not synced when the power went: all lost.
    pub unsynced_pages: u64,
    /// Directory entry changes not synced: all undone.
    pub unsynced_dir_ops: u64,
    /// Files and directories that existed before and are gone.
    pub lost_inodes: u64,
    /// Requests that were waiting on the disk when the power went.
    pub held: u64,
}

/// Whether a disk can be mounted here: `Err` says why not (FUSE missing, not root).
pub fn powercut_available() -> anyhow::Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing (no FUSE in this kernel or container)");
    }
    if !crate::is_root() {
        bail!("not root");
    }
    find_bin("fogline-powercut", "FOGLINE_POWERCUT_BIN")?;
    Ok(())
}

/// A mounted power-cut filesystem. Dropping it unmounts it and ends its server.
pub struct PowercutDisk {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// The mount point (inside `_dir`).
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
    cuts: u64,
}

impl PowercutDisk {
    /// Mounts an empty disk that loses everything unsynced at a cut.
    pub fn mount() -> anyhow::Result<PowercutDisk> {
        Self::mount_with(&[])
    }

    /// Mounts with extra `fogline-powercut mount` arguments (`--lose random --seed N`).
    pub fn mount_with(args: &[&str]) -> anyhow::Result<PowercutDisk> {
        let bin = find_bin("fogline-powercut", "FOGLINE_POWERCUT_BIN")?;
        let dir = tempfile::Builder::new()
            .prefix("fogline-powercut-")
            .tempdir()
            .context("creating a mount point")?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path)?;
        let mut child = Command::new(&bin)
            .arg("mount")
            .arg(&path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("powercut stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("powercut-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let mut disk = PowercutDisk {
            child: Some(child),
            stdin,
            lines,
            path,
            _dir: Some(dir),
            cuts: 0,
        };
        let ready = disk.answer(Duration::from_secs(20))?;
        if !ready.starts_with("ready") {
            bail!("fogline-powercut said {ready:?} instead of ready");
        }
        Ok(disk)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    fn answer(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!("fogline-powercut silent for {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("fogline-powercut exited"),
        }
    }

    fn command(&mut self, cmd: &str) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("fogline-powercut is stopped")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let answer = self.answer(Duration::from_secs(30))?;
        if answer.starts_with("error") {
            bail!("fogline-powercut {cmd}: {answer}");
        }
        Ok(answer)
    }

    /// Makes a directory on the disk and makes it durable (fsync of it and its parent):
    /// a data directory as an installer leaves it, long synced before any power cut.
    pub fn durable_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.path.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::File::open(&dir)?.sync_all()?;
        std::fs::File::open(&self.path)?.sync_all()?;
        Ok(dir)
    }

    /// The power goes at this instant for the disk and for every process in `pids`:
    /// freeze, SIGKILL, cut, remount. The processes are not reaped here (their owners
    /// do that); they are dead or dying when this returns.
    pub fn power_cut(&mut self, pids: &[u32]) -> anyhow::Result<CutOutcome> {
        self.command("freeze")?;
        for pid in pids {
            // Killed while their requests wait on the frozen disk: they never see them fail.
            let _ = run_bounded(
                Command::new("kill").arg("-KILL").arg(pid.to_string()),
                Duration::from_secs(5),
            );
        }
        let answer = self.command("cut")?;
        self.cuts += 1;
        let field = |key: &str| -> u64 {
            answer
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(CutOutcome {
            unsynced_pages: field("unsynced_pages"),
            unsynced_dir_ops: field("unsynced_dir_ops"),
            lost_inodes: field("lost_inodes"),
            held: field("held"),
        })
    }

    /// The server's counters as `key=value` pairs.
    pub fn stats(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        let answer = self.command("stats")?;
        Ok(answer
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect())
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Unmounts and waits for the server to end.
    pub fn unmount(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever happened to the server, nothing may stay mounted.
        if is_mounted(&self.path) {
            let _ = run_bounded(
                Command::new("umount").arg("-l").arg(&self.path),
                Duration::from_secs(10),
            );
        }
        Ok(())
    }
}

/// Is `path` a mount point (listed in `/proc/self/mounts`)?
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let shown = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(shown.as_ref()))
}

impl Drop for PowercutDisk {
    fn drop(&mut self) {
        let _ = self.unmount();
        if std::thread::panicking() {
            // Keep nothing: the disk's content lived in the server's memory.
            eprintln!("power-cut disk at {} unmounted", self.path.display());
        }
    }
}

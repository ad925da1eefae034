//! Running short-lived helper commands with a time limit.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What a bounded command printed and how it ended.
#[derive(Debug)]
pub struct BoundedOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it if it takes longer than `timeout`.
/// stdin is closed; stdout and stderr are read concurrently so large outputs never block.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<BoundedOutput> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut out = child.stdout.take().context("child stdout")?;
    let mut err = child.stderr.take().context("child stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(BoundedOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Resident memory of process `pid` from `/proc/<pid>/status`: (VmRSS, VmHWM) in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {line}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) process `pid` has used so far, in seconds, from
/// `/proc/<pid>/stat` (clock ticks of `getconf CLK_TCK`, 100 on Linux).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let t = stat_times(&format!("/proc/{pid}/stat"))?;
    Ok(t[0] + t[1])
}

/// [`cpu_secs`] plus what its children used that it has reaped (cutime + cstime): summed
/// over a process tree, the total does not shrink when a child exits and is reaped
/// (PostgreSQL's postmaster reaps the backends and workers it forks).
pub fn cpu_secs_with_reaped(pid: u32) -> anyhow::Result<f64> {
    let t = stat_times(&format!("/proc/{pid}/stat"))?;
    Ok(t.iter().sum())
}

/// CPU time (user + system) of the threads of process `pid` named `name` (`comm`, as
/// `std::thread::Builder::name` sets it, cut to 15 bytes); 0 when none is.
pub fn thread_cpu_secs(pid: u32, name: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    let dir = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Ok(t) = stat_times(&path.join("stat").to_string_lossy()) {
                total += t[0] + t[1];
            }
        }
    }
    Ok(total)
}

/// `pid` and every process below it (children, their children, …), from the parent
/// pids in `/proc/*/stat`; `pid` first.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // After the name: state, then the parent pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((child, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(c, p)| *p == parent && !tree.contains(c))
                .map(|(c, _)| *c)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    tree
}

/// utime, stime, cutime, cstime of a `stat` file, in seconds.
fn stat_times(path: &str) -> anyhow::Result<[f64; 4]> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name may contain spaces; the fields after it are plain numbers.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no ')' in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of the whole line: 11 to 14
    // after the name.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("short {path}"))?
            .parse::<f64>()
            .with_context(|| format!("bad tick count in {path}"))
    };
    let hz = clock_ticks_per_sec();
    Ok([
        ticks(11)? / hz,
        ticks(12)? / hz,
        ticks(13)? / hz,
        ticks(14)? / hz,
    ])
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        run_bounded(
            Command::new("getconf").arg("CLK_TCK"),
            Duration::from_secs(5),
        )
        .ok()
        .and_then(|out| out.stdout.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
    })
}

/// The last `lines` lines of a (log) file; empty when it cannot be read.
pub(crate) fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

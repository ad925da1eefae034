//! Harness for fogline's end-to-end tests and the ingest benchmark.
//!
//! Everything here drives the real binaries as separate processes, the way an operator
//! would: [`Agent`] starts `fogline-agent` on free local ports with its own data
//! directory, [`Fleet`] simulates sensors over MQTT (QoS 1, sequenced readings, re-send
//! after reconnect, end-to-end acks), [`mosquitto`] wraps the Debian `mosquitto-clients`
//! tools, [`conformance`] runs the MQTT conformance suite (Paho) against a broker, and
//! [`http_get`] / [`metric`] read the agent's HTTP endpoints. The fault lab: [`powercut`]
//! mounts a filesystem that loses unsynced writes at a power cut, [`netlab`] builds
//! network namespaces with silent-drop partitions, and [`faultlab`] runs the trials and
//! the soak on them.
//!
//! The agent binary is found through `FOGLINE_AGENT_BIN`, else next to the running
//! executable in the cargo target directory; build it first with
//! `cargo build --workspace --bins`.

mod agent;
pub mod bench;
pub mod conformance;
pub mod faultlab;
mod fleet;
mod gateway;
mod http;
pub mod mosquitto;
pub mod netlab;
pub mod postgres;
pub mod powercut;
mod proc;
mod proxy;
pub mod puback;
pub mod secure;
mod site;

pub use agent::{agent_bin, find_bin, Agent, AgentOptions, ExportedReading};
pub use fleet::{AckSource, Device, DeviceSnapshot, DeviceSpec, Fleet, PayloadFn, RawPublisher};
pub use gateway::{Gateway, GatewayReading};
pub use http::{http_get, metric};
pub use proc::{
    cpu_secs, cpu_secs_with_reaped, process_tree, rss_kib, run_bounded, thread_cpu_secs,
    BoundedOutput,
};
pub use proxy::TcpProxy;
pub use site::{Site, SiteOptions};

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fogline_firmware::wire::{self, Reading, Timestamp, MAX_FRAME_LEN};

/// Is this a CI run (`CI=true` or `CI=1`, which `.ci/run` sets)?
pub fn in_ci() -> bool {
    ci_says(std::env::var("CI").ok().as_deref())
}

fn ci_says(ci: Option<&str>) -> bool {
    matches!(ci.map(str::trim), Some("true" | "1" | "yes"))
}

/// A required test cannot run here (not root, a tool missing). In CI that is a failure:
/// `Err` with `why`. Elsewhere the test is skipped, and says so on the terminal itself —
/// written to the process's stderr, past cargo's capture of a passing test's output, so
/// that a green run without root is never mistaken for a run that checked everything.
pub fn cannot_run(test: &str, why: &str) -> anyhow::Result<()> {
    skip_or_fail(test, why, in_ci())
}

fn skip_or_fail(test: &str, why: &str, ci: bool) -> anyhow::Result<()> {
    if ci {
        anyhow::bail!("{test} must run in CI but cannot: {why}");
    }
    use std::io::Write;
    let line = format!("\nSKIPPED (not run): {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    Ok(())
}

/// Is this process running as root (`id -u` is 0)?
pub fn is_root() -> bool {
    run_bounded(
        std::process::Command::new("id").arg("-u"),
        Duration::from_secs(5),
    )
    .is_ok_and(|out| out.stdout.trim() == "0")
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `127.0.0.1:<port>`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Where a test's seed can be given (and what the harness keeps out of the programs'
/// environment: the agent and gateway read every `FOGLINE_…` variable as a setting).
pub const SEED_VAR: &str = "FOGLINE_TEST_SEED";

/// Keeps this process's `FOGLINE_…` variables (a test's seed, `FOGLINE_AGENT_BIN`, a
/// developer's own settings) out of a child fogline program, which would read every one
/// of them as a setting; a test gives its settings to the child explicitly.
pub fn clean_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FOGLINE_") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// The random seed for a test: `FOGLINE_TEST_SEED` if set, else a fresh one.
/// It is printed so that a failing run can be repeated.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("[{test}] seed {seed} (repeat with FOGLINE_TEST_SEED={seed})");
    seed
}

/// A JSON reading payload as sensors without the postcard codec send it.
pub fn json_payload(value: f64, seq: Option<u32>, boot: Option<u32>, ts: Option<i64>) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("value".into(), serde_json::json!(value));
    if let Some(seq) = seq {
        obj.insert("seq".into(), serde_json::json!(seq));
    }
    if let Some(boot) = boot {
        obj.insert("boot".into(), serde_json::json!(boot));
    }
    if let Some(ts) = ts {
        obj.insert("ts".into(), serde_json::json!(ts));
    }
    serde_json::Value::Object(obj).to_string().into_bytes()
}

/// A firmware postcard frame, made with the one shared codec.
pub fn postcard_frame(
    device: &str,
    metric: &str,
    seq: u32,
    boot: u32,
    time: Timestamp,
    value: f64,
) -> anyhow::Result<Vec<u8>> {
    let reading = Reading {
        device,
        metric,
        seq,
        boot,
        time,
        value,
    };
    let mut buf = [0u8; MAX_FRAME_LEN];
    let frame = wire::encode(&reading, &mut buf)
        .map_err(|e| anyhow::anyhow!("encoding a postcard frame: {e}"))?;
    Ok(frame.to_vec())
}

/// Polls `probe` every `every` until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// An export's lines: the readings, and the summaries (`"kind":"summary"`) apart.
pub fn split_export<T: serde::de::DeserializeOwned>(
    text: &str,
) -> anyhow::Result<(Vec<T>, Vec<serde_json::Value>)> {
    let (mut readings, mut summaries) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("bad export line {line:?}: {e}"))?;
        if v["kind"] == "summary" {
            summaries.push(v);
        } else {
            readings.push(
                serde_json::from_value(v)
                    .map_err(|e| anyhow::anyhow!("bad export line {line:?}: {e}"))?,
            );
        }
    }
    Ok((readings, summaries))
}

/// Checks an export for duplicate `(device, boot, seq)` keys and for missing sequence
/// numbers: for each `(device, boot, upto)` in `expect`, every seq in `1..=upto` must be
/// present exactly once. Returns a human-readable list of problems (empty when fine).
pub fn check_sequences(readings: &[ExportedReading], expect: &[(String, u32, u32)]) -> Vec<String> {
    use std::collections::HashMap;
    let mut seen: HashMap<(&str, u32, u32), u32> = HashMap::new();
    for r in readings {
        if let Some(seq) = r.seq {
            *seen.entry((r.device.as_str(), r.boot, seq)).or_insert(0) += 1;
        }
    }
    let mut problems = Vec::new();
    let mut dups: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    dups.sort();
    for ((device, boot, seq), n) in dups.iter().take(20) {
        problems.push(format!("{device} boot {boot} seq {seq} stored {n} times"));
    }
    if dups.len() > 20 {
        problems.push(format!("... {} duplicated keys in all", dups.len()));
    }
    for (device, boot, upto) in expect {
        let missing: Vec<u32> = (1..=*upto)
            .filter(|seq| !seen.contains_key(&(device.as_str(), *boot, *seq)))
            .collect();
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(10).map(u32::to_string).collect();
            problems.push(format!(
                "{device} boot {boot}: {} of seq 1..={upto} missing (first: {})",
                missing.len(),
                shown.join(", ")
            ));
        }
    }
    problems
}

/// Checks a gateway export: per (site, origin) the offsets start at 0 and are contiguous
/// and in order (nothing lost, nothing twice, order kept), and every
/// `(device, boot, 1..=upto)` in `expect` is there exactly once.
pub fn check_gateway_log(stored: &[GatewayReading], expect: &[(String, u32, u32)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut last: std::collections::HashMap<(&str, &str), u64> = std::collections::HashMap::new();
    for r in stored {
        let key = (r.site.as_str(), r.origin.as_str());
        match last.get(&key) {
            Some(prev) if r.offset != prev + 1 && problems.len() < 20 => {
                problems.push(format!(
                    "{}/{}: offset {} follows {prev}",
                    r.site, r.origin, r.offset
                ));
            }
            None if r.offset != 0 => problems.push(format!(
                "{}/{}: the log starts at offset {}: the readings below never arrived",
                r.site, r.origin, r.offset
            )),
            _ => {}
        }
        last.insert(key, r.offset);
    }
    let as_agent: Vec<ExportedReading> = stored
        .iter()
        .map(|r| ExportedReading {
            offset: r.offset,
            device: r.device.clone(),
            metric: r.metric.clone(),
            boot: r.boot,
            seq: r.seq,
            value: r.value,
            ts: r.ts,
        })
        .collect();
    problems.extend(check_sequences(&as_agent, expect));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_that_cannot_run_fails_in_ci_and_skips_elsewhere() {
        assert!(ci_says(Some("true")) && ci_says(Some("1")) && !ci_says(None));
        assert!(!ci_says(Some("false")));
        assert!(skip_or_fail("t", "not root", true).is_err());
        assert!(skip_or_fail("t", "not root", false).is_ok());
    }

    #[test]
    fn a_gateway_log_must_start_at_offset_zero() {
        let r = |offset| GatewayReading {
            site: "s".into(),
            origin: "o".into(),
            offset,
            device: "d".into(),
            metric: "m".into(),
            boot: 1,
            seq: Some(u32::try_from(offset).unwrap_or(0) + 1),
            value: 1.0,
            ts: 0,
        };
        assert!(check_gateway_log(&[r(0), r(1)], &[]).is_empty());
        let late = check_gateway_log(&[r(5), r(6)], &[]);
        assert_eq!(late.len(), 1, "{late:?}");
        assert!(late[0].contains("starts at offset 5"));
        assert_eq!(check_gateway_log(&[r(0), r(2)], &[]).len(), 1);
    }
}

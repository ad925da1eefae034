//! Promise: a full disk degrades gracefully. When the filesystem under the buffer runs
//! out of space the agent does not crash and does not stop ingesting: the failed batch is
//! not acknowledged (devices re-send it), the oldest readings are dropped to make room
//! and counted in `fogline_buffer_dropped_total{reason="disk_full"}`, and acks resume.
//!
//! Needs root (it mounts a small tmpfs); without root it says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fogline_tests::{run_bounded, Agent, AgentOptions, DeviceSpec, Fleet};

/// A tmpfs mounted for the test's lifetime.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> anyhow::Result<SmallDisk> {
        let dir = tempfile::Builder::new().prefix("fogline-disk-").tempdir()?;
        let path = dir.path().to_path_buf();
        let out = run_bounded(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&path),
            Duration::from_secs(10),
        )?;
        anyhow::ensure!(out.status.success(), "mount tmpfs failed: {}", out.stderr);
        Ok(SmallDisk { path, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("umount").arg("-l").arg(&self.path),
            Duration::from_secs(10),
        );
    }
}

/// Writes `path` until the filesystem is full.
fn fill_up(path: &Path) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::File::create(path) {
        let chunk = vec![0x5au8; 4096];
        for _ in 0..(1 << 16) {
            if f.write_all(&chunk).and_then(|()| f.flush()).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }
}

#[test]
fn a_full_disk_drops_the_oldest_counts_it_and_keeps_ingesting() -> anyhow::Result<()> {
    if !fogline_tests::is_root() {
        return fogline_tests::cannot_run(
            "agent_disk_full",
            "needs root to mount a tmpfs (CI runs as root)",
        );
    }
    let disk = SmallDisk::mount("4m")?;
    let mut agent = Agent::start(AgentOptions {
        data_dir: Some(disk.path().join("data")),
        ..AgentOptions::default()
            .env("FOGLINE_BUFFER__MAX_BYTES", 1u64 << 30)
            .env("FOGLINE_BUFFER__CACHE_BYTES", 1u64 << 20)
            .env("FOGLINE_BUFFER__MIN_FREE_DISK_BYTES", 1u64 << 20)
    })?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..16 {
        let mut spec = DeviceSpec::json(format!("full-{i}"), "temp", 1);
        spec.window = 500;
        // Values that do not compress to a few bytes fill the disk faster.
        spec.payload = std::sync::Arc::new(|device, boot, seq| {
            let value = f64::from(seq) * std::f64::consts::PI;
            (
                format!("sensors/{device}/temp"),
                fogline_tests::json_payload(value, Some(seq), Some(boot), None),
            )
        });
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    let started = Instant::now();
    let dropped = |a: &Agent| a.metric("fogline_buffer_dropped_total", &[("reason", "disk_full")]);
    while dropped(&agent)? == 0.0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the 4 MiB disk never filled: {}",
            agent.status()?
        );
        anyhow::ensure!(agent.is_running(), "agent died:\n{}", agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(200));
    }
    let failures = agent.metric("fogline_buffer_commit_failures_total", &[])?;
    eprintln!(
        "disk full after {:.1}s: {} readings dropped, {failures} failed commits",
        started.elapsed().as_secs_f64(),
        dropped(&agent)?
    );
    // Ingest goes on: acks keep coming after the disk filled.
    let acked_then = fleet.totals().1;
    std::thread::sleep(Duration::from_secs(3));
    let acked_now = fleet.totals().1;
    assert!(agent.is_running(), "agent died:\n{}", agent.log_tail(30));
    assert!(
        acked_now > acked_then + 1000,
        "acks stalled after the disk filled: {acked_then} -> {acked_now}"
    );

    // Another program takes every last byte. The agent already holds its buffer at a
    // fixed size (a ring: each commit drops as much of the oldest), so redb reuses its
    // freed pages; should a commit still fail with ENOSPC, the agent gives up its reserve
    // file, drops a tenth, and carries on. Either way acks keep coming.
    let filler = disk.path().join("filler.bin");
    fill_up(&filler);
    let failures_before = agent.metric("fogline_buffer_commit_failures_total", &[])?;
    let acked_then = fleet.totals().1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.totals().1 < acked_then + 1000 {
        assert!(
            Instant::now() < deadline,
            "acks stalled after the disk was filled to the brim"
        );
        assert!(agent.is_running(), "agent died:\n{}", agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "after filling the disk: {} failed commits, {} dropped",
        agent.metric("fogline_buffer_commit_failures_total", &[])? - failures_before,
        dropped(&agent)?
    );
    std::fs::remove_file(&filler)?;
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(60))?;
    fleet.shutdown();
    let accepted = agent.metric("fogline_ingest_accepted_total", &[])?;
    let dropped_seen = dropped(&agent)?;
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let stored = agent.export()?.len() as f64;
    // The buffer's own durable count also covers drops made by the final commit during
    // shutdown, after the metric above was read.
    let stats = agent.stats()?;
    let dropped_total = stats["dropped"].as_f64().unwrap_or(-1.0);
    assert!(
        dropped_total >= dropped_seen && dropped_seen > 0.0,
        "buffer counts {dropped_total} dropped, the metric said {dropped_seen}: {stats}"
    );
    // Nothing vanished silently: every accepted reading is stored or counted as dropped.
    assert_eq!(
        stored + dropped_total,
        accepted,
        "stored {stored} + dropped {dropped_total} != accepted {accepted}: {stats}"
    );
    Ok(())
}

//! Promise: the buffer never grows past its configured size. Approaching it, the agent
//! first downsamples the oldest raw readings into window summaries, then drops the oldest
//! data; both are counted in `/metrics`, the newest readings are kept, and ingest (with
//! its end-to-end acks) never stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use fogline_tests::{
    check_sequences, json_payload, metric, now_ms, Agent, AgentOptions, DeviceSpec,
    ExportedReading, Fleet,
};

const MAX_BYTES: u64 = 100_000;
const DEVICES: u32 = 20;
const METRICS: [&str; 3] = ["temp", "hum", "press"];
/// Simulated time between two readings of one device (so each series gets a reading
/// every 3 s: twenty per 60 s downsampling window).
const STEP_MS: i64 = 1_000;
/// Small commits, so that one commit is small against the capacity.
const BATCH_MAX_READINGS: u32 = 256;
/// Allowed overshoot over the capacity while room is being made.
const SLACK: f64 = 1.05;

struct Sample {
    at: Duration,
    bytes: f64,
    downsampled: f64,
    dropped: f64,
    acked: u64,
}

/// Samples `/metrics` every 200 ms until `done` says so or `limit` passes; checks the
/// capacity bound and that acks keep coming on every sample.
fn watch(
    agent: &Agent,
    fleet: &Fleet,
    started: Instant,
    limit: Duration,
    samples: &mut Vec<Sample>,
    done: impl Fn(&Sample) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last_progress = (Instant::now(), fleet.totals().1);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let text = agent.metrics()?;
        let sample = Sample {
            at: started.elapsed(),
            bytes: metric(&text, "fogline_buffer_bytes", &[]),
            downsampled: metric(&text, "fogline_buffer_downsampled_total", &[]),
            dropped: metric(
                &text,
                "fogline_buffer_dropped_total",
                &[("reason", "capacity")],
            ),
            acked: fleet.totals().1,
        };
        let capacity = metric(&text, "fogline_buffer_capacity_bytes", &[]);
        assert_eq!(capacity, MAX_BYTES as f64, "capacity gauge");
        assert!(
            sample.bytes <= MAX_BYTES as f64 * SLACK,
            "buffer holds {} bytes, capacity {MAX_BYTES} (at {:?})",
            sample.bytes,
            sample.at
        );
        if sample.acked > last_progress.1 {
            last_progress = (Instant::now(), sample.acked);
        }
        assert!(
            last_progress.0.elapsed() < Duration::from_secs(3),
            "no new end-to-end ack for 3 s (acked {}, buffer {} bytes, downsampled {}, dropped {})",
            sample.acked,
            sample.bytes,
            sample.downsampled,
            sample.dropped
        );
        let finished = done(&sample);
        samples.push(sample);
        if finished {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let last = samples.last().map(|s| {
                format!(
                    "bytes {} downsampled {} dropped {} acked {}",
                    s.bytes, s.downsampled, s.dropped, s.acked
                )
            });
            anyhow::bail!("condition not reached within {limit:?}; last sample: {last:?}");
        }
    }
}

/// Checks that the export is exactly the offsets `first_offset..next_offset` of `stats`
/// and returns the first one.
fn check_suffix(
    phase: &str,
    export: &[ExportedReading],
    stats: &serde_json::Value,
) -> anyhow::Result<u64> {
    let mut offsets: Vec<u64> = export.iter().map(|r| r.offset).collect();
    offsets.sort_unstable();
    let first = *offsets.first().context("empty export")?;
    let last = *offsets.last().context("empty export")?;
    let next = stats["next_offset"].as_u64().context("stats.next_offset")?;
    assert_eq!(
        last + 1,
        next,
        "phase {phase}: the newest committed reading (offset {}) is not in the export",
        next.saturating_sub(1)
    );
    assert_eq!(
        offsets.len() as u64,
        last - first + 1,
        "phase {phase}: holes in the remaining offsets {first}..={last}"
    );
    assert_eq!(
        stats["first_offset"].as_u64(),
        Some(first),
        "phase {phase}: stats.first_offset"
    );
    Ok(first)
}

#[test]
fn a_full_buffer_downsamples_then_drops_the_oldest_and_keeps_ingesting() {
    let started = Instant::now();
    let mut agent = Agent::start(
        AgentOptions {
            name: Some("capacity-agent".into()),
            ..AgentOptions::default()
        }
        .env("FOGLINE_BUFFER__MAX_BYTES", MAX_BYTES)
        .env("FOGLINE_BUFFER__DOWNSAMPLE_WINDOW_SECS", 60)
        .env("FOGLINE_BUFFER__BATCH_MAX_READINGS", BATCH_MAX_READINGS),
    )
    .expect("the agent starts");
    // Fail by panicking while the agent still exists, so that its log is shown.
    if let Err(e) = scenario(&mut agent, started) {
        panic!("{e:?}");
    }
}

fn scenario(agent: &mut Agent, started: Instant) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    // Readings carry explicit timestamps, oldest first, spread over hours of device time.
    let base_ts = now_ms() - 3 * 3_600_000;
    for d in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("cap-{d:02}"), "temp", 7);
        spec.window = 500;
        spec.max_seq = 2_500;
        let offset = i64::from(d) * 37;
        spec.payload = Arc::new(move |device, boot, seq| {
            let metric = METRICS[seq as usize % METRICS.len()];
            let ts = base_ts + i64::from(seq) * STEP_MS + offset;
            let value = 20.0 + f64::from(seq % 97) / 10.0;
            (
                format!("sensors/{device}/{metric}"),
                json_payload(value, Some(seq), Some(boot), Some(ts)),
            )
        });
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;

    let mut samples = Vec::new();
    watch(
        agent,
        &fleet,
        started,
        Duration::from_secs(30),
        &mut samples,
        |s| s.downsampled > 0.0,
    )?;
    let first_downsampled = samples.len();
    let first = &samples[first_downsampled - 1];
    eprintln!(
        "[{:?}] downsampling started: bytes {} downsampled {} dropped {} acked {}",
        first.at, first.bytes, first.downsampled, first.dropped, first.acked
    );
    watch(
        agent,
        &fleet,
        started,
        Duration::from_secs(30),
        &mut samples,
        |s| s.dropped > 0.0,
    )?;
    let at_drop = samples
        .last()
        .map(|s| (s.at, s.bytes, s.downsampled, s.dropped, s.acked));
    eprintln!("dropping started (at, bytes, downsampled, dropped, acked): {at_drop:?}");
    assert!(
        samples
            .iter()
            .take(first_downsampled - 1)
            .all(|s| s.dropped == 0.0),
        "data was dropped before any was downsampled"
    );

    // Snapshot A of what is stored.
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(20))?;
    let snaps_a = fleet.snapshots();
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let export_a = agent.export()?;
    let stats_a = agent.stats()?;
    eprintln!("stats A: {stats_a}");

    // More data after a restart: older data must keep giving way to newer.
    agent.restart()?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for (d, snap) in snaps_a.iter().enumerate() {
        let mut spec = DeviceSpec::json(snap.device.clone(), "temp", 8);
        spec.window = 500;
        spec.max_seq = 1_000;
        let offset = i64::try_from(d)? * 37;
        let resume_ts = base_ts + i64::from(snap.sent + 1) * STEP_MS;
        spec.payload = Arc::new(move |device, boot, seq| {
            let metric = METRICS[seq as usize % METRICS.len()];
            let ts = resume_ts + i64::from(seq) * STEP_MS + offset;
            (
                format!("sensors/{device}/{metric}"),
                json_payload(30.0, Some(seq), Some(boot), Some(ts)),
            )
        });
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    // Counters may restart from zero with the process: compare with what it says now.
    let dropped_before = agent.metric("fogline_buffer_dropped_total", &[("reason", "capacity")])?;
    let mut samples_b = Vec::new();
    watch(
        agent,
        &fleet,
        started,
        Duration::from_secs(30),
        &mut samples_b,
        |s| s.dropped > dropped_before && s.acked >= 20 * u64::from(DEVICES),
    )?;
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(20))?;
    let snaps_b = fleet.snapshots();
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let export_b = agent.export()?;
    let stats_b = agent.stats()?;
    eprintln!("stats B: {stats_b}");

    for stats in [&stats_a, &stats_b] {
        let bytes = stats["bytes"].as_f64().unwrap_or(f64::MAX);
        assert!(bytes <= MAX_BYTES as f64 * SLACK, "stats bytes {bytes}");
        assert!(stats["downsampled"].as_u64().unwrap_or(0) > 0, "{stats}");
        assert!(stats["rollups"].as_u64().unwrap_or(0) > 0, "{stats}");
    }
    assert!(stats_b["dropped"].as_u64().unwrap_or(0) > 0, "{stats_b}");
    assert_eq!(stats_a["readings"].as_u64(), Some(export_a.len() as u64));
    assert_eq!(stats_b["readings"].as_u64(), Some(export_b.len() as u64));

    // The oldest are gone, never the newest: what is left of the log is one contiguous
    // run of offsets that ends with the last reading committed...
    eprintln!(
        "export A: {} readings, export B: {} readings",
        export_a.len(),
        export_b.len()
    );
    let min_a = check_suffix("A", &export_a, &stats_a)?;
    let min_b = check_suffix("B", &export_b, &stats_b)?;
    assert!(min_a > 0, "some of the oldest readings gave way in phase A");
    assert!(min_b > min_a, "the oldest remaining offset moves on");
    // ...and, per device, a contiguous run of its sequence numbers that ends with the
    // last one it sent (a device whose readings all came early may have none left).
    for (phase, export, snaps, boot) in
        [("A", &export_a, &snaps_a, 7), ("B", &export_b, &snaps_b, 8)]
    {
        let sent: Vec<u32> = snaps.iter().map(|s| s.sent).collect();
        eprintln!(
            "phase {phase}: readings sent per device from {} to {}",
            sent.iter().min().unwrap_or(&0),
            sent.iter().max().unwrap_or(&0)
        );
        for snap in snaps.iter() {
            let mut seqs: Vec<u32> = export
                .iter()
                .filter(|r| r.device == snap.device && r.boot == boot)
                .filter_map(|r| r.seq)
                .collect();
            seqs.sort_unstable();
            let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
                continue;
            };
            assert_eq!(
                last, snap.sent,
                "phase {phase}: {} kept older readings but not its newest",
                snap.device
            );
            assert_eq!(
                seqs.len() as u32,
                last - first + 1,
                "phase {phase}: {} has holes in {first}..={last}",
                snap.device
            );
        }
    }
    for a in &snaps_a {
        let first_seq_a = export_a
            .iter()
            .filter(|r| r.device == a.device)
            .filter_map(|r| r.seq)
            .min();
        let still_boot7 = export_b
            .iter()
            .filter(|r| r.device == a.device && r.boot == 7)
            .filter_map(|r| r.seq)
            .min();
        if let (Some(x), Some(y)) = (first_seq_a, still_boot7) {
            assert!(y >= x, "{}: older readings reappeared", a.device);
        }
    }
    let dups = check_sequences(&export_b, &[]);
    assert!(dups.is_empty(), "{}", dups.join("\n"));
    Ok(())
}

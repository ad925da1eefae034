//! Promise: during a long cloud outage a peer's replica of another agent's log gets the
//! room `buffer.max_bytes` gives it, no more: its oldest readings are folded into
//! summaries (as the origin's own full buffer does) and, if summaries alone are too many,
//! dropped — counted in `fogline_replica_downsampled_total` / `_dropped_total` — so
//! `replicas.redb` cannot fill the disk and push the agent into dropping its own readings
//! as `disk_full`. When the link returns the gateway gets every offset of every origin,
//! as a reading or inside a summary.
//!
//! Before, the budget existed only on paper: `Store::trim` ran in a unit test only, the
//! dropped counter never moved, and the replica store grew without bound.

use std::sync::Arc;
use std::time::Duration;

use fogline_tests::{json_payload, now_ms, poll_until, DeviceSpec, Fleet, Site, SiteOptions};

const MAX_BYTES: u64 = 24 * 1024;

#[test]
fn a_replica_over_its_budget_is_downsampled_and_still_reaches_the_gateway() -> anyhow::Result<()> {
    let opts = SiteOptions::new("site-rb", 2)
        .env("FOGLINE_BUFFER__MAX_BYTES", MAX_BYTES)
        .env("FOGLINE_BUFFER__BATCH_MAX_READINGS", 200)
        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000);
    let mut site = Site::start(&opts)?;
    site.cut_cloud();
    site.wait_leader(Duration::from_secs(20), &[], &[0, 1])?;
    // One device on a1, with readings stamped over the past hours.
    let mut fleet = Fleet::new(site.agents[0].mqtt_addr())?;
    let base = now_ms() - 6 * 3_600_000;
    let mut spec = DeviceSpec::json("rb-1", "temp", 5);
    spec.window = 400;
    spec.max_seq = 8_000;
    spec.payload = Arc::new(move |device, boot, seq| {
        let ts = base + i64::from(seq) * 2_000;
        (
            format!("sensors/{device}/temp"),
            json_payload(
                20.0 + f64::from(seq % 50) / 10.0,
                Some(seq),
                Some(boot),
                Some(ts),
            ),
        )
    });
    let device = fleet.add(spec)?;
    fleet.wait_connected(Duration::from_secs(10))?;
    let trimmed = poll_until(Duration::from_secs(90), Duration::from_millis(250), || {
        let m = site.agents[1].metrics().ok()?;
        let n = fogline_tests::metric(&m, "fogline_replica_downsampled_total", &[])
            + fogline_tests::metric(&m, "fogline_replica_dropped_total", &[]);
        (n > 0.0 && device.snapshot().sent >= 8_000).then_some(n)
    });
    anyhow::ensure!(
        trimmed.is_some(),
        "a2's replica of a1 never kept its budget:\n{}",
        site.agents[1].metrics()?
    );
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let sent = device.snapshot().sent;
    fleet.shutdown();
    for (i, a) in site.agents.iter().enumerate() {
        let m = a.metrics()?;
        let disk_full = fogline_tests::metric(
            &m,
            "fogline_buffer_dropped_total",
            &[("reason", "disk_full")],
        );
        assert_eq!(
            disk_full,
            0.0,
            "a{} dropped its own readings as disk_full",
            i + 1
        );
    }
    for (i, a) in site.agents.iter().enumerate() {
        let m = a.metrics()?;
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.starts_with("fogline_replica_d")
                    || l.starts_with("fogline_buffer_downsampled")
                    || l.starts_with("fogline_buffer_dropped")
            })
            .collect();
        eprintln!(
            "a{}: role {} {}",
            i + 1,
            a.status()?["role"],
            lines.join(" ")
        );
    }
    let replicas = std::fs::metadata(site.agents[1].data_dir().join("replicas.redb"))?.len();
    eprintln!("a2's replicas.redb: {replicas} bytes after {sent} readings of a1");

    site.restore_cloud();
    let heads = site.known_heads()?;
    site.wait_gateway_has(&heads, Duration::from_secs(60))?;
    let origin_a1 = site.origin(0)?;
    site.stop()?;
    let stored = site.gateway.export()?;
    let summaries = site.gateway.export_summaries()?;
    let stats = site.gateway.stats()?;
    let skipped: u64 = stats
        .iter()
        .filter(|o| o["origin"] == origin_a1.as_str())
        .map(|o| o["skipped_at_edge"].as_u64().unwrap_or(0))
        .sum();
    let mut spans: Vec<(u64, u64)> = summaries
        .iter()
        .filter(|s| s["origin"] == origin_a1.as_str())
        .filter_map(|s| Some((s["from_offset"].as_u64()?, s["to_offset"].as_u64()?)))
        .collect();
    spans.sort_unstable();
    spans.dedup();
    spans.extend(
        stored
            .iter()
            .filter(|r| r.origin == origin_a1)
            .map(|r| (r.offset, r.offset + 1)),
    );
    spans.sort_unstable();
    let mut covered = 0;
    let mut holes = 0;
    for (from, to) in &spans {
        holes += from.saturating_sub(covered);
        covered = covered.max(*to);
    }
    let head = heads
        .iter()
        .find(|(o, _)| *o == origin_a1)
        .map_or(0, |(_, h)| *h);
    eprintln!(
        "gateway: a1's log covered to {covered} of {head}, {} summaries, {} readings, \
         {holes} offsets missing, {skipped} announced skipped",
        spans.len(),
        stored.iter().filter(|r| r.origin == origin_a1).count()
    );
    assert_eq!(covered, head, "the gateway has a1's log to its head");
    assert_eq!(
        holes, skipped,
        "every offset missing was announced as dropped"
    );
    let summarised: u64 = summaries
        .iter()
        .filter(|s| s["origin"] == origin_a1.as_str())
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    assert!(summarised > 0, "summaries reached the gateway");
    Ok(())
}

//! Promise: when a long outage fills the buffer and the agent folds its oldest readings
//! into per-minute summaries, those summaries still reach the gateway — stored, exported
//! and (where no newer aggregate is kept) republished — in place of the readings they
//! replaced. Every offset of the origin's log arrives at the gateway as a reading or as
//! part of a summary; none is reported skipped.
//!
//! Before, summaries were write-only: `buffer export` had raw readings only, the uplink
//! never shipped summaries, and the gateway counted their offsets as skipped at the edge.
//! The agent is restarted before the link returns, so it holds no live aggregate of the
//! device whose readings were summarised: only the summaries can show that device at the
//! gateway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_tests::{
    json_payload, mosquitto, now_ms, poll_until, Agent, AgentOptions, DeviceSpec, Fleet, Gateway,
    TcpProxy,
};

const SITE: &str = "site-ds";
const NODE: &str = "edge-ds";
const MAX_BYTES: u64 = 24 * 1024;

#[test]
fn summaries_of_a_full_buffer_reach_the_gateway() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut gw = Gateway::start(&[])?;
    let proxy = TcpProxy::start(gw.mqtt_addr())?;
    proxy.cut();
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000)
            .env("FOGLINE_NODE__SITE", SITE)
            .env("FOGLINE_NODE__ID", NODE)
            .env("FOGLINE_BUFFER__MAX_BYTES", MAX_BYTES)
            .env("FOGLINE_BUFFER__BATCH_MAX_READINGS", 200),
    )?;
    // Readings stamped over the past hours, a reading every 2 s of device time.
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    let base = now_ms() - 6 * 3_600_000;
    let mut spec = DeviceSpec::json("ds-old", "temp", 3);
    spec.window = 400;
    spec.max_seq = 6_000;
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
    let downsampled = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let n = agent.metric("fogline_buffer_downsampled_total", &[]).ok()?;
        (n > 0.0 && device.snapshot().sent >= 6_000).then_some(n)
    });
    anyhow::ensure!(
        downsampled.is_some(),
        "the buffer never downsampled: {}",
        agent.metrics()?
    );
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let sent = device.snapshot().sent;
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let edge_summaries = agent.export_summaries()?;
    let edge_readings = agent.export()?;
    let summarised: u64 = edge_summaries
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    let stats = agent.stats()?;
    let dropped = stats["dropped"].as_u64().unwrap_or(0);
    eprintln!(
        "edge: {} readings raw, {summarised} in {} summaries, {dropped} dropped, of {sent}",
        edge_readings.len(),
        edge_summaries.len()
    );
    assert!(summarised > 0, "buffer export shows the summaries");
    assert_eq!(
        edge_readings.len() as u64 + summarised + dropped,
        u64::from(sent),
        "every reading is raw, summarised or dropped at the edge"
    );
    assert!(edge_summaries
        .iter()
        .all(|s| s["from_offset"].is_u64() && s["window_secs"] == 60));

    // Back without live aggregates of ds-old, then the link returns.
    agent.restart()?;
    proxy.restore();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.next_offset(SITE, NODE)? < head {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway did not catch up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let agg = mosquitto::subscribe_one(gw.mqtt_port(), &format!("agg/{SITE}/ds-old/temp/60s"), 10)?;
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;

    let stored = gw.export()?;
    let summaries = gw.export_summaries()?;
    let at_gateway: u64 = summaries
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "gateway: {} readings, {at_gateway} in {} summaries",
        stored.len(),
        summaries.len()
    );
    assert_eq!(at_gateway, summarised, "every summary reached the gateway");
    assert_eq!(stored.len(), edge_readings.len(), "and every raw reading");
    let stats = gw.stats()?;
    let origin = stats
        .iter()
        .find(|o| o["site"] == SITE)
        .ok_or_else(|| anyhow::anyhow!("no origin of {SITE} at the gateway: {stats:?}"))?;
    assert_eq!(origin["skipped_at_edge"], dropped, "{origin}");
    assert!(
        origin["downsampled_at_edge"].as_u64().unwrap_or(0) > 0,
        "{origin}"
    );
    // Offsets: summaries first, then readings, from 0 to the head without a hole (but for
    // what was dropped at the edge, announced as skipped).
    let mut spans: Vec<(u64, u64)> = summaries
        .iter()
        .filter_map(|s| Some((s["from_offset"].as_u64()?, s["to_offset"].as_u64()?)))
        .collect();
    spans.sort_unstable();
    spans.dedup();
    spans.extend(stored.iter().map(|r| (r.offset, r.offset + 1)));
    let mut covered = dropped;
    for (from, to) in &spans {
        anyhow::ensure!(
            *from == covered,
            "offset {covered} missing at the gateway: {spans:?}"
        );
        covered = *to;
    }
    assert_eq!(covered, head);
    // The republished summary is the only aggregate of the device there.
    let agg: serde_json::Value = serde_json::from_str(
        &agg.ok_or_else(|| anyhow::anyhow!("no aggregate of ds-old at the gateway"))?,
    )?;
    assert_eq!(agg["downsampled"], true, "{agg}");
    Ok(())
}

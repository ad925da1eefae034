//! Promise: while the link to the gateway is down the site keeps ingesting and acking,
//! and when the link returns the gateway gets every reading acked at the edge exactly
//! once and in per-origin order. Bridges that users run today lose or duplicate here.

use std::time::{Duration, Instant};

use fogline_tests::{
    check_gateway_log, test_seed, Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy,
};

const DEVICES: u32 = 4;
const OUTAGE: Duration = Duration::from_secs(20);

#[test]
fn a_20s_outage_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let seed = test_seed("uplink_outage");
    let mut gw = Gateway::start(&[])?;
    let proxy = TcpProxy::start(gw.mqtt_addr())?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 2000)
            .env("FOGLINE_NODE__SITE", "site-a")
            .env("FOGLINE_NODE__ID", "edge-1"),
    )?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("out-{i}"), "temp", 7 + i + (seed % 100) as u32);
        spec.interval = Some(Duration::from_millis(2));
        spec.window = 200;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    let before = gw.next_offset("site-a", "edge-1")?;
    assert!(before > 0, "the uplink forwards while the link is up");

    proxy.cut();
    let cut_at = Instant::now();
    let mut acked_samples = vec![fleet.totals().1];
    let mut saw_down = false;
    while cut_at.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_secs(1));
        acked_samples.push(fleet.totals().1);
        let status = agent.status()?;
        saw_down |= status["backlog"]["gateway"]["link"] != "connected";
    }
    let during = gw.next_offset("site-a", "edge-1")?;
    proxy.restore();
    eprintln!(
        "outage: gateway at {before} before, {during} after; edge acks per second: {:?}",
        acked_samples
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect::<Vec<_>>()
    );
    assert!(saw_down, "the agent noticed the link was down");
    // Acks keep coming throughout (sampled each second; any two-second span must show
    // progress, so a busy machine's scheduling hiccup is not mistaken for a pause).
    assert!(
        acked_samples.windows(3).all(|w| w[2] > w[0]),
        "edge ingest paused during the outage: {acked_samples:?}"
    );

    std::thread::sleep(Duration::from_secs(2));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.next_offset("site-a", "edge-1")? < head {
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained_in = cut_at.elapsed() - OUTAGE;
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;

    let stored = gw.export()?;
    eprintln!(
        "{} readings at the gateway, {head} at the edge, caught up {:.1}s after the link returned",
        stored.len(),
        drained_in.as_secs_f64()
    );
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let mut problems = check_gateway_log(&stored, &sent);
    for o in gw.skipped_at_edge()? {
        problems.push(format!("readings skipped at the edge: {o}"));
    }
    assert!(
        problems.is_empty(),
        "seed {seed}:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(
        stored.len() as u64,
        head,
        "every reading of the origin, once"
    );
    Ok(())
}

//! Promise: killing the gateway or the agent with SIGKILL in the middle of draining a
//! backlog loses nothing and duplicates nothing: the agent resends from the gateway's
//! durable ack, and the gateway recognises what it already has by its offsets.

use std::time::{Duration, Instant};

use fogline_tests::{
    check_gateway_log, test_seed, Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy,
};

fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn sigkill_of_gateway_and_agent_mid_drain_keeps_exactly_once() -> anyhow::Result<()> {
    let seed = test_seed("uplink_kill");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut gw = Gateway::start(&[])?;
    let proxy = TcpProxy::start(gw.mqtt_addr())?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
            .env("FOGLINE_UPLINK__DRAIN_RATE", 4000)
            .env("FOGLINE_UPLINK__BATCH_READINGS", 500)
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 100)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000)
            .env("FOGLINE_NODE__SITE", "site-k")
            .env("FOGLINE_NODE__ID", "edge-k"),
    )?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..3 {
        let mut spec = DeviceSpec::json(format!("kill-{i}"), "temp", 1 + i);
        spec.interval = Some(Duration::from_millis(1));
        spec.window = 200;
        spec.max_seq = 12_000;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    // Build a backlog behind a cut link.
    proxy.cut();
    std::thread::sleep(Duration::from_secs(6));
    proxy.restore();
    let progress = || gw.next_offset("site-k", "edge-k");
    wait_until("drain started", Duration::from_secs(20), || {
        Ok(progress()? > 0)
    })?;
    std::thread::sleep(Duration::from_millis(rng.u64(200..1500)));

    let at = gw.next_offset("site-k", "edge-k")?;
    gw.kill9()?;
    eprintln!("SIGKILL gateway at offset {at}");
    std::thread::sleep(Duration::from_millis(rng.u64(100..800)));
    gw.restart()?;
    wait_until(
        "drain resumed after the gateway restart",
        Duration::from_secs(30),
        || Ok(gw.next_offset("site-k", "edge-k")? > at),
    )?;
    std::thread::sleep(Duration::from_millis(rng.u64(200..1500)));

    let at = gw.next_offset("site-k", "edge-k")?;
    agent.kill9()?;
    eprintln!("SIGKILL agent at gateway offset {at}");
    std::thread::sleep(Duration::from_millis(rng.u64(100..800)));
    agent.restart()?;
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(60))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    wait_until("the gateway caught up", Duration::from_secs(90), || {
        Ok(gw.next_offset("site-k", "edge-k")? >= head)
    })?;
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;

    let stored = gw.export()?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    eprintln!(
        "{} readings at the gateway, {head} at the edge",
        stored.len()
    );
    let mut problems = check_gateway_log(&stored, &sent);
    for o in gw.skipped_at_edge()? {
        problems.push(format!("readings skipped at the edge: {o}"));
    }
    assert!(
        problems.is_empty(),
        "seed {seed}:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(stored.len() as u64, head);
    Ok(())
}

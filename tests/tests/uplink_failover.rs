//! Promise: an agent given several gateways (`uplink.gateway = "a,b"`) keeps forwarding
//! when one of them is unreachable: it moves to the next one in the list, quickly, and
//! round the list back to the first; the gateway's store gets every reading once, in
//! order. Here the two "gateways" are two proxies in front of one gateway, as two
//! front ends of one store would be.

use std::time::{Duration, Instant};

use fogline_tests::{
    check_gateway_log, test_seed, Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy,
};

const DEVICES: u32 = 2;

/// Waits until `/status` shows the uplink connected to `addr`; returns its failovers.
fn wait_connected_to(agent: &Agent, addr: &str, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        let status = agent.status()?;
        let g = &status["backlog"]["gateway"];
        if g["link"] == "connected" && g["address"] == addr {
            return Ok(g["failovers"].as_u64().unwrap_or(0));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not connected to {addr} within {within:?}: {g}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_uplink_fails_over_round_its_gateways_and_loses_nothing() -> anyhow::Result<()> {
    let seed = test_seed("uplink_failover");
    let mut gw = Gateway::start(&[])?;
    let a = TcpProxy::start(gw.mqtt_addr())?;
    let b = TcpProxy::start(gw.mqtt_addr())?;
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    // The first gateway is down from the start.
    a.cut();
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", format!("{a_addr},{b_addr}"))
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 2000)
            .env("FOGLINE_NODE__SITE", "site-f")
            .env("FOGLINE_NODE__ID", "edge-1"),
    )?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("fo-{i}"), "temp", 3 + i + (seed % 100) as u32);
        spec.interval = Some(Duration::from_millis(5));
        spec.window = 100;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;

    let failovers = wait_connected_to(&agent, &b_addr, Duration::from_secs(10))?;
    assert!(failovers >= 1, "moved from the first gateway to the second");
    assert_eq!(
        agent.status()?["backlog"]["gateway"]["addresses"],
        serde_json::json!([a_addr, b_addr]),
        "the status lists the gateways in order"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        gw.next_offset("site-f", "edge-1")? > 0,
        "forwarding via the second"
    );

    // The second goes down while connected, the first is back: round the list, quickly
    // (the first switch after a healthy connection waits about backoff_min_ms).
    a.restore();
    b.cut();
    let cut_at = Instant::now();
    let after = wait_connected_to(&agent, &a_addr, Duration::from_secs(5))?;
    eprintln!(
        "back on the first gateway {:.1}s after the second went down ({after} failovers)",
        cut_at.elapsed().as_secs_f64()
    );
    assert!(after > failovers);

    std::thread::sleep(Duration::from_secs(1));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.next_offset("site-f", "edge-1")? < head {
        anyhow::ensure!(Instant::now() < deadline, "the backlog did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metric = agent.metric("fogline_uplink_failovers", &[])?;
    assert!(
        metric >= after as f64,
        "fogline_uplink_failovers = {metric}"
    );
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;

    let stored = gw.export()?;
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

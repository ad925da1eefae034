//! Promise: an ack the gateway never gave deletes nothing at the edge. A client that can
//! reach the gateway publishes, retained, `{"next":1000000000}` on an agent's ack topic
//! while the agent's link is down (the attack that made agents delete 1,500 of 2,000
//! readings the cloud never had); when the link heals the agent refuses the ack (it is
//! beyond anything it ever wrote), counts it, and the gateway still gets every reading
//! acknowledged at the edge exactly once.

use std::time::{Duration, Instant};

use fogline_tests::mosquitto::{self, Message};
use fogline_tests::{check_gateway_log, Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy};

const DEVICES: u32 = 2;

#[test]
fn a_forged_ack_at_the_gateway_deletes_nothing_at_the_edge() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut gw = Gateway::start(&[])?;
    let proxy = TcpProxy::start(gw.mqtt_addr())?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000)
            // Deleted as soon as the gateway acks: a believed forgery would delete at once.
            .env("FOGLINE_UPLINK__RETENTION_SECS", 0)
            .env("FOGLINE_NODE__SITE", "site-a")
            .env("FOGLINE_NODE__ID", "edge-1"),
    )?;
    let origin = agent.status()?["origin"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!origin.is_empty(), "the agent reports its origin");

    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("forge-{i}"), "temp", 11 + i);
        spec.interval = Some(Duration::from_millis(4));
        spec.window = 100;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.next_offset("site-a", &origin)? < 500 {
        assert!(
            Instant::now() < deadline,
            "500 readings did not reach the gateway"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The link goes down; the edge keeps acknowledging.
    proxy.cut();
    let cut_head = fleet.totals().1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.totals().1 < cut_head + 1000 {
        assert!(Instant::now() < deadline, "the edge did not ack 1,000 more");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The forgery, retained on the agent's ack topic at the gateway.
    let ack_topic = format!("fogline/uplink/site-a/{origin}/ack");
    mosquitto::publish_retained(
        gw.mqtt_port(),
        &ack_topic,
        Message::Text(r#"{"next":1000000000}"#),
    )?;
    proxy.restore();

    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.metric("fogline_uplink_acks_refused", &[])? < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the forged ack was not refused and counted; agent log:\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    std::thread::sleep(Duration::from_secs(1));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.next_offset("site-a", &origin)? < head {
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain after the forged ack: gateway at {}, edge head {head}",
            gw.next_offset("site-a", &origin)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = agent.metric("fogline_uplink_acks_refused", &[])?;
    agent.stop(Duration::from_secs(10))?;
    gw.stop(Duration::from_secs(10))?;

    let stored = gw.export()?;
    eprintln!(
        "{} readings at the gateway, {head} at the edge; {refused} ack(s) refused",
        stored.len()
    );
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let mut problems = check_gateway_log(&stored, &sent);
    for o in gw.skipped_at_edge()? {
        problems.push(format!("readings skipped at the edge: {o}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n  "));
    assert_eq!(
        stored.len() as u64,
        head,
        "every reading of the origin, once"
    );
    Ok(())
}

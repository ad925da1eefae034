//! Promise: nothing a client publishes at the gateway can make the edge forget readings
//! the cloud does not have. In a lab gateway (no TLS: any client may ship batches), with
//! an agent uplinking readings:
//!
//! - a forged ack, `{"next":1000000000}` retained on the agent's ack topic by
//!   `mosquitto_pub` (the attack that made agents delete 1,500 of 2,000 readings the
//!   cloud never had), is refused by the gateway: only the gateway publishes acks;
//! - a forged batch, a real batch of the agent's captured with `mosquitto_sub` and sent
//!   again by `mosquitto_pub` claiming offsets from 10^15 on (after which every real batch
//!   would have been taken for a duplicate, and acked), is refused as implausible;
//!
//! both are counted; the agent never sees a forged ack, and the gateway still gets every
//! reading acknowledged at the edge exactly once.

use std::time::{Duration, Instant};

use fogline_tests::mosquitto::{self, Message};
use fogline_tests::{
    check_gateway_log, run_bounded, Agent, AgentOptions, DeviceSpec, Fleet, Gateway,
};
use serde::{Deserialize, Serialize};

const DEVICES: u32 = 2;
const REFUSED: &str = "fogline_gateway_connections_refused_total";
const BATCHES: &str = "fogline_gateway_batches_total";

/// The uplink's batch frame, as the agent encodes it (a version byte, then postcard).
#[derive(Serialize, Deserialize)]
struct BatchFrame {
    start: u64,
    first_offset: u64,
    block: Vec<u8>,
}

fn hex_decode(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex = hex.trim();
    anyhow::ensure!(hex.len() % 2 == 0, "odd hex length");
    (0..hex.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&hex[i..i + 2], 16)?))
        .collect()
}

/// One real batch of `site`'s uplink, as the gateway's subscribers see it: topic, bytes.
fn capture_batch(port: u16, site: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let mut cmd = std::process::Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-C",
        "1",
        "-W",
        "20",
    ])
    .args(["-F", "%t %x", "-t", &format!("fogline/uplink/{site}/+/log")]);
    let out = run_bounded(&mut cmd, Duration::from_secs(30))?;
    anyhow::ensure!(
        out.status.success(),
        "no batch captured: {}",
        out.stderr.trim()
    );
    let (topic, hex) = out
        .stdout
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("unexpected mosquitto_sub output {:?}", out.stdout))?;
    Ok((topic.to_owned(), hex_decode(hex)?))
}

#[test]
fn forged_acks_and_batches_at_the_gateway_change_nothing_at_the_edge() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut gw = Gateway::start(&[])?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr())
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

    // The forged batch: a real one, claiming offsets from 10^15 on.
    let (topic, bytes) = capture_batch(gw.mqtt_port(), "site-a")?;
    let (version, body) = bytes
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("an empty batch"))?;
    let mut frame: BatchFrame = postcard::from_bytes(body)?;
    frame.start = 0;
    frame.first_offset = 1_000_000_000_000_000;
    let mut forged = vec![*version];
    forged.extend(postcard::to_allocvec(&frame)?);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("forged.bin");
    std::fs::write(&file, &forged)?;
    mosquitto::publish(gw.mqtt_port(), &topic, Message::File(&file))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric(BATCHES, &[("result", "implausible")])? < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the forged batch was not refused; gateway log:\n{}",
            gw.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The forged ack, retained on the agent's ack topic: the gateway ends that client's
    // connection (whatever mosquitto_pub reports) and counts it.
    let ack_topic = format!("fogline/uplink/site-a/{origin}/ack");
    let mut forge = mosquitto::pub_command(gw.mqtt_port(), &ack_topic);
    forge.args(["-r", "-m", r#"{"next":1000000000}"#]);
    let _ = run_bounded(&mut forge, Duration::from_secs(15))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric(REFUSED, &[("reason", "foreign_topic")])? < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the forged ack was not refused; gateway log:\n{}",
            gw.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let retained = mosquitto::subscribe_one(gw.mqtt_port(), &ack_topic, 5)?.unwrap_or_default();
    let next: serde_json::Value = serde_json::from_str(&retained)?;
    let next = next["next"].as_u64().unwrap_or(u64::MAX);
    assert!(
        next < 1_000_000,
        "the ack kept at the gateway is its own, not the forgery: {retained}"
    );
    assert!(
        gw.log_tail(200).contains("foreign_topic"),
        "the refusal is logged:\n{}",
        gw.log_tail(40)
    );

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
            "the backlog did not drain after the forgeries: gateway at {}, edge head {head}",
            gw.next_offset("site-a", &origin)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = agent.metric("fogline_uplink_acks_refused", &[])?;
    assert_eq!(refused, 0.0, "no forged ack reached the agent");
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

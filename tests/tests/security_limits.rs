//! Limits (issue 8). The story: one broken or hostile sensor floods the agent, another
//! sends oversized and garbage payloads, and new device ids keep appearing. Each of those
//! is refused and counted by reason, and the well-behaved devices' readings all arrive,
//! every sequence number once.

use std::time::Duration;

use fogline_tests::secure::pub_lines;
use fogline_tests::{check_sequences, metric, mosquitto, poll_until, Agent, AgentOptions};

const REJECTED: &str = "fogline_ingest_rejected_total";

#[test]
fn floods_oversize_garbage_and_extra_devices_are_refused_while_others_flow() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_LIMITS__DEVICE_RATE", 20)
            .env("FOGLINE_LIMITS__DEVICE_BURST", 100)
            .env("FOGLINE_LIMITS__MAX_DEVICES", 3)
            .env("FOGLINE_INGEST__MAX_PAYLOAD_BYTES", 256),
    )?;
    let port = agent.mqtt_port();
    let json = |seq: u32| format!("{{\"value\":{seq}.5,\"seq\":{seq},\"boot\":1}}");

    // The flood: 2,000 readings as fast as mosquitto_pub sends them.
    let flood: Vec<String> = (1..=2000).map(json).collect();
    let flooder = std::thread::spawn(move || pub_lines(port, None, "sensors/flood/temp", &flood));
    // Meanwhile two good devices send 80 readings each (within their burst).
    let good: Vec<String> = (1..=80).map(json).collect();
    for device in ["good-1", "good-2"] {
        let status = pub_lines(port, None, &format!("sensors/{device}/temp"), &good)?;
        assert!(status.success(), "{device}: mosquitto_pub failed");
    }
    let flood_status = flooder
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    assert!(flood_status.success());
    // Oversized and garbage from good-1's neighbour, and a fourth device.
    let big = format!("{{\"value\":1,\"pad\":\"{}\"}}", "x".repeat(400));
    mosquitto::publish(port, "sensors/good-1/temp", mosquitto::Message::Text(&big))?;
    mosquitto::publish(
        port,
        "sensors/good-1/temp",
        mosquitto::Message::Text("not a number"),
    )?;
    mosquitto::publish(port, "sensors/extra/temp", mosquitto::Message::Text("1.0"))?;

    let seen = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let m = agent.metrics().ok()?;
        let r = |reason| metric(&m, REJECTED, &[("reason", reason)]);
        (r("rate_limited") >= 1.0
            && r("oversized") >= 1.0
            && r("malformed_payload") >= 1.0
            && r("too_many_devices") >= 1.0)
            .then_some(m)
    });
    let m = seen.ok_or_else(|| {
        anyhow::anyhow!(
            "refusals not counted:\n{}",
            agent.metrics().unwrap_or_default()
        )
    })?;
    let rate_limited = metric(&m, REJECTED, &[("reason", "rate_limited")]);
    assert!(
        rate_limited >= 1000.0,
        "most of the flood is refused: {rate_limited}"
    );
    let log = agent.log_tail(400);
    assert!(
        log.contains("reason=\"rate_limited\"") || log.contains("rate_limited"),
        "{log}"
    );

    // The good devices' acks cover everything they sent.
    for device in ["good-1", "good-2"] {
        let ack = mosquitto::subscribe_one(port, &format!("fogline/ack/{device}"), 10)?;
        assert_eq!(ack.as_deref(), Some("{\"boot\":1,\"seq\":80}"), "{device}");
    }
    agent.stop(Duration::from_secs(30))?;
    let readings = agent.export()?;
    let problems = check_sequences(
        &readings,
        &[("good-1".to_owned(), 1, 80), ("good-2".to_owned(), 1, 80)],
    );
    assert!(problems.is_empty(), "{problems:?}");
    assert!(!readings.iter().any(|r| r.device == "extra"));
    let flood_stored = readings.iter().filter(|r| r.device == "flood").count();
    assert!(
        flood_stored < 1000,
        "the flood was held to its rate: {flood_stored} stored"
    );
    Ok(())
}

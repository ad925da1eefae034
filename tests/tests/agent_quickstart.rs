//! Promise: the agent runs with no config file at all, and an operator with nothing but
//! `mosquitto_pub` / `mosquitto_sub` can send a plain number, a JSON reading and a
//! firmware postcard frame, see them aggregated on the retained `agg/.../60s` topic, see
//! the end-to-end ack, and find exactly those readings in `buffer export` afterwards.

use std::time::Duration;

use anyhow::Context;
use fogline_firmware::wire::Timestamp;
use fogline_tests::mosquitto::{self, Message};
use fogline_tests::{now_ms, poll_until, postcard_frame, run_bounded, Agent, AgentOptions};

const DEVICE: &str = "qs-dev";
const METRIC: &str = "temp";

#[test]
fn config_defaults_prints_the_built_in_toml() -> anyhow::Result<()> {
    let bin = fogline_tests::agent_bin()?;
    let out = run_bounded(
        std::process::Command::new(&bin).args(["config", "defaults"]),
        Duration::from_secs(20),
    )?;
    assert!(
        out.status.success(),
        "config defaults failed: {}",
        out.stderr
    );
    assert!(
        out.stdout.contains("[buffer]"),
        "no [buffer] section in:\n{}",
        out.stdout
    );
    let table: toml::Table = out
        .stdout
        .parse()
        .context("`config defaults` is not valid TOML")?;
    for section in ["node", "mqtt", "http", "ingest", "buffer", "aggregate"] {
        assert!(
            table.contains_key(section),
            "no [{section}] in the defaults"
        );
    }
    Ok(())
}

#[test]
fn three_payload_kinds_are_aggregated_acked_and_exported() {
    mosquitto::require_clients().expect("mosquitto-clients are installed");
    // No config file: only ports and the data dir (set by the harness) and a faster
    // aggregate publish interval so the test does not wait long.
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 200)
            .env("FOGLINE_LOG__LEVEL", "debug"),
    )
    .expect("the agent starts");
    // Fail by panicking while the agent still exists, so that its log is shown.
    if let Err(e) = scenario(&mut agent) {
        panic!("{e:?}");
    }
}

fn scenario(agent: &mut Agent) -> anyhow::Result<()> {
    let port = agent.mqtt_port();

    // All three readings must land in the same 60 s window: keep clear of its end.
    let into_minute = now_ms().rem_euclid(60_000);
    if into_minute > 50_000 {
        let wait = u64::try_from(60_000 - into_minute + 200).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(wait));
    }

    let topic = format!("sensors/{DEVICE}/{METRIC}");
    mosquitto::publish(port, &topic, Message::Text("20"))?;
    let json = format!(r#"{{"value":22.5,"seq":1,"boot":7,"ts":{}}}"#, now_ms());
    mosquitto::publish(port, &topic, Message::Text(&json))?;
    let now = u64::try_from(now_ms()).context("clock before 1970")?;
    let frame = postcard_frame(DEVICE, METRIC, 2, 7, Timestamp::WallMs(now), 27.5)?;
    let frame_file = agent.root().join("frame.bin");
    std::fs::write(&frame_file, &frame)?;
    mosquitto::publish(port, &topic, Message::File(&frame_file))?;

    // The retained 60 s aggregate eventually covers all three.
    let agg_topic = format!("agg/{DEVICE}/{METRIC}/60s");
    let mut last_seen = None;
    let agg = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let text = mosquitto::subscribe_one(port, &agg_topic, 2).ok()??;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        last_seen = Some(text);
        (value["count"].as_u64() == Some(3)).then_some(value)
    })
    .with_context(|| {
        format!("no aggregate with count 3 on {agg_topic} within 20 s; last seen: {last_seen:?}")
    })?;
    eprintln!("aggregate: {agg}");
    let num = |k: &str| {
        agg[k]
            .as_f64()
            .with_context(|| format!("aggregate field {k} missing or not a number: {agg}"))
    };
    assert_eq!(agg["device"], DEVICE);
    assert_eq!(agg["metric"], METRIC);
    assert_eq!(agg["window_secs"].as_u64(), Some(60));
    assert_eq!(num("min")?, 20.0);
    assert_eq!(num("max")?, 27.5);
    assert!(
        (num("mean")? - 70.0 / 3.0).abs() < 1e-9,
        "mean {}",
        num("mean")?
    );
    assert!([20.0, 22.5, 27.5].contains(&num("last")?));
    for q in ["p50", "p95", "p99"] {
        let v = num(q)?;
        assert!(
            (20.0 * 0.98..=27.5 * 1.02).contains(&v),
            "{q} = {v} outside the data"
        );
    }
    let (start, end) = (num("start_ms")?, num("end_ms")?);
    assert_eq!(end - start, 60_000.0, "a 60 s window spans 60 000 ms");
    assert_eq!(start.rem_euclid(60_000.0), 0.0, "windows are aligned");

    // The end-to-end ack covers the two sequenced readings of boot 7.
    let ack_topic = format!("fogline/ack/{DEVICE}");
    let mut last_ack = None;
    poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let text = mosquitto::subscribe_one(port, &ack_topic, 2).ok()??;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        last_ack = Some(text);
        (value["boot"].as_u64() == Some(7) && value["seq"].as_u64() == Some(2)).then_some(())
    })
    .with_context(|| format!("no ack {{boot:7, seq:2}} on {ack_topic}; last: {last_ack:?}"))?;

    // Only the agent speaks on the ack topic: a forged watermark is dropped and counted,
    // and the retained ack stays the agent's.
    mosquitto::publish(
        port,
        &ack_topic,
        mosquitto::Message::Text(r#"{"boot":7,"seq":999}"#),
    )?;
    poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let text = agent.metrics().ok()?;
        let labels = [("reason", "publish_to_agent_topic")];
        (fogline_tests::metric(&text, "fogline_mqtt_messages_dropped_total", &labels) == 1.0)
            .then_some(())
    })
    .context("the forged ack was not counted as dropped")?;
    let retained = mosquitto::subscribe_one(port, &ack_topic, 2)?.unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&retained)?;
    assert_eq!(
        value["seq"].as_u64(),
        Some(2),
        "forged ack delivered: {retained}"
    );

    let status = agent.status()?;
    assert_eq!(status["role"], "leader", "/status: {status}");
    assert_eq!(status["node_id"], "agent-1", "default node id: {status}");
    assert_eq!(status["site"], "site-1", "default site: {status}");
    assert_eq!(status["buffer"]["readings"].as_u64(), Some(3), "{status}");
    assert_eq!(
        status["buffer"]["capacity_bytes"].as_u64(),
        Some(268_435_456),
        "default capacity: {status}"
    );
    assert!(status["buffer"]["bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(status["buffer"]["next_offset"].as_u64().is_some());
    let text = agent.metrics()?;
    assert_eq!(
        fogline_tests::metric(&text, "fogline_buffer_readings", &[]),
        3.0
    );
    assert!(fogline_tests::metric(&text, "fogline_ingest_accepted_total", &[]) >= 3.0);

    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let readings = agent.export()?;
    let mine: Vec<_> = readings
        .iter()
        .filter(|r| r.device == DEVICE && r.metric == METRIC)
        .collect();
    assert_eq!(mine.len(), 3, "export: {readings:#?}");
    let mut values: Vec<f64> = mine.iter().map(|r| r.value).collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![20.0, 22.5, 27.5]);
    let mut seqs: Vec<Option<u32>> = mine.iter().map(|r| r.seq).collect();
    seqs.sort();
    assert_eq!(seqs, vec![None, Some(1), Some(2)]);
    let mut offsets: Vec<u64> = mine.iter().map(|r| r.offset).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), 3, "offsets are distinct: {offsets:?}");
    let stats = agent.stats()?;
    assert_eq!(stats["readings"].as_u64(), Some(3), "stats: {stats}");
    let csv = agent.export_csv()?;
    assert!(
        csv.lines().filter(|l| l.contains(DEVICE)).count() == 3,
        "csv export:\n{csv}"
    );
    Ok(())
}

/// Two agents on one machine, each given its own `--mqtt-listen` and nothing else, both
/// start: the default is one MQTT port for 3.1.1 and 5. (A second listener on
/// 0.0.0.0:1884 used to be on by default, so the second agent could not bind it and a
/// port nobody asked for was open on every interface.)
#[test]
fn two_agents_share_a_host_with_the_defaults() -> anyhow::Result<()> {
    let mut first = Agent::start(AgentOptions::default())?;
    let mut second = Agent::start(AgentOptions::default())?;
    for agent in [&first, &second] {
        let status = agent.status()?;
        assert!(status.get("origin").is_some(), "{status}");
    }
    second.stop(Duration::from_secs(10))?;
    first.stop(Duration::from_secs(10))?;
    Ok(())
}

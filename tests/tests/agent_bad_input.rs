//! Promise: malformed, oversized, non-finite, mis-addressed or badly-named input is
//! refused with a counted reason in `/metrics`, the agent stays healthy, and a
//! well-behaved sensor publishing at the same time loses nothing.
//!
//! Two holes a review found are guarded here too. A JSON reading with `seq` but no
//! `boot` was taken with boot 0: after the device rebooted its numbers started again at
//! 1 and were dropped as duplicates, yet acknowledged — it is refused now
//! (`seq_without_boot`). And a device clock far ahead (or a timestamp near `u64::MAX`)
//! overflowed the window arithmetic and opened windows that never closed: such a reading
//! keeps its arrival time now, counted in `fogline_ingest_clock_ahead_total`.

use std::time::Duration;

use anyhow::Context;
use fogline_firmware::wire::Timestamp;
use fogline_tests::{
    check_sequences, metric, now_ms, poll_until, postcard_frame, Agent, AgentOptions, DeviceSpec,
    Fleet,
};

const REJECTED: &str = "fogline_ingest_rejected_total";

#[test]
fn bad_input_is_counted_and_good_input_is_kept() {
    let mut agent = Agent::start(AgentOptions {
        name: Some("bad-input-agent".into()),
        ..AgentOptions::default()
    })
    .expect("the agent starts");
    // Fail by panicking while the agent still exists, so that its log is shown.
    if let Err(e) = scenario(&mut agent) {
        panic!("{e:?}");
    }
}

fn scenario(agent: &mut Agent) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    let mut good = DeviceSpec::json("good", "temp", 42);
    good.interval = Some(Duration::from_millis(5));
    good.window = 2000;
    good.max_seq = 20_000;
    let good = fleet.add(good)?;
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));

    let raw = fleet.raw_publisher("vandal")?;
    let now = u64::try_from(now_ms()).context("clock before 1970")?;
    let valid_frame = postcard_frame("bad-src", "temp", 1, 1, Timestamp::WallMs(now), 1.0)?;
    let mut nan_frame = valid_frame.clone();
    // The value is the frame's last field: 8 little-endian bytes of an f64.
    let len = nan_frame.len();
    nan_frame[len - 8..].copy_from_slice(&f64::NAN.to_le_bytes());
    let mismatched = postcard_frame("other-dev", "temp", 1, 1, Timestamp::WallMs(now), 1.0)?;
    let oversized = format!(r#"{{"value":1,"pad":"{}"}}"#, "x".repeat(2000)).into_bytes();
    let long_id = "x".repeat(33);

    type Case = (&'static str, String, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "malformed_payload",
            "sensors/bad-src/temp".into(),
            br#"{"value":"#.to_vec(),
        ),
        (
            "malformed_payload",
            "sensors/bad-src/temp".into(),
            vec![1, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x80, 0x80, 0x80],
        ),
        (
            "unsupported_version",
            "sensors/bad-src/temp".into(),
            vec![2, 1, 2, 3, 4],
        ),
        ("oversized", "sensors/bad-src/temp".into(), oversized),
        ("non_finite", "sensors/bad-src/temp".into(), b"NaN".to_vec()),
        ("non_finite", "sensors/bad-src/temp".into(), b"inf".to_vec()),
        (
            "non_finite",
            "sensors/bad-src/temp".into(),
            b"-inf".to_vec(),
        ),
        ("non_finite", "sensors/bad-src/temp".into(), nan_frame),
        ("topic_mismatch", "sensors/bad-src/temp".into(), mismatched),
        (
            "malformed_topic",
            "sensors/only-device".into(),
            b"1".to_vec(),
        ),
        ("invalid_id", "sensors/bad id/x".into(), b"1".to_vec()),
        (
            "invalid_id",
            format!("sensors/{long_id}/temp"),
            b"1".to_vec(),
        ),
        (
            "seq_without_boot",
            "sensors/bad-src/temp".into(),
            br#"{"value":1,"seq":5}"#.to_vec(),
        ),
    ];
    const REPEAT: u64 = 3;
    let mut expected: Vec<(&str, u64)> = Vec::new();
    for _ in 0..REPEAT {
        for (reason, topic, payload) in &cases {
            raw.publish(topic, payload.clone())?;
            match expected.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None => expected.push((reason, 1)),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let bad_total: u64 = expected.iter().map(|(_, n)| n).sum();
    raw.wait_pubacks(bad_total, Duration::from_secs(10))?;

    // Every reason's counter reaches what was sent.
    let mut last_metrics = String::new();
    let counted = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        last_metrics = agent.metrics().ok()?;
        expected
            .iter()
            .all(|(reason, n)| metric(&last_metrics, REJECTED, &[("reason", reason)]) >= *n as f64)
            .then_some(())
    });
    let report: Vec<String> = expected
        .iter()
        .map(|(reason, n)| {
            format!(
                "{reason}: sent {n}, counted {}",
                metric(&last_metrics, REJECTED, &[("reason", reason)])
            )
        })
        .collect();
    eprintln!("rejections:\n  {}", report.join("\n  "));
    assert!(
        counted.is_some(),
        "rejection counters short of what was sent:\n  {}",
        report.join("\n  ")
    );

    // Still healthy, and the good sensor was never cut off.
    assert_eq!(agent.get("/healthz")?.trim(), "ok");
    std::thread::sleep(Duration::from_millis(500));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(20))?;
    let snap = good.snapshot();
    assert_eq!(
        snap.connects, 1,
        "the good sensor was disconnected: {snap:?}"
    );
    assert!(snap.sent > 100, "the good sensor kept publishing: {snap:?}");
    let text = agent.metrics()?;
    let accepted = metric(&text, "fogline_ingest_accepted_total", &[]);
    let received = metric(&text, "fogline_ingest_received_total", &[]);
    let rejected = metric(&text, REJECTED, &[]);
    eprintln!(
        "good sent {} acked {}; received {received} accepted {accepted} rejected {rejected}",
        snap.sent, snap.acked
    );
    assert!(
        accepted >= f64::from(snap.sent),
        "accepted {accepted} < sent {}",
        snap.sent
    );
    assert!(rejected >= bad_total as f64);
    assert!(
        received >= accepted + rejected,
        "received {received} < accepted {accepted} + rejected {rejected}"
    );
    drop(raw);
    fleet.shutdown();

    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let readings = agent.export()?;
    let strangers: Vec<_> = readings.iter().filter(|r| r.device != "good").collect();
    assert!(
        strangers.is_empty(),
        "rejected input was stored: {strangers:?}"
    );
    let problems = check_sequences(&readings, &[("good".into(), 42, snap.sent)]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(readings.len(), snap.sent as usize);
    Ok(())
}

/// Readings from clocks that are far ahead (and a timestamp at the top of the range) are
/// stored with their arrival time, aggregated in the current window, and counted; the
/// agent stays healthy.
#[test]
fn a_clock_far_ahead_gets_the_arrival_time() -> anyhow::Result<()> {
    let mut agent = Agent::start(AgentOptions {
        name: Some("clock-agent".into()),
        ..AgentOptions::default()
    })?;
    let fleet = Fleet::new(agent.mqtt_addr())?;
    let raw = fleet.raw_publisher("clocks")?;
    let before = now_ms();
    let ahead = before + 3 * 24 * 3_600_000;
    let payloads = [
        format!(r#"{{"value":1,"seq":1,"boot":1,"ts":{ahead}}}"#),
        r#"{"value":2,"seq":2,"boot":1,"ts":18446744073709551615}"#.to_owned(),
        r#"{"value":3,"seq":3,"boot":1,"ts":9223372036854775807}"#.to_owned(),
    ];
    for p in &payloads {
        raw.publish("sensors/clock-dev/temp", p.as_bytes().to_vec())?;
    }
    raw.wait_pubacks(3, Duration::from_secs(10))?;
    let counted = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let m = agent.metrics().ok()?;
        (metric(&m, "fogline_ingest_clock_ahead_total", &[]) >= 3.0).then_some(())
    });
    assert!(counted.is_some(), "{}", agent.metrics()?);
    let agg =
        fogline_tests::mosquitto::subscribe_one(agent.mqtt_port(), "agg/clock-dev/temp/3600s", 10)?
            .context("an aggregate for the current hour")?;
    let agg: serde_json::Value = serde_json::from_str(&agg)?;
    assert_eq!(agg["count"], 3, "{agg}");
    let start = agg["start_ms"].as_i64().context("start_ms")?;
    assert!(
        start <= before && before - start <= 3_600_000,
        "the window is the current one: {agg}"
    );
    assert_eq!(agent.get("/healthz")?.trim(), "ok");
    drop(raw);
    drop(fleet);
    let after = now_ms();
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let readings = agent.export()?;
    assert_eq!(readings.len(), 3);
    for r in &readings {
        assert!(
            r.ts >= before - 1000 && r.ts <= after + 1000,
            "stored with its arrival time: {r:?}"
        );
    }
    Ok(())
}

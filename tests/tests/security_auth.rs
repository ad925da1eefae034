//! Device authentication (issue 8). The story: an agent on a farm network that anyone can
//! plug into. With `auth.mode = "credentials"` a client without the right password, or
//! with a client id that is not its username, must not even get a CONNACK; and a device
//! with valid credentials must not get a single reading accepted under another device's id
//! — not by publishing on its topic, not by forging its ack, not with a will. Password
//! hashes must not show up in logs, `/status` or `/metrics`.

use std::time::Duration;

use fogline_tests::secure::{auth_hash, pub_as, pub_as_version};
use fogline_tests::{metric, mosquitto, poll_until, Agent, AgentOptions};

const REFUSED: &str = "fogline_connections_refused_total";

#[test]
fn devices_need_credentials_and_can_speak_only_for_themselves() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let dir = tempfile::tempdir()?;
    let h1 = auth_hash("pw-one")?;
    let h2 = auth_hash("pw-two")?;
    assert!(h1.starts_with("$argon2id$"), "{h1}");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[auth]\nmode = \"credentials\"\n[auth.devices]\nd1 = \"{h1}\"\nd2 = \"{h2}\"\n"),
    )?;
    let mut agent = Agent::start(AgentOptions {
        config: Some(config.clone()),
        mqtt_v5: true,
        ..Default::default()
    })?;
    let port = agent.mqtt_port();
    let reading = |v: f64| format!("{{\"value\":{v},\"seq\":1,\"boot\":1}}");

    // Refused at CONNECT: mosquitto_pub exits non-zero and says why.
    for (what, id, user, pass) in [
        ("no credentials", Some("d1"), None, None),
        ("a wrong password", Some("d1"), Some("d1"), Some("pw-two")),
        ("an unknown device", Some("d9"), Some("d9"), Some("pw-one")),
        (
            "another device's client id",
            Some("d2"),
            Some("d1"),
            Some("pw-one"),
        ),
    ] {
        let out = pub_as(port, id, user, pass, "sensors/d1/temp", &reading(1.0))?;
        assert!(!out.status.success(), "{what}: accepted: {}", out.stderr);
        let err = out.stderr.to_lowercase();
        assert!(
            err.contains("not authori") || err.contains("bad user") || err.contains("refused"),
            "{what}: {err}"
        );
    }

    // The real d1 and d2 get in.
    let ok = pub_as(
        port,
        Some("d1"),
        Some("d1"),
        Some("pw-one"),
        "sensors/d1/temp",
        &reading(1.5),
    )?;
    assert!(ok.status.success(), "d1: {}", ok.stderr);

    // d1 tries to speak for d2: its reading topic, its ack topic, a will on its topic.
    for topic in ["sensors/d2/temp", "fogline/ack/d2"] {
        let _ = pub_as(
            port,
            Some("d1"),
            Some("d1"),
            Some("pw-one"),
            topic,
            &reading(66.6),
        )?;
    }
    let mut will = std::process::Command::new("mosquitto_pub");
    will.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-i",
        "d1",
        "-u",
        "d1",
        "-P",
    ])
    .args([
        "pw-one",
        "--will-topic",
        "sensors/d2/temp",
        "--will-payload",
        "77.7",
    ])
    .args(["-t", "sensors/d1/temp", "-m", "1.0"]);
    let out = fogline_tests::run_bounded(&mut will, Duration::from_secs(15))?;
    assert!(
        !out.status.success(),
        "a will on another device's topic was accepted"
    );

    let ok = pub_as(
        port,
        Some("d2"),
        Some("d2"),
        Some("pw-two"),
        "sensors/d2/temp",
        &reading(2.5),
    )?;
    assert!(ok.status.success(), "d2: {}", ok.stderr);

    // The MQTT 5 listener is behind the same front end.
    let v5 = agent
        .mqtt_v5_addr()
        .ok_or_else(|| anyhow::anyhow!("no MQTT 5 listener"))?
        .port();
    let out = pub_as_version(
        v5,
        true,
        Some("d2"),
        Some("d2"),
        Some("pw-one"),
        "sensors/d2/temp",
        &reading(3.5),
    )?;
    assert!(
        !out.status.success(),
        "MQTT 5 with a wrong password was accepted"
    );
    let _ = pub_as_version(
        v5,
        true,
        Some("d2"),
        Some("d2"),
        Some("pw-two"),
        "sensors/d1/temp",
        &reading(66.6),
    )?;

    let counted = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let m = agent.metrics().ok()?;
        let accepted = metric(&m, "fogline_ingest_accepted_total", &[]);
        let r = |reason| metric(&m, REFUSED, &[("reason", reason)]);
        (accepted >= 2.0
            && r("no_credentials") >= 1.0
            && r("bad_password") >= 2.0
            && r("unknown_device") >= 1.0
            && r("client_id_mismatch") >= 1.0
            && r("foreign_topic") >= 3.0
            && r("foreign_will") >= 1.0)
            .then_some(m)
    });
    let metrics = counted.ok_or_else(|| {
        anyhow::anyhow!(
            "refusals not counted as expected:\n{}",
            agent.metrics().unwrap_or_default()
        )
    })?;

    // Nothing secret anywhere an operator looks.
    let status = agent.get("/status")?;
    let log = agent.log_tail(1000);
    assert!(log.contains("refused a connection: bad_password"), "{log}");
    let check = fogline_tests::run_bounded(
        std::process::Command::new(agent.bin())
            .args(["config", "check", "--config"])
            .arg(&config),
        Duration::from_secs(30),
    )?;
    assert!(check.status.success(), "{}", check.stderr);
    assert!(check.stdout.contains("<redacted>"), "{}", check.stdout);
    for (name, text) in [
        ("metrics", &metrics),
        ("status", &status),
        ("log", &log),
        ("config check", &check.stdout),
    ] {
        for secret in ["argon2", "pw-one", "pw-two"] {
            assert!(!text.contains(secret), "{name} shows {secret:?}");
        }
    }

    agent.stop(Duration::from_secs(30))?;
    let readings = agent.export()?;
    let seen: Vec<(String, f64)> = readings
        .iter()
        .map(|r| (r.device.clone(), r.value))
        .collect();
    assert_eq!(
        seen,
        vec![("d1".to_owned(), 1.5), ("d2".to_owned(), 2.5)],
        "only each device's own readings are stored"
    );
    Ok(())
}

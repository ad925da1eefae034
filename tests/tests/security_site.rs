//! Promise: only nodes holding a certificate from the site's CA take part in the site.
//! Agents a1 and a2 of a three-member site talk to each other over their node listeners
//! (`cluster.listen`, TLS with client certificates): they elect a leader and replicate.
//! The third member's slot, a3, is taken by an impostor whose certificate comes from
//! another CA: every connection it makes is refused at the TLS handshake (logged and
//! counted as `unknown_ca`), so it can neither vote, nor be elected, nor replicate. A plain
//! MQTT client on the node listener is refused too.

use std::time::{Duration, Instant};

use fogline_tests::secure::{certs_init, certs_node};
use fogline_tests::{free_port, mosquitto, Agent, AgentOptions};

const REFUSED: &str = "fogline_connections_refused_total";

fn member(
    id: &str,
    node_ports: &[(&str, u16)],
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> anyhow::Result<Agent> {
    let mut listen = 0;
    let peers: Vec<String> = node_ports
        .iter()
        .filter_map(|(peer, port)| {
            if *peer == id {
                listen = *port;
                None
            } else {
                Some(format!("{peer}=127.0.0.1:{port}"))
            }
        })
        .collect();
    let mut opts = AgentOptions::default()
        .env("FOGLINE_CLUSTER__LISTEN", format!("127.0.0.1:{listen}"))
        .env("FOGLINE_TLS__CA", ca.display())
        .env("FOGLINE_TLS__CERT", cert.display())
        .env("FOGLINE_TLS__KEY", key.display());
    opts.name = Some(id.to_owned());
    opts.args = vec![
        "--node-id".into(),
        id.into(),
        "--site".into(),
        "farm".into(),
        "--peers".into(),
        peers.join(","),
    ];
    Agent::start(opts)
}

#[test]
fn a_node_without_a_site_certificate_cannot_join_vote_or_lead() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let dir = tempfile::tempdir()?;
    let site = dir.path().join("site");
    let other = dir.path().join("other");
    certs_init(&site)?;
    certs_init(&other)?;
    let ca = site.join("ca.pem");
    let hosts = ["127.0.0.1", "localhost"];
    let (c1, k1) = certs_node(&site, "a1", &hosts, &site)?;
    let (c2, k2) = certs_node(&site, "a2", &hosts, &site)?;
    let (c3, k3) = certs_node(&other, "a3", &hosts, &other)?;
    let ports = [
        ("a1", free_port()?),
        ("a2", free_port()?),
        ("a3", free_port()?),
    ];
    let mut a1 = member("a1", &ports, &c1, &k1, &ca)?;
    let mut a2 = member("a2", &ports, &c2, &k2, &ca)?;
    // The impostor knows the site's CA certificate (it is no secret), so it accepts the
    // members' certificates; its own comes from another CA.
    let mut evil = member("a3", &ports, &c3, &k3, &ca)?;

    // a1 and a2 form a majority of three over TLS and agree on a leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let s1 = a1.status()?;
        let s2 = a2.status()?;
        let agreed = s1["leader"]
            .as_str()
            .filter(|l| s2["leader"].as_str() == Some(l));
        if let Some(l) = agreed {
            break l.to_owned();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a1 and a2 never agreed on a leader over TLS: {} / {}",
            s1["cluster"],
            s2["cluster"]
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(leader == "a1" || leader == "a2", "leader {leader}");

    // A reading at a1 is replicated to a2 over TLS.
    mosquitto::publish(
        a1.mqtt_port(),
        "sensors/d1/temp",
        mosquitto::Message::Text("21.5"),
    )?;
    let origin1 = a1.status()?["origin"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replicas = a2.status()?["cluster"]["replicas"].clone();
        let has =
            replicas.as_array().into_iter().flatten().any(|r| {
                r["origin"] == origin1.as_str() && r["next"].as_u64().is_some_and(|n| n >= 1)
            });
        if has {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a2 never got a1's reading: {replicas}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // For five seconds the impostor never leads and reaches nobody; the members refuse it.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let s = evil.status()?;
        assert_ne!(s["role"], "leader", "the impostor leads: {s}");
        for p in s["peers"].as_array().into_iter().flatten() {
            assert_eq!(p["acked"], 0, "the impostor replicated to a member: {p}");
        }
        for a in [&a1, &a2] {
            assert_eq!(a.status()?["leader"], leader.as_str(), "leadership moved");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let refused = a1.metric(REFUSED, &[("reason", "unknown_ca")])?
        + a2.metric(REFUSED, &[("reason", "unknown_ca")])?;
    assert!(refused > 0.0, "the impostor's connections were not counted");
    assert!(
        a1.log_tail(400).contains("unknown_ca") || a2.log_tail(400).contains("unknown_ca"),
        "the refusal is logged with its reason"
    );
    for a in [&a1, &a2] {
        let replicas = a.status()?["cluster"]["replicas"].clone();
        assert!(
            !replicas
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["origin"].as_str().is_some_and(|o| o.starts_with("a3."))),
            "a member holds the impostor's log: {replicas}"
        );
    }

    // No certificate at all: a plain MQTT client on a node listener is refused.
    let plain = mosquitto::publish(
        ports[0].1,
        "fogline/cluster/farm/a1",
        mosquitto::Message::Text("{}"),
    );
    assert!(
        plain.is_err(),
        "a plain client got through the node listener"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while a1.metric(REFUSED, &[("reason", "tls_handshake")])? == 0.0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the plain client was not counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for a in [&mut a1, &mut a2, &mut evil] {
        a.stop(Duration::from_secs(15))?;
    }
    Ok(())
}

/// An oversized replication batch is refused, counted and logged; the site keeps going.
#[test]
fn an_oversized_replication_batch_is_refused_and_counted() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut site = fogline_tests::Site::start(
        &fogline_tests::SiteOptions::new("site-b", 3)
            .env("FOGLINE_CLUSTER__MAX_BATCH_BYTES", 8192)
            .env("FOGLINE_BUFFER__BATCH_MAX_READINGS", 64),
    )?;
    let dir = tempfile::tempdir()?;
    let frame = dir.path().join("frame.bin");
    // Version byte, then bytes enough to pass the broker's 64 KiB packet limit but not
    // the 8 KiB batch limit.
    let mut bytes = vec![1u8];
    bytes.resize(20_000, 7);
    std::fs::write(&frame, &bytes)?;
    let a1 = &site.agents[0];
    mosquitto::publish(
        a1.mqtt_port(),
        "fogline/repl/site-b/x.00000000/log",
        mosquitto::Message::File(&frame),
    )?;
    let name = "fogline_replica_batches_total";
    let deadline = Instant::now() + Duration::from_secs(10);
    while a1.metric(name, &[("result", "oversized")])? < 1.0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the oversized batch was not counted:\n{}",
            a1.metrics()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a1.log_tail(100).contains("larger than the limit"));
    // The site still works: its agents elect a leader.
    site.wait_leader(Duration::from_secs(20), &[], &[0, 1, 2])?;
    site.stop()
}

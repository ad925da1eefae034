//! Node links over TLS with client certificates (issue 8). The story: a gateway on the
//! internet with `[tls]` set. An agent holding a certificate from the site CA (made with
//! `fogline-agent certs`) uplinks its readings; an agent with a certificate from another
//! CA, or with none (plain MQTT), never gets a byte to the broker: the gateway logs each
//! refusal with its reason and counts it, and nothing of theirs is stored. A key file
//! readable by others stops an agent at start with a clear error.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use fogline_tests::secure::{certs_init, certs_node, certs_node_for};
use fogline_tests::{mosquitto, poll_until, Agent, AgentOptions, Gateway};

const REFUSED: &str = "fogline_gateway_connections_refused_total";

fn agent_with(
    gw: &Gateway,
    id: &str,
    tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Agent> {
    let mut opts = AgentOptions::default()
        .env("FOGLINE_NODE__ID", id)
        .env("FOGLINE_NODE__SITE", "farm")
        .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr().to_string())
        .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000);
    if let Some((ca, cert, key)) = tls {
        opts = opts
            .env("FOGLINE_TLS__CA", ca.display())
            .env("FOGLINE_TLS__CERT", cert.display())
            .env("FOGLINE_TLS__KEY", key.display());
    }
    opts.name = Some(id.to_owned());
    Agent::start(opts)
}

#[test]
fn only_nodes_with_a_site_certificate_can_uplink() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let dir = tempfile::tempdir()?;
    let site = dir.path().join("site");
    let other = dir.path().join("other");
    certs_init(&site)?;
    certs_init(&other)?;
    let ca = site.join("ca.pem");
    let (gw_cert, gw_key) = certs_node(&site, "gateway", &["127.0.0.1", "localhost"], &site)?;
    let (good_cert, good_key) = certs_node_for(&site, "pi-1", &[], &site, Some("farm"))?;
    let (evil_cert, evil_key) = certs_node_for(&other, "pi-evil", &[], &other, Some("farm"))?;
    let key_mode = std::fs::metadata(&good_key)?.permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "certs node writes keys 0600");

    let gw_env = [
        ("FOGLINE_GW_TLS__CA", ca.to_string_lossy().into_owned()),
        (
            "FOGLINE_GW_TLS__CERT",
            gw_cert.to_string_lossy().into_owned(),
        ),
        ("FOGLINE_GW_TLS__KEY", gw_key.to_string_lossy().into_owned()),
    ];
    let gw_env: Vec<(&str, &str)> = gw_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut gw = Gateway::start(&gw_env)?;

    let mut good = agent_with(&gw, "pi-1", Some((&ca, &good_cert, &good_key)))?;
    // Another CA's certificate, trusting the right CA for the server: the gateway refuses.
    let mut evil = agent_with(&gw, "pi-evil", Some((&ca, &evil_cert, &evil_key)))?;
    // No TLS at all.
    let mut plain = agent_with(&gw, "pi-plain", None)?;

    for agent in [&good, &evil, &plain] {
        for i in 1..=5 {
            let msg = format!("{{\"value\":{i},\"seq\":{i},\"boot\":1}}");
            mosquitto::publish(
                agent.mqtt_port(),
                "sensors/d1/temp",
                mosquitto::Message::Text(&msg),
            )?;
        }
    }

    let stored = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        (gw.next_offset("farm", "pi-1").ok()? >= 5).then_some(())
    });
    assert!(
        stored.is_some(),
        "the good agent's readings did not arrive:\n{}",
        gw.log_tail(40)
    );

    let refused = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        (gw.metric(REFUSED, &[("reason", "unknown_ca")]).ok()? >= 1.0
            && gw.metric(REFUSED, &[("reason", "tls_handshake")]).ok()? >= 1.0)
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "refusals not counted:\n{}",
        gw.log_tail(40)
    );
    let log = gw.log_tail(400);
    assert!(log.contains("refused a connection: unknown_ca"), "{log}");
    assert!(log.contains("refused a connection: tls_handshake"), "{log}");
    assert!(
        log.contains("pi-1"),
        "the authenticated node is named in the log: {log}"
    );
    assert_eq!(gw.next_offset("farm", "pi-evil")?, 0);
    assert_eq!(gw.next_offset("farm", "pi-plain")?, 0);

    // A key readable by others: the agent refuses to start and says how to fix it.
    std::fs::set_permissions(&good_key, std::fs::Permissions::from_mode(0o644))?;
    let mut loose = Agent::spawn(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr().to_string())
            .env("FOGLINE_TLS__CA", ca.display())
            .env("FOGLINE_TLS__CERT", good_cert.display())
            .env("FOGLINE_TLS__KEY", good_key.display()),
    )?;
    let status = loose.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success());
    assert!(
        loose.log_tail(20).contains("chmod 600"),
        "{}",
        loose.log_tail(20)
    );

    for agent in [&mut good, &mut evil, &mut plain] {
        agent.stop(Duration::from_secs(30))?;
    }
    gw.stop(Duration::from_secs(30))?;
    let stored = gw.export()?;
    assert!(
        stored.iter().all(|r| r.origin.starts_with("pi-1.")),
        "only pi-1 is stored"
    );
    assert_eq!(stored.len(), 5);
    Ok(())
}

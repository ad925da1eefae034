//! Promise: at a gateway with `[tls]`, a node ships only for the site its certificate
//! names, and dashboards only read. One gateway serves two sites: `farm`, whose nodes
//! hold certificates from the fleet CA naming their site, and `barn`, with a CA of its
//! own bound to it (`certs init --site barn`); both CAs are in `tls.ca`.
//!
//! - farm-1 (fleet certificate for farm) and barn-1 (barn's CA, for barn) uplink; their
//!   readings are stored.
//! - impostor holds a fleet certificate for barn but uplinks as farm: its first publish
//!   ends its connection (`foreign_topic`), nothing of it is stored under any site.
//! - liar holds a certificate from barn's CA claiming farm: refused at once
//!   (`foreign_site`); a per-site CA vouches for its own site only.
//! - nosite holds a fleet certificate naming no site: refused (`no_site`).
//! - a dashboard logged in with `access.readers` credentials (no certificate) reads
//!   farm's aggregate with `mosquitto_sub`, but its publish on `agg/…` ends its
//!   connection and its subscription to the uplink topics is refused; a client with no
//!   credentials, or a wrong password, does not get in.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fogline_tests::secure::{auth_hash, certs_init_for, certs_node_for};
use fogline_tests::{mosquitto, poll_until, run_bounded, Agent, AgentOptions, Gateway};

const REFUSED: &str = "fogline_gateway_connections_refused_total";
const PASSWORD: &str = "dashboard-pw";

struct Node<'a> {
    id: &'a str,
    /// The site the agent says it is.
    site: &'a str,
    /// The CA directory that signs its certificate, and the site the certificate names.
    ca: &'a Path,
    cert_site: Option<&'a str>,
}

fn agent(gw: &Gateway, fleet_ca: &Path, node: &Node<'_>, dir: &Path) -> anyhow::Result<Agent> {
    let (cert, key) = certs_node_for(node.ca, node.id, &[], dir, node.cert_site)?;
    let mut opts = AgentOptions::default()
        .env("FOGLINE_NODE__ID", node.id)
        .env("FOGLINE_NODE__SITE", node.site)
        .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr().to_string())
        .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 200)
        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000)
        .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 100)
        // The gateway's certificate is the fleet CA's.
        .env("FOGLINE_TLS__CA", fleet_ca.join("ca.pem").display())
        .env("FOGLINE_TLS__CERT", cert.display())
        .env("FOGLINE_TLS__KEY", key.display());
    opts.name = Some(node.id.to_owned());
    let agent = Agent::start(opts)?;
    for i in 1..=5 {
        let msg = format!("{{\"value\":{i},\"seq\":{i},\"boot\":1}}");
        mosquitto::publish(
            agent.mqtt_port(),
            "sensors/d1/temp",
            mosquitto::Message::Text(&msg),
        )?;
    }
    Ok(agent)
}

/// `mosquitto_sub`/`mosquitto_pub` over TLS to the gateway, trusting the fleet CA, with
/// `login` if given.
fn tls_client(tool: &str, gw: &Gateway, ca: &Path, login: Option<(&str, &str)>) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &gw.mqtt_port().to_string(),
        "-q",
        "1",
    ])
    .arg("--cafile")
    .arg(ca.join("ca.pem"));
    if let Some((user, pass)) = login {
        cmd.args(["-u", user, "-P", pass]);
    }
    cmd
}

fn refused(gw: &Gateway, reason: &str) -> f64 {
    gw.metric(REFUSED, &[("reason", reason)]).unwrap_or(0.0)
}

#[test]
fn nodes_ship_only_for_their_site_and_dashboards_only_read() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let dir = tempfile::tempdir()?;
    let fleet = dir.path().join("fleet");
    let barn = dir.path().join("barn");
    certs_init_for(&fleet, None)?;
    certs_init_for(&barn, Some("barn"))?;
    let bundle = dir.path().join("cas.pem");
    std::fs::write(
        &bundle,
        [
            std::fs::read(fleet.join("ca.pem"))?,
            std::fs::read(barn.join("ca.pem"))?,
        ]
        .concat(),
    )?;
    let (gw_cert, gw_key) =
        certs_node_for(&fleet, "gateway", &["127.0.0.1", "localhost"], &fleet, None)?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[access.readers]\ngrafana = {:?}\n",
            bundle.display().to_string(),
            gw_cert.display().to_string(),
            gw_key.display().to_string(),
            auth_hash(PASSWORD)?,
        ),
    )?;
    let mut gw = Gateway::start_with(&[], Some(config))?;

    let nodes = [
        Node {
            id: "farm-1",
            site: "farm",
            ca: &fleet,
            cert_site: Some("farm"),
        },
        Node {
            id: "barn-1",
            site: "barn",
            ca: &barn,
            cert_site: Some("barn"),
        },
        Node {
            id: "impostor",
            site: "farm",
            ca: &fleet,
            cert_site: Some("barn"),
        },
        Node {
            id: "liar",
            site: "farm",
            ca: &barn,
            cert_site: Some("farm"),
        },
        Node {
            id: "nosite",
            site: "farm",
            ca: &fleet,
            cert_site: None,
        },
    ];
    let mut agents = Vec::new();
    for node in &nodes {
        let out = dir.path().join(node.id);
        agents.push(agent(&gw, &fleet, node, &out)?);
    }

    let shipped = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        (gw.next_offset("farm", "farm-1").ok()? >= 5 && gw.next_offset("barn", "barn-1").ok()? >= 5)
            .then_some(())
    });
    assert!(
        shipped.is_some(),
        "farm-1 and barn-1 did not ship:\n{}",
        gw.log_tail(40)
    );
    let counted = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        (refused(&gw, "foreign_topic") >= 1.0
            && refused(&gw, "foreign_site") >= 1.0
            && refused(&gw, "no_site") >= 1.0)
            .then_some(())
    });
    assert!(
        counted.is_some(),
        "refusals not counted:\n{}",
        gw.log_tail(60)
    );
    let log = gw.log_tail(400);
    for want in [
        "impostor.",
        "of site \"barn\" published on \"fogline/uplink/farm/",
        "node \"liar\" claims site \"farm\", but its CA is site \"barn\"'s",
        "the certificate of node \"nosite\" names no site",
    ] {
        assert!(log.contains(want), "the log says {want:?}:\n{log}");
    }
    // Refusals of a client already in name its address too.
    assert!(
        log.lines()
            .any(|l| l.contains("foreign_topic") && l.contains("peer=127.0.0.1:")),
        "the impostor's address is logged:\n{log}"
    );

    // The dashboard reads farm's aggregate of d1 (five readings, 1..=5)...
    let grafana = Some(("grafana", PASSWORD));
    let agg = poll_until(Duration::from_secs(20), Duration::from_millis(300), || {
        let mut sub = tls_client("mosquitto_sub", &gw, &fleet, grafana);
        sub.args(["-C", "1", "-W", "3", "-t", "agg/farm/d1/temp/60s"]);
        let out = run_bounded(&mut sub, Duration::from_secs(10)).ok()?;
        let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).ok()?;
        (json["count"] == 5).then_some(json)
    });
    assert!(
        agg.is_some(),
        "the dashboard did not read farm's aggregate:\n{}",
        gw.log_tail(40)
    );

    // ...but cannot publish one,
    let before = refused(&gw, "foreign_topic");
    let mut publish = tls_client("mosquitto_pub", &gw, &fleet, grafana);
    publish.args(["-t", "agg/farm/d1/temp/60s", "-m", r#"{"count":999}"#]);
    let _ = run_bounded(&mut publish, Duration::from_secs(15))?;
    let counted = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (refused(&gw, "foreign_topic") > before).then_some(())
    });
    assert!(counted.is_some(), "the dashboard's publish was not refused");
    let mut sub = tls_client("mosquitto_sub", &gw, &fleet, grafana);
    sub.args(["-C", "1", "-W", "3", "-t", "agg/farm/d1/temp/60s"]);
    let out = run_bounded(&mut sub, Duration::from_secs(10))?;
    assert!(
        !out.stdout.contains("999"),
        "a dashboard's publish reached others: {}",
        out.stdout
    );

    // ...nor read the uplink,
    let before = refused(&gw, "foreign_subscription");
    let mut sub = tls_client("mosquitto_sub", &gw, &fleet, grafana);
    sub.args(["-C", "1", "-W", "2", "-t", "fogline/uplink/#"]);
    let out = run_bounded(&mut sub, Duration::from_secs(10))?;
    assert!(
        out.stdout.trim().is_empty(),
        "the dashboard read the uplink: {}",
        out.stdout
    );
    assert!(
        refused(&gw, "foreign_subscription") > before,
        "the subscription was not refused"
    );

    // ...and without the right credentials nobody gets in.
    for (what, login, reason) in [
        ("no credentials", None, "no_credentials"),
        (
            "a wrong password",
            Some(("grafana", "wrong")),
            "bad_password",
        ),
    ] {
        let before = refused(&gw, reason);
        let mut sub = tls_client("mosquitto_sub", &gw, &fleet, login);
        sub.args(["-C", "1", "-W", "2", "-t", "agg/#"]);
        let out = run_bounded(&mut sub, Duration::from_secs(10))?;
        assert!(
            !out.status.success() && out.stdout.trim().is_empty(),
            "{what}: got in"
        );
        assert!(
            refused(&gw, reason) > before,
            "{what}: not counted as {reason}"
        );
    }

    for mut agent in agents {
        agent.stop(Duration::from_secs(30))?;
    }
    gw.stop(Duration::from_secs(30))?;
    let stored = gw.export()?;
    let mut by_origin: Vec<(String, String)> = stored
        .iter()
        .map(|r| {
            (
                r.site.clone(),
                r.origin.split('.').next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    by_origin.sort();
    by_origin.dedup();
    assert_eq!(
        by_origin,
        vec![
            ("barn".to_owned(), "barn-1".to_owned()),
            ("farm".to_owned(), "farm-1".to_owned())
        ],
        "only farm-1 and barn-1 are stored, each under its own site"
    );
    assert_eq!(stored.len(), 10);
    Ok(())
}

//! Promise: a dashboard subscribed to `agg/#` at the gateway sees every site's
//! aggregates, with the values that were sent, and still sees them after the gateway
//! restarts.

use std::time::{Duration, Instant};

use fogline_tests::mosquitto::{self, Message};
use fogline_tests::{Agent, AgentOptions, Gateway};

fn aggregate(port: u16, topic: &str) -> anyhow::Result<Option<serde_json::Value>> {
    Ok(mosquitto::subscribe_one(port, topic, 2)?
        .map(|s| serde_json::from_str(&s))
        .transpose()?)
}

#[test]
fn dashboards_at_the_gateway_see_every_sites_aggregates() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let mut gw = Gateway::start(&[])?;
    let mut agents = Vec::new();
    for (site, values) in [("north", [10.0, 20.0, 30.0]), ("south", [-5.0, 5.0, 15.5])] {
        let agent = Agent::start(
            AgentOptions::default()
                .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr())
                .env("FOGLINE_NODE__SITE", site)
                .env("FOGLINE_NODE__ID", format!("{site}-pi"))
                .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 100),
        )?;
        for (i, v) in values.iter().enumerate() {
            let payload = format!("{{\"value\":{v},\"seq\":{},\"boot\":1}}", i + 1);
            mosquitto::publish(
                agent.mqtt_port(),
                "sensors/probe/temp",
                Message::Text(&payload),
            )?;
        }
        agents.push((site, values, agent));
    }
    let expect = |json: &serde_json::Value, values: &[f64; 3]| {
        let mean = values.iter().sum::<f64>() / 3.0;
        json["count"] == 3
            && json["min"].as_f64() == Some(values[0])
            && json["max"].as_f64() == Some(values[2])
            && json["mean"]
                .as_f64()
                .is_some_and(|m| (m - mean).abs() < 1e-9)
    };
    for (site, values, _) in &agents {
        let topic = format!("agg/{site}/probe/temp/60s");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = aggregate(gw.mqtt_port(), &topic)?;
            if got.as_ref().is_some_and(|j| expect(j, values)) {
                break;
            }
            assert!(Instant::now() < deadline, "{topic}: last seen {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for (_, _, mut agent) in agents.drain(..) {
        agent.stop(Duration::from_secs(10))?;
    }
    // The gateway serves them again after a restart, with no agent connected.
    gw.stop(Duration::from_secs(10))?;
    gw.restart()?;
    for (site, values) in [("north", [10.0, 20.0, 30.0]), ("south", [-5.0, 5.0, 15.5])] {
        let topic = format!("agg/{site}/probe/temp/60s");
        let got = aggregate(gw.mqtt_port(), &topic)?;
        assert!(
            got.as_ref().is_some_and(|j| expect(j, &values)),
            "{topic} after a gateway restart: {got:?}"
        );
    }
    Ok(())
}

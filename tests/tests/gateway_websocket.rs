//! Promise: a dashboard in a browser can subscribe at the gateway: MQTT over WebSocket on
//! the HTTP listener, path `/mqtt`, subprotocol `mqtt`, with a dashboard's rights. Shown
//! with a client that is not ours, Eclipse Paho (Python) with `transport="websockets"`:
//! it logs in as a reader, receives the aggregates a real agent relays, and its publish is
//! refused (its connection ended, counted), changing nothing.

use std::process::Command;
use std::time::Duration;

use fogline_tests::secure::{auth_hash, pub_lines};
use fogline_tests::{mosquitto, poll_until, run_bounded, Agent, AgentOptions, Gateway};

const PASSWORD: &str = "ws-dashboard-pw";

const PAHO: &str = r#"
import sys, time
import paho.mqtt.client as mqtt
host, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dash-ws", transport="websockets")
except AttributeError:
    c = mqtt.Client(client_id="dash-ws", transport="websockets")
c.ws_set_options(path="/mqtt")
c.username_pw_set("grafana", password)
got = []
c.on_message = lambda client, userdata, m: got.append((m.topic, m.payload.decode()))
# paho reconnects by itself (and sends the refused publish again): record the ends.
ended = []
c.on_disconnect = lambda client, userdata, *rest: ended.append(time.time())
c.connect(host, port, 30)
c.loop_start()
time.sleep(0.5)
c.subscribe("agg/#", qos=0)
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.1)
print("GOT", got[0][0] if got else "-", got[0][1] if got else "-")
sys.stdout.flush()
c.publish("agg/farm/ws-1/temp/60s", b"forged", qos=1)
deadline = time.time() + 10
while not ended and time.time() < deadline:
    time.sleep(0.1)
print("ENDED", bool(ended))
c.loop_stop()
"#;

#[test]
fn a_paho_websocket_client_reads_aggregates_and_cannot_publish() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let Some(python) = fogline_tests::conformance::ensure_python()? else {
        return fogline_tests::cannot_run("gateway_websocket", "no Python 3 with paho (not root)");
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("[access.readers]\ngrafana = {:?}\n", auth_hash(PASSWORD)?),
    )?;
    let mut gw = Gateway::start_with(&[], Some(config))?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr())
            .env("FOGLINE_NODE__SITE", "farm")
            .env("FOGLINE_NODE__ID", "pi-1")
            .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 200),
    )?;
    let lines: Vec<String> = (0..20)
        .map(|i| format!("{{\"value\":{i},\"seq\":{},\"boot\":1}}", i + 1))
        .collect();
    assert!(pub_lines(agent.mqtt_port(), None, "sensors/ws-1/temp", &lines)?.success());
    let relayed = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        mosquitto::subscribe_one(gw.mqtt_port(), "agg/farm/ws-1/temp/60s", 1)
            .ok()
            .flatten()
    });
    let before = relayed.ok_or_else(|| anyhow::anyhow!("no aggregate reached the gateway"))?;

    let http = gw.http_addr();
    let out = run_bounded(
        Command::new(&python).args([
            "-c",
            PAHO,
            &http.ip().to_string(),
            &http.port().to_string(),
            PASSWORD,
        ]),
        Duration::from_secs(90),
    )?;
    assert!(out.status.success(), "paho: {}{}", out.stdout, out.stderr);
    let got = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("GOT "))
        .unwrap_or("-");
    assert!(
        got.starts_with("agg/farm/ws-1/temp/"),
        "paho over WebSocket received no aggregate: {}{}\n{}",
        out.stdout,
        out.stderr,
        gw.log_tail(20)
    );
    assert!(got.contains("\"count\""), "an aggregate's JSON: {got}");
    assert!(
        out.stdout.contains("ENDED True"),
        "the publish ended its connection: {}",
        out.stdout
    );
    let refused = gw.metric(
        "fogline_gateway_connections_refused_total",
        &[("reason", "foreign_topic")],
    )?;
    assert!(refused >= 1.0, "the refusal is counted");
    let after =
        mosquitto::subscribe_one(gw.mqtt_port(), "agg/farm/ws-1/temp/60s", 5)?.unwrap_or_default();
    assert_ne!(after, "forged", "the aggregate is still the gateway's own");
    assert!(after.contains("\"count\""), "{after} (before: {before})");
    agent.stop(Duration::from_secs(20))?;
    gw.stop(Duration::from_secs(20))?;
    Ok(())
}

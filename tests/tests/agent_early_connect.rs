//! Promise: a sensor that connects the moment the agent's MQTT port opens (after a reboot
//! or a restart of the agent, sensors retry quickly) loses nothing. Every reading the
//! broker accepts reaches the buffer and is acked end-to-end; none is PUBACKed by the
//! broker and then silently dropped because ingest was not subscribed yet.

use std::time::Duration;

use fogline_tests::{check_sequences, metric, Agent, AgentOptions, DeviceSpec, Fleet};

const ROUNDS: u32 = 3;
const DEVICES: u32 = 8;
const READINGS: u32 = 300;

#[test]
fn readings_sent_as_soon_as_the_port_opens_are_kept() {
    for round in 1..=ROUNDS {
        // Spawn without waiting: the devices below are already knocking while it starts.
        let mut agent = Agent::spawn(AgentOptions {
            name: Some(format!("early-connect-agent-{round}")),
            ..AgentOptions::default()
        })
        .expect("the agent starts");
        // Fail by panicking while the agent still exists, so that its log is shown.
        if let Err(e) = round_trip(&mut agent, round) {
            panic!("round {round}: {e:?}");
        }
    }
}

fn round_trip(agent: &mut Agent, round: u32) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for d in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("early-{d}"), "temp", round);
        spec.window = READINGS;
        spec.max_seq = READINGS;
        // Retry every few milliseconds, so some devices connect right as the port opens.
        spec.max_backoff = Duration::from_millis(5);
        fleet.add(spec)?;
    }
    agent.wait_ready(Duration::from_secs(30))?;
    fleet.wait_connected(Duration::from_secs(10))?;
    // Every device sends all its readings at once, so `sent` is final shortly.
    let sent_all =
        fogline_tests::poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            (fleet.totals().0 == u64::from(DEVICES * READINGS)).then_some(())
        });
    anyhow::ensure!(sent_all.is_some(), "devices did not send their readings");
    let acked = fleet.wait_all_acked(Duration::from_secs(15));
    let text = agent.metrics()?;
    let received = metric(&text, "fogline_ingest_received_total", &[]);
    let connects: Vec<u32> = fleet.snapshots().iter().map(|s| s.connects).collect();
    eprintln!(
        "round {round}: sent {}, broker handed {received} to ingest, connects per device {connects:?}",
        DEVICES * READINGS
    );
    if let Err(e) = acked {
        anyhow::bail!(
            "{e:#}\nThe broker accepted (PUBACKed) {} readings but ingest received {received}: \
             readings published right after the port opened were dropped, and a device \
             only re-sends after a reconnect, so it stays unacked",
            DEVICES * READINGS
        );
    }
    let snaps = fleet.snapshots();
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;
    let readings = agent.export()?;
    let expect: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let problems = check_sequences(&readings, &expect);
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

//! Promise: SIGTERM (what systemd sends on stop) under full load makes the agent commit
//! what it holds and exit with status 0 within 5 s, and every reading it acked is in the
//! buffer exactly once afterwards.

use std::time::{Duration, Instant};

use fogline_tests::{check_sequences, test_seed, Agent, AgentOptions, DeviceSpec, Fleet};

const DEVICES: u32 = 4;

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_every_acked_reading() {
    let seed = test_seed("agent_shutdown");
    let mut agent = Agent::start(AgentOptions {
        name: Some("shutdown-agent".into()),
        ..AgentOptions::default()
    })
    .expect("the agent starts");
    // Fail by panicking while the agent still exists, so that its log is shown.
    if let Err(e) = scenario(&mut agent, seed) {
        panic!("{e:?}");
    }
}

fn scenario(agent: &mut Agent, seed: u64) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("term-{i}"), "temp", rng.u32(1..1_000_000));
        spec.window = 1000;
        spec.max_seq = 200_000;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(rng.u64(1500..3000)));
    let (sent, acked) = fleet.totals();
    assert!(acked > 0, "nothing acked before SIGTERM (sent {sent})");

    let asked = Instant::now();
    agent.terminate()?;
    let status = agent.wait_exit(Duration::from_secs(5));
    let took = asked.elapsed();
    // Give acks that were published just before the exit a moment to arrive.
    std::thread::sleep(Duration::from_millis(300));
    fleet.stop_publishing();
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let status = status?;
    eprintln!(
        "agent exited with {status} {took:?} after SIGTERM (sent {sent}, acked {acked} then)"
    );
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        agent.log_tail(30)
    );

    agent.check()?;
    let readings = agent.export()?;
    let expect: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.acked))
        .collect();
    for s in &snaps {
        eprintln!("{}: sent {} acked {}", s.device, s.sent, s.acked);
    }
    let problems = check_sequences(&readings, &expect);
    assert!(
        problems.is_empty(),
        "acked readings missing or duplicated after SIGTERM:\n  {}",
        problems.join("\n  ")
    );
    let total_acked: u64 = snaps.iter().map(|s| u64::from(s.acked)).sum();
    assert!(readings.len() as u64 >= total_acked);
    eprintln!(
        "exported {} readings; {} acked",
        readings.len(),
        total_acked
    );
    Ok(())
}

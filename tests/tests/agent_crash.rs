//! Promise: kill -9 at any moment loses nothing that was acked end-to-end, stores nothing
//! twice, and the agent starts again on its existing data directory without any repair.
//! Devices that re-send everything above their last ack after a reconnect (as the
//! firmware does) end up with every reading they sent stored exactly once.
//!
//! The same holds for the plain MQTT PUBACK: the agent sends it only after the reading
//! is committed, so a QoS 1 client that knows nothing of the ack topic gets the same
//! promise (the second test counts acks by PUBACK). And for QoS 2's PUBREC, also for a
//! client whose session the agent keeps across restarts (the third test).
//!
//! The QoS 2 test guards a bug a review found: the agent remembered a QoS 2 packet id in
//! the session as soon as the PUBLISH came, before the reading was stored. A reading
//! refused while the agent shut down (or lost to a SIGKILL before its commit) then got
//! a PUBREC for its re-send with the same id, although it was never stored.

use std::time::{Duration, Instant};

use fogline_tests::puback::{self, PubackDevice, PubackSpec};
use fogline_tests::{
    check_sequences, test_seed, AckSource, Agent, AgentOptions, DeviceSpec, Fleet,
};

const DEVICES: u32 = 4;
const MAX_PER_DEVICE: u32 = 40_000;
const KILLS: u32 = 5;
/// PUBACK devices are not slowed by an ack subscription: more room, so every kill lands
/// mid-stream.
const PUBACK_MAX_PER_DEVICE: u32 = 250_000;

#[test]
fn sigkill_loses_no_acked_reading_and_stores_none_twice() {
    crash_test("agent_crash", AckSource::Watermark);
}

/// The same promise for the MQTT PUBACK, counted per packet id by a plain 3.1.1 client
/// (keepalive 0) that knows nothing of the ack topic.
#[test]
fn sigkill_loses_no_pubacked_reading() {
    let seed = test_seed("agent_crash_puback");
    let mut agent = Agent::start(AgentOptions {
        name: Some("crash-puback".into()),
        ..AgentOptions::default()
    })
    .expect("the agent starts");
    if let Err(e) = puback_scenario(&mut agent, seed) {
        panic!("{e:?}");
    }
}

/// QoS 2 with sessions the agent keeps: every PUBREC'd reading is stored once, across
/// clean stops (SIGTERM, which refuses what comes in while it shuts down) and SIGKILLs.
#[test]
fn restarts_lose_no_pubrecd_reading_of_a_persistent_qos2_session() {
    let seed = test_seed("agent_crash_pubrec");
    let mut agent = Agent::start(AgentOptions {
        name: Some("crash-pubrec".into()),
        ..AgentOptions::default()
    })
    .expect("the agent starts");
    if let Err(e) = ack_scenario(&mut agent, seed, 2) {
        panic!("{e:?}");
    }
}

fn puback_scenario(agent: &mut Agent, seed: u64) -> anyhow::Result<()> {
    ack_scenario(agent, seed, 1)
}

/// QoS 1: clean sessions and SIGKILLs. QoS 2: persistent sessions, and every other
/// restart is a clean stop.
fn ack_scenario(agent: &mut Agent, seed: u64, qos: u8) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let mut spec = PubackSpec::new(
            &format!("q{qos}-{i}"),
            "temp",
            100 + rng.u32(0..1000),
            500,
            PUBACK_MAX_PER_DEVICE,
        );
        spec.qos = qos;
        spec.persistent = qos == 2;
        devices.push(PubackDevice::start_with(agent.mqtt_addr(), spec)?);
    }
    puback::wait_connected(&devices, Duration::from_secs(10))?;
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(rng.u64(150..1000)));
        let acked: u64 = devices.iter().map(|d| u64::from(d.snapshot().acked)).sum();
        let done = devices
            .iter()
            .all(|d| d.snapshot().sent >= PUBACK_MAX_PER_DEVICE);
        anyhow::ensure!(
            !done,
            "the devices finished before kill #{kill}: raise the maximum"
        );
        let clean_stop = qos == 2 && kill % 2 == 1;
        if clean_stop {
            agent.stop(Duration::from_secs(20))?;
        } else {
            agent.kill9()?;
        }
        eprintln!(
            "[{:>5.1}s] {} #{kill}: acknowledged {acked}",
            started.elapsed().as_secs_f64(),
            if clean_stop { "SIGTERM" } else { "SIGKILL" }
        );
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        agent.restart()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !devices
            .iter()
            .all(|d| d.snapshot().connects > u64::from(kill))
        {
            anyhow::ensure!(Instant::now() < deadline, "devices did not reconnect");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    devices.iter().for_each(PubackDevice::stop_publishing);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !devices.iter().all(|d| {
        let s = d.snapshot();
        s.acked == s.sent
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every reading was PUBACKed within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let snaps: Vec<_> = devices.iter().map(PubackDevice::snapshot).collect();
    devices.iter_mut().for_each(PubackDevice::shutdown);
    agent.stop(Duration::from_secs(10))?;
    for s in &snaps {
        eprintln!(
            "{}: sent {} PUBACKed {} connects {} resent {} out of order {}",
            s.device, s.sent, s.acked, s.connects, s.resent, s.out_of_order
        );
    }
    agent.check()?;
    let readings = agent.export()?;
    let acked: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.acked))
        .collect();
    let problems = check_sequences(&readings, &acked);
    assert!(
        problems.is_empty(),
        "QoS {qos}: acknowledged readings lost or duplicated after {KILLS} restarts (seed \
         {seed}):\n  {}",
        problems.join("\n  ")
    );
    assert!(
        snaps.iter().all(|s| s.out_of_order == 0),
        "acks came out of order: {snaps:?}"
    );
    assert!(
        snaps.iter().all(|s| s.sent > 1000),
        "too few readings to mean anything: {snaps:?}"
    );
    Ok(())
}

fn crash_test(name: &str, ack: AckSource) {
    let seed = test_seed(name);
    let mut agent = Agent::start(AgentOptions {
        name: Some(name.replace('_', "-")),
        ..AgentOptions::default()
    })
    .expect("the agent starts");
    // Fail by panicking while the agent still exists, so that its log is shown.
    if let Err(e) = scenario(&mut agent, seed, ack) {
        panic!("{e:?}");
    }
}

fn scenario(agent: &mut Agent, seed: u64, ack: AckSource) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..DEVICES {
        let mut spec = DeviceSpec::json(format!("crash-{i}"), "temp", 100 + rng.u32(0..1000));
        spec.window = 1000;
        spec.max_seq = MAX_PER_DEVICE;
        spec.ack = ack;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;

    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(rng.u64(150..1000)));
        let (sent, acked) = fleet.totals();
        agent.kill9()?;
        eprintln!(
            "[{:>5.1}s] SIGKILL #{kill}: sent {sent}, acked {acked}",
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        // Must come back on the same data dir with no repair step.
        agent.restart()?;
        // Every device is back (and publishing) before the next kill.
        fleet.wait_connected(Duration::from_secs(10))?;
        eprintln!(
            "[{:>5.1}s] restarted, ready, and every device reconnected",
            started.elapsed().as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    fleet.stop_publishing();
    let all_acked = fleet.wait_all_acked(Duration::from_secs(30));
    if all_acked.is_err() {
        let text = agent.metrics().unwrap_or_default();
        let ingest: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("fogline_ingest_") || l.starts_with("fogline_acks"))
            .map(str::to_string)
            .collect();
        eprintln!("ingest counters while stuck:\n  {}", ingest.join("\n  "));
    }
    let snaps = fleet.snapshots();
    fleet.shutdown();
    agent.stop(Duration::from_secs(10))?;

    for s in &snaps {
        eprintln!(
            "{}: boot {} sent {} acked {} connects {} resent {} (last {:?}) ack regressions {} \
             (lowest {:?})",
            s.device,
            s.boot,
            s.sent,
            s.acked,
            s.connects,
            s.resent,
            s.last_resend,
            s.ack_regressions,
            s.lowest_regressed_ack
        );
    }
    // Report what the export shows even when the consistency check fails.
    let checked = agent.check();
    if let Err(e) = &checked {
        eprintln!("{e:#}");
    }
    let readings = agent.export()?;
    let total_sent: u64 = snaps.iter().map(|s| u64::from(s.sent)).sum();
    eprintln!(
        "exported {} readings for {} sent over {KILLS} kills in {:.1}s",
        readings.len(),
        total_sent,
        started.elapsed().as_secs_f64()
    );
    // The durability promise: everything up to the highest ack ever received is there once.
    let acked: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.acked))
        .collect();
    let lost_acked = check_sequences(&readings, &acked);
    assert!(
        lost_acked.is_empty(),
        "acked readings lost or duplicated after {KILLS} SIGKILLs (seed {seed}):\n  {}",
        lost_acked.join("\n  ")
    );
    checked?;
    // With re-sends, everything sent is there once, and every device got its final ack.
    all_acked?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let problems = check_sequences(&readings, &sent);
    assert!(
        problems.is_empty(),
        "after {KILLS} SIGKILLs (seed {seed}):\n  {}",
        problems.join("\n  ")
    );
    for s in &snaps {
        let beyond = readings
            .iter()
            .filter(|r| r.device == s.device && r.seq.is_some_and(|q| q > s.sent))
            .count();
        assert_eq!(beyond, 0, "{} has readings never sent", s.device);
    }
    assert_eq!(
        readings.len() as u64,
        total_sent,
        "every sent reading stored exactly once"
    );
    assert!(
        snaps.iter().all(|s| s.connects > KILLS),
        "every device reconnected after each kill"
    );
    Ok(())
}

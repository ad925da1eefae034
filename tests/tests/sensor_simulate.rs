//! Promise: a fleet running the firmware's node loop (`fogline-sensor simulate`) gets every
//! reading into the agent's buffer exactly once, even when the agent is SIGKILLed mid-run
//! with readings in flight, because each device keeps what is not acked and re-sends it
//! after reconnecting (issue 4, acceptance 3). And a device whose clock starts in 1970
//! gets sensible timestamps: its readings carry uptime, which the agent re-bases, so a
//! reading that arrives late still carries the time it was taken (acceptance 4).
//!
//! Before each kill the agent is frozen (SIGSTOP) for a moment, like a hung process a
//! watchdog then kills: the devices keep publishing into the frozen broker, so every one
//! of them has readings in flight that die with the agent and must be re-sent.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fogline_tests::{
    check_sequences, find_bin, now_ms, poll_until, run_bounded, test_seed, Agent, AgentOptions,
    ExportedReading,
};
use serde::Deserialize;

/// One device from `fogline-sensor simulate --report`.
#[derive(Debug, Deserialize)]
struct DeviceReport {
    device: String,
    boot: u32,
    clock: String,
    last_seq: u32,
    acked: u32,
    pending: usize,
    dropped: u64,
    resent: u64,
    connects: u64,
    finished: bool,
}

#[derive(Debug, Deserialize)]
struct Report {
    all_acked: bool,
    devices: Vec<DeviceReport>,
}

/// A running `fogline-sensor simulate`; killed if dropped while running.
struct Simulator {
    child: Option<Child>,
    log: PathBuf,
    report: PathBuf,
}

impl Simulator {
    fn start(dir: &Path, agent: &Agent, args: &[&str]) -> anyhow::Result<Simulator> {
        let bin = find_bin("fogline-sensor", "FOGLINE_SENSOR_BIN")?;
        let log = dir.join("simulate.log");
        let report = dir.join("report.json");
        let out = File::create(&log)?;
        let child = Command::new(bin)
            .arg("simulate")
            .arg("--broker")
            .arg(agent.mqtt_addr().to_string())
            .arg("--report")
            .arg(&report)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting fogline-sensor simulate")?;
        Ok(Simulator {
            child: Some(child),
            log,
            report,
        })
    }

    fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "simulate still running after {timeout:?}; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn report(&self) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(&self.report)
            .with_context(|| format!("reading {}", self.report.display()))?;
        serde_json::from_str(&text).context("parsing the simulate report")
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "----- simulate log tail -----\n{}\n-----",
                self.log_tail(40)
            );
        }
    }
}

fn signal(agent: &Agent, sig: &str) -> anyhow::Result<()> {
    let pid = agent.pid().context("agent is not running")?;
    let out = run_bounded(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
        Duration::from_secs(5),
    )?;
    if !out.status.success() {
        bail!("kill -{sig} {pid} failed: {}", out.stderr.trim());
    }
    Ok(())
}

/// Waits until the agent has accepted at least `n` readings (all devices are publishing).
fn wait_accepted(agent: &Agent, n: f64, timeout: Duration) -> anyhow::Result<()> {
    poll_until(timeout, Duration::from_millis(100), || {
        agent
            .metric("fogline_ingest_accepted_total", &[])
            .ok()
            .filter(|v| *v >= n)
    })
    .map(|_| ())
    .with_context(|| format!("the agent did not accept {n} readings within {timeout:?}"))
}

#[test]
fn a_fleet_delivers_every_reading_exactly_once_across_two_sigkills() -> anyhow::Result<()> {
    const DEVICES: usize = 50;
    let seed = test_seed("sensor_simulate_kills");
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut agent = Agent::start(AgentOptions {
        name: Some("sim-agent".into()),
        ..AgentOptions::default()
    })?;
    let seed_arg = seed.to_string();
    let mut sim = Simulator::start(
        agent.root(),
        &agent,
        &[
            "--devices",
            "50",
            "--rate",
            "10",
            "--duration",
            "14s",
            "--drain-timeout",
            "60s",
            "--seed",
            &seed_arg,
        ],
    )?;
    wait_accepted(&agent, 500.0, Duration::from_secs(30))?;

    for kill in 1..=2 {
        std::thread::sleep(Duration::from_millis(rng.u64(800..2000)));
        // Frozen: the devices' publishes pile up unacked in the broker's socket buffers.
        signal(&agent, "STOP")?;
        std::thread::sleep(Duration::from_millis(rng.u64(300..600)));
        agent.kill9()?;
        eprintln!(
            "[{:>5.1}s] SIGKILL #{kill} after a freeze",
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(rng.u64(100..600)));
        agent.restart()?;
        eprintln!(
            "[{:>5.1}s] agent restarted and ready",
            started.elapsed().as_secs_f64()
        );
        wait_accepted(&agent, 100.0, Duration::from_secs(30))?;
    }

    let status = sim.wait(Duration::from_secs(120))?;
    eprintln!("{}", sim.log_tail(6));
    assert!(
        status.success(),
        "simulate exited with {status} (3 = not everything acked)"
    );
    let report = sim.report()?;
    agent.stop(Duration::from_secs(10))?;
    agent.check()?;
    let readings: Vec<ExportedReading> = agent.export()?;

    assert!(report.all_acked);
    assert_eq!(report.devices.len(), DEVICES);
    let mut total = 0u64;
    let mut resent = 0u64;
    for d in &report.devices {
        assert!(d.finished && d.pending == 0, "{d:?}");
        assert_eq!(d.acked, d.last_seq, "{d:?}");
        assert_eq!(d.dropped, 0, "the ring never overflowed: {d:?}");
        // A device whose reconnect backoff spans both kills reconnects only once.
        assert!(d.connects >= 2, "reconnected after the kills: {d:?}");
        assert!(d.last_seq > 50, "sampled throughout: {d:?}");
        total += u64::from(d.last_seq);
        resent += d.resent;
    }
    eprintln!(
        "{} readings from {DEVICES} devices, {resent} re-sent, exported {} ({:.1}s)",
        total,
        readings.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        resent > 0,
        "the kills hit readings in flight, which had to be re-sent"
    );

    // Every sequence number of every device, once: no gaps, no duplicates...
    let expect: Vec<(String, u32, u32)> = report
        .devices
        .iter()
        .map(|d| (d.device.clone(), d.boot, d.last_seq))
        .collect();
    let problems = check_sequences(&readings, &expect);
    assert!(
        problems.is_empty(),
        "seed {seed}:\n  {}",
        problems.join("\n  ")
    );
    // ...and nothing else: no reading the simulator does not know about.
    for r in &readings {
        let known = report.devices.iter().any(|d| {
            d.device == r.device && d.boot == r.boot && r.seq.is_some_and(|s| s <= d.last_seq)
        });
        assert!(known, "unexpected reading in the buffer: {r:?}");
    }
    assert_eq!(readings.len() as u64, total, "exactly once");
    Ok(())
}

#[test]
fn a_device_whose_clock_starts_in_1970_gets_sensible_timestamps() -> anyhow::Result<()> {
    const PERIOD_MS: i64 = 200; // --rate 10 with two metrics
    let mut agent = Agent::start(AgentOptions {
        name: Some("clock-agent".into()),
        ..AgentOptions::default()
    })?;
    let begin = now_ms();
    let mut sim = Simulator::start(
        agent.root(),
        &agent,
        &[
            "--devices",
            "3",
            "--unset-clock",
            "3",
            "--rate",
            "10",
            "--duration",
            "6s",
            "--drain-timeout",
            "30s",
        ],
    )?;
    wait_accepted(&agent, 30.0, Duration::from_secs(30))?;
    // Freeze the agent for 1.5 s: the readings taken meanwhile arrive late, in a burst.
    signal(&agent, "STOP")?;
    std::thread::sleep(Duration::from_millis(1500));
    signal(&agent, "CONT")?;
    let status = sim.wait(Duration::from_secs(60))?;
    assert!(status.success(), "simulate exited with {status}");
    let end = now_ms();
    let report = sim.report()?;
    agent.stop(Duration::from_secs(10))?;
    let readings = agent.export()?;

    assert!(report.devices.iter().all(|d| d.clock == "unset"));
    let total: u64 = report.devices.iter().map(|d| u64::from(d.last_seq)).sum();
    assert_eq!(readings.len() as u64, total);
    for r in &readings {
        assert!(
            (begin - 1000..=end + 1000).contains(&r.ts),
            "timestamp {} is not within the run ({begin}..{end}): {r:?}",
            r.ts
        );
    }
    // Per device and metric, in sampling order, timestamps advance by about one sampling
    // period — also across the freeze, where arrival times jumped by 1.5 s and then
    // bunched up. Stamped on arrival, this would fail.
    for d in &report.devices {
        for metric in ["temperature", "humidity"] {
            let mut mine: Vec<&ExportedReading> = readings
                .iter()
                .filter(|r| r.device == d.device && r.metric == metric)
                .collect();
            mine.sort_by_key(|r| r.seq);
            assert!(
                mine.len() > 20,
                "{} {metric}: {} readings",
                d.device,
                mine.len()
            );
            for pair in mine.windows(2) {
                let gap = pair[1].ts - pair[0].ts;
                assert!(
                    (0..=5 * PERIOD_MS).contains(&gap),
                    "{} {metric}: seq {} → {} apart by {gap} ms (period {PERIOD_MS} ms)",
                    d.device,
                    pair[0].seq.unwrap_or(0),
                    pair[1].seq.unwrap_or(0)
                );
            }
        }
    }
    Ok(())
}

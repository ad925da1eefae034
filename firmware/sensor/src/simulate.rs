//! `fogline-sensor simulate`: a fleet of simulated devices, each running the firmware's
//! node loop over its own MQTT connection, with a progress line while it runs and a
//! summary (and optionally a JSON report) at the end. The same command is the load
//! generator for benchmarks: raise `--devices` and `--rate`.
//!
//! The run has three phases: sample for `--duration`, then drain (no new readings; wait
//! until every device's readings are acked, at most `--drain-timeout`), then stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::sync::watch;

use crate::clock::{DeviceClock, WallClock};
use crate::device::{run_device, DeviceReport, DeviceSpec, Phase};
use crate::signal::{NoDelay, SimSensor, METRICS};
use crate::{parse_duration, MqttArgs, MAX_RING};

/// Options of `fogline-sensor simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Number of simulated devices, each with its own MQTT connection.
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// Readings per second per device (one sample yields one reading per metric, so
    /// samples are taken every metrics/rate seconds; at most 1000 samples/s per device).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Metrics each device has: any of temperature, humidity, pressure.
    #[arg(long, value_delimiter = ',', default_value = "temperature,humidity")]
    pub metrics: Vec<String>,
    /// How long to sample, e.g. 30s, 5m, 1h; 0 samples until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    pub duration: Duration,
    /// After sampling, how long to wait for every reading to be acked.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Device ids are `<prefix>-0001`, `<prefix>-0002`, ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Readings each device can hold unacked; beyond it the oldest unsent are dropped.
    #[arg(long, default_value_t = 4096)]
    pub ring: usize,
    /// Readings each device may have published and not yet acked.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Re-send what is in flight when no ack progress is seen for this long.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub resend_after: Duration,
    /// How many devices (the first ones) have a wall clock that starts at 1970 when they
    /// boot, like boards without an RTC before NTP; they stamp readings with their uptime.
    #[arg(long, default_value_t = 0)]
    pub unset_clock: u32,
    /// Chance per sample of a temperature spike (5–15 °C up or down).
    #[arg(long, default_value_t = 0.001)]
    pub spike_probability: f64,
    /// Seed for the devices' signals (printed, so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a progress line this often; 0 turns it off.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub progress_every: Duration,
    /// Write a JSON report (per-device counters, boot ids and sequence ranges) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Sums over the fleet.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    /// Devices in the run.
    pub devices: usize,
    /// Devices connected right now.
    pub connected: usize,
    /// Readings taken.
    pub sampled: u64,
    /// Distinct readings published (sum of last_seq).
    pub sent: u64,
    /// Readings acked durable (sum of watermarks).
    pub acked: u64,
    /// Publishes of readings published before.
    pub resent: u64,
    /// Readings lost to a full ring.
    pub dropped: u64,
    /// Readings held, not yet acked.
    pub pending: u64,
    /// Connections made.
    pub connects: u64,
    /// Failed samplings.
    pub sensor_errors: u64,
}

impl Totals {
    fn of(reports: &[DeviceReport]) -> Totals {
        let mut t = Totals {
            devices: reports.len(),
            ..Totals::default()
        };
        for r in reports {
            t.connected += usize::from(r.connected);
            t.sampled += r.sampled;
            t.sent += u64::from(r.last_seq);
            t.acked += u64::from(r.acked);
            t.resent += r.resent;
            t.dropped += r.dropped;
            t.pending += r.pending as u64;
            t.connects += r.connects;
            t.sensor_errors += r.sensor_errors;
        }
        t
    }
}

/// The outcome of a run, also written as the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The seed the signals used.
    pub seed: u64,
    /// Seconds from start to end (sampling plus draining).
    pub elapsed_secs: f64,
    /// Seconds spent sampling.
    pub sampling_secs: f64,
    /// True when every device finished drained: everything it kept is acked.
    pub all_acked: bool,
    /// Fleet totals.
    pub totals: Totals,
    /// Per-device counters.
    pub devices: Vec<DeviceReport>,
}

fn snapshot(reports: &[Arc<Mutex<DeviceReport>>]) -> Vec<DeviceReport> {
    reports
        .iter()
        .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect()
}

fn progress_line(elapsed: Duration, t: &Totals, acked_per_sec: f64) -> String {
    format!(
        "[{:>7.1}s] connected {}/{}  sampled {}  sent {}  acked {}  resent {}  dropped {}  pending {}  ({:.0} acked/s)",
        elapsed.as_secs_f64(),
        t.connected,
        t.devices,
        t.sampled,
        t.sent,
        t.acked,
        t.resent,
        t.dropped,
        t.pending,
        acked_per_sec
    )
}

fn resolve_metrics(names: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in names {
        let name = name.trim();
        let Some(m) = METRICS.iter().find(|m| **m == name) else {
            bail!(
                "unknown metric {name:?}; choose from {}",
                METRICS.join(", ")
            );
        };
        if !out.contains(m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        bail!("--metrics needs at least one metric");
    }
    Ok(out)
}

/// Checks the arguments and works out the sampling period in milliseconds.
fn validate(args: &SimulateArgs, metrics: usize) -> anyhow::Result<u64> {
    if args.devices == 0 || args.devices > 100_000 {
        bail!("--devices must be 1..=100000");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of readings per second");
    }
    if args.ring == 0 || args.max_in_flight == 0 {
        bail!("--ring and --max-in-flight must be at least 1");
    }
    if args.ring > MAX_RING {
        bail!("--ring is at most {MAX_RING} readings per device");
    }
    if args.unset_clock > args.devices {
        bail!("--unset-clock cannot exceed --devices");
    }
    let period = (1000.0 * metrics as f64 / args.rate).round();
    if period < 1.0 {
        bail!(
            "--rate {} with {metrics} metrics needs more than 1000 samples/s per device; use more devices",
            args.rate
        );
    }
    let id = format!("{}-{:04}", args.prefix, args.devices);
    if !fogline_firmware::wire::valid_id(&id) {
        bail!("--prefix makes device ids like {id:?}, which are not 1-32 characters of [A-Za-z0-9_.-]");
    }
    Ok(period as u64)
}

/// Runs the fleet. `stop` resolves on each request to stop (Ctrl-C, SIGTERM): the first
/// ends sampling early and drains, the second stops at once.
pub async fn simulate<F, Fut>(args: SimulateArgs, mut stop: F) -> anyhow::Result<Summary>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let metrics = resolve_metrics(&args.metrics)?;
    let period_ms = validate(&args, metrics.len())?;
    let mqtt = args.mqtt.settings()?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    eprintln!(
        "simulating {} devices at {} readings/s each ({} every {period_ms} ms) against {}:{}, seed {seed}",
        args.devices,
        args.rate,
        metrics.join("+"),
        mqtt.host,
        mqtt.port
    );

    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let mut reports = Vec::new();
    let mut tasks = Vec::new();
    for i in 1..=args.devices {
        let device = format!("{}-{:04}", args.prefix, i);
        let wall = if i <= args.unset_clock {
            WallClock::Unset
        } else {
            WallClock::System
        };
        // Devices have been up for a while (up to three days) when the run starts.
        let clock = DeviceClock::new(wall, rng.u64(60_000..3 * 86_400_000));
        let sensor = SimSensor::new(metrics.clone(), rng.u64(..), args.spike_probability);
        let spec = DeviceSpec {
            device,
            // Fresh per run, never 0 (0 is what sequenced JSON readings without a boot get).
            boot: fastrand::u32(1..),
            ring: args.ring,
            sample_period_ms: period_ms,
            max_in_flight: args.max_in_flight,
            resend_after_ms: u64::try_from(args.resend_after.as_millis()).unwrap_or(u64::MAX),
            // A load generator keeps its rate after a stall.
            max_catch_up: 10_000,
            blocking_sensor: false,
            log_connections: false,
            mqtt: mqtt.clone(),
        };
        let report = Arc::new(Mutex::new(DeviceReport::default()));
        reports.push(report.clone());
        tasks.push(tokio::spawn(run_device(
            spec,
            sensor,
            NoDelay,
            clock,
            phase_rx.clone(),
            report,
        )));
    }
    drop(phase_rx);

    let started = Instant::now();
    let progress_every = (!args.progress_every.is_zero()).then_some(args.progress_every);
    let mut last_progress = (Instant::now(), 0u64);
    let mut print_progress = |reports: &[Arc<Mutex<DeviceReport>>]| {
        let t = Totals::of(&snapshot(reports));
        let (at, acked) = last_progress;
        let dt = at.elapsed().as_secs_f64().max(1e-3);
        let rate = t.acked.saturating_sub(acked) as f64 / dt;
        last_progress = (Instant::now(), t.acked);
        eprintln!("{}", progress_line(started.elapsed(), &t, rate));
    };

    // Phase 1: sample until the duration is over or we are asked to stop.
    let sampling_deadline =
        (!args.duration.is_zero()).then(|| tokio::time::Instant::now() + args.duration);
    let mut stopped_twice = false;
    {
        let mut ticker = progress_every.map(tokio::time::interval);
        loop {
            tokio::select! {
                () = async {
                    match sampling_deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => break,
                () = stop() => {
                    eprintln!("stopping: draining what the devices hold (again to stop at once)");
                    break;
                }
                _ = async {
                    match ticker.as_mut() {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending().await,
                    }
                } => print_progress(&reports),
            }
        }
    }
    let sampling_secs = started.elapsed().as_secs_f64();

    // Phase 2: drain.
    let _ = phase_tx.send(Phase::Drain);
    let drain_deadline = tokio::time::Instant::now() + args.drain_timeout;
    {
        let mut ticker = progress_every.map(tokio::time::interval);
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if tasks.iter().all(|t| t.is_finished()) {
                        break;
                    }
                }
                () = tokio::time::sleep_until(drain_deadline) => {
                    eprintln!("drain timeout: {:?} passed with readings still unacked", args.drain_timeout);
                    break;
                }
                () = stop() => {
                    stopped_twice = true;
                    break;
                }
                _ = async {
                    match ticker.as_mut() {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending().await,
                    }
                } => print_progress(&reports),
            }
        }
    }

    // Phase 3: stop whatever is left and collect.
    let _ = phase_tx.send(Phase::Stop);
    let mut all_acked = !stopped_twice;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(finished))) => all_acked &= finished,
            Ok(Ok(Err(e))) => {
                eprintln!("device failed: {e:#}");
                all_acked = false;
            }
            Ok(Err(e)) => {
                eprintln!("device task failed: {e}");
                all_acked = false;
            }
            Err(_) => {
                eprintln!("a device did not stop within 5 s");
                all_acked = false;
            }
        }
    }
    let devices = snapshot(&reports);
    let summary = Summary {
        seed,
        elapsed_secs: started.elapsed().as_secs_f64(),
        sampling_secs,
        all_acked,
        totals: Totals::of(&devices),
        devices,
    };
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&summary).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

/// The human-readable end of a run.
pub fn render_summary(s: &Summary) -> String {
    let t = &s.totals;
    let mut out = format!(
        "fogline-sensor simulate: {} devices, sampled for {:.1}s, finished after {:.1}s (seed {})\n",
        t.devices, s.sampling_secs, s.elapsed_secs, s.seed
    );
    out.push_str(&format!(
        "  sampled {}  sent {}  acked {}  resent {}  dropped {}  pending {}  connects {}  sensor errors {}\n",
        t.sampled, t.sent, t.acked, t.resent, t.dropped, t.pending, t.connects, t.sensor_errors
    ));
    if s.elapsed_secs > 0.0 {
        out.push_str(&format!(
            "  {:.0} readings/s acked on average\n",
            t.acked as f64 / s.elapsed_secs
        ));
    }
    if s.all_acked {
        out.push_str("  every reading the devices kept is acked by the agent\n");
    } else {
        let behind = s.devices.iter().filter(|d| !d.finished).count();
        out.push_str(&format!(
            "  NOT everything was acked: {behind} devices still hold {} readings\n",
            t.pending
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(argv: &[&str]) -> SimulateArgs {
        let mut full = vec!["sim"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("valid arguments").args
    }

    #[test]
    fn the_sampling_period_follows_rate_and_metrics() {
        let args = parse(&["--rate", "10", "--metrics", "temperature,humidity"]);
        let metrics = resolve_metrics(&args.metrics).expect("known metrics");
        assert_eq!(validate(&args, metrics.len()).expect("valid"), 200);
        let args = parse(&["--rate", "0.1", "--metrics", "pressure"]);
        assert_eq!(validate(&args, 1).expect("valid"), 10_000);
    }

    #[test]
    fn bad_arguments_are_explained_not_panicked_on() {
        assert!(resolve_metrics(&["co2".to_string()]).is_err());
        for argv in [
            &["--rate", "0"][..],
            &["--rate", "5000", "--metrics", "temperature"],
            &["--devices", "0"],
            &["--devices", "2", "--unset-clock", "3"],
            &["--ring", "0"],
            &["--ring", "1000000000000"],
            &["--prefix", "has space"],
        ] {
            let args = parse(argv);
            assert!(validate(&args, 1).is_err(), "{argv:?} accepted");
        }
    }

    #[test]
    fn totals_add_up_the_devices() {
        let d = |last_seq, acked, dropped| DeviceReport {
            last_seq,
            acked,
            dropped,
            sampled: u64::from(last_seq) + dropped,
            connected: true,
            ..DeviceReport::default()
        };
        let t = Totals::of(&[d(10, 8, 0), d(5, 5, 2)]);
        assert_eq!(
            (
                t.devices,
                t.connected,
                t.sent,
                t.acked,
                t.dropped,
                t.sampled
            ),
            (2, 2, 15, 13, 2, 17)
        );
        assert!(progress_line(Duration::from_secs(3), &t, 12.0).contains("acked 13"));
    }
}

//! `compare-bench`: fogline side by side with the setup users run today, a Mosquitto
//! broker on the edge node (persistence on) bridged at QoS 1 to an upstream Mosquitto.
//!
//! For each system it starts the edge and the upstream side as real processes on
//! loopback, with the harness's TCP proxy between them, drives the edge with the same
//! fleet of simulated sensors (one MQTT connection per device, QoS 1, sequenced JSON
//! readings) and measures, in one run: end-to-end throughput and the edge's memory from
//! 10 to 5,000 devices; latency, memory and CPU at a fixed moderate rate; loss after a
//! SIGKILL of the edge; loss, duplicates and drain time after an upstream outage (and
//! with a SIGKILL during it); memory and drain time with large backlogs. Every scenario
//! runs on fresh processes, fogline first, then Mosquitto.
//!
//! ```text
//! cargo build --profile bench-fast -p fogline-agent -p fogline-gateway -p fogline-tests
//! target/bench-fast/compare-bench            # the whole comparison, ~12 minutes
//! target/bench-fast/compare-bench --quick    # a smoke run, ~2 minutes
//! target/bench-fast/compare-bench --write    # also update BENCHMARKS.md, docs/bench/*.svg
//! ```

mod plot;
mod report;
mod rig;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fogline_tests::Fleet;
use rig::{Rig, RigOptions, System};

/// fogline versus Mosquitto with a bridge, measured in one run on this machine.
#[derive(Debug, Clone, Parser)]
#[command(name = "compare-bench")]
pub struct Args {
    /// A short smoke run: fewer devices, small backlogs, a 5 s outage.
    #[arg(long)]
    quick: bool,
    /// Device counts of the scale curve (each device is its own connection).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<u32>>,
    /// Backlogs (readings) of the drain curve.
    #[arg(long, value_delimiter = ',')]
    backlogs: Option<Vec<u64>>,
    /// Length of the upstream outage, seconds.
    #[arg(long)]
    outage_secs: Option<u64>,
    /// Seconds measured per point of the scale curve.
    #[arg(long, default_value_t = 5)]
    scale_secs: u64,
    /// Readings each device may have published and not yet seen acknowledged (scale runs).
    #[arg(long, default_value_t = 32)]
    window: u32,
    /// Devices and readings/s per device of the fixed-rate runs (latency, CPU, loss).
    #[arg(long, default_value_t = 100)]
    rate_devices: u32,
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Only these scenarios (steady, scale, kill, outage, kill-in-outage, backlog); all
    /// by default. A partial run is for trying things out: its table has gaps.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Mosquitto's `max_inflight_messages` (its default is 20); it also bounds the
    /// bridge's QoS 1 messages in flight to the upstream broker.
    #[arg(long, default_value_t = 20)]
    mosquitto_max_inflight: u32,
    /// Write the results into BENCHMARKS.md and docs/bench/*.svg under this directory
    /// (the workspace root) instead of only printing them.
    #[arg(long)]
    write: bool,
    /// Where BENCHMARKS.md and docs/ are.
    #[arg(long, default_value = ".")]
    root: std::path::PathBuf,
}

impl Args {
    fn devices(&self) -> Vec<u32> {
        self.devices.clone().unwrap_or_else(|| {
            if self.quick {
                vec![10, 100]
            } else {
                vec![10, 100, 1000, 5000]
            }
        })
    }
    fn backlogs(&self) -> Vec<u64> {
        self.backlogs.clone().unwrap_or_else(|| {
            if self.quick {
                vec![10_000, 100_000]
            } else {
                vec![100_000, 1_000_000, 5_000_000]
            }
        })
    }
    fn runs(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
    fn outage(&self) -> Duration {
        Duration::from_secs(self.outage_secs.unwrap_or(if self.quick { 5 } else { 30 }))
    }
}

/// Throughput and memory at one device count.
#[derive(Debug, Clone, Default)]
pub struct ScalePoint {
    pub devices: u32,
    /// Readings/s acknowledged at the edge.
    pub edge_rate: f64,
    /// Readings/s received upstream.
    pub upstream_rate: f64,
    /// Peak VmRSS of the edge process while measuring, MiB.
    pub rss_mib: f64,
}

/// Latency, memory and CPU at a fixed rate.
#[derive(Debug, Clone, Default)]
pub struct Steady {
    pub offered: f64,
    pub upstream_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
    pub rss_mib: f64,
    pub cpu_pct: f64,
}

/// Counted by sequence number at the end of a fault scenario.
#[derive(Debug, Clone, Default)]
pub struct Loss {
    /// Readings acknowledged at the edge (sum of the devices' watermarks).
    pub acked: u64,
    /// Of those, not received upstream.
    pub lost: u64,
    /// Readings received upstream more than once (extra copies).
    pub duplicates: u64,
    /// Seconds from restoring the link until the upstream had everything acknowledged
    /// at the edge when it was restored; and the same from the edge's reconnect.
    pub drain_from_restore: Option<f64>,
    pub drain_from_reconnect: Option<f64>,
}

/// One backlog run.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub readings: u64,
    pub fill_secs: f64,
    /// Edge VmRSS with the backlog held, MiB.
    pub rss_mib: f64,
    pub drain_from_reconnect: Option<f64>,
    pub drain_from_restore: Option<f64>,
    /// Readings received when the drain ended (== readings unless it timed out).
    pub drained: u64,
}

/// Everything measured for one system.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub scale: Vec<ScalePoint>,
    pub steady: Steady,
    pub kill: Loss,
    pub outage: Loss,
    pub kill_in_outage: Loss,
    pub backlogs: Vec<Backlog>,
}

const SYSTEMS: [System; 2] = [System::Fogline, System::Mosquitto];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fogline_tests::mosquitto::ensure_installed()?;
    let started = Instant::now();
    let env = report::Environment::capture(&args)?;
    println!("{}", env.text());
    let mut res = [Results::default(), Results::default()];
    let mut failures = Vec::new();

    for (i, &sys) in SYSTEMS.iter().enumerate().filter(|_| args.runs("steady")) {
        eprintln!("== steady rate: {}", sys.name());
        if let Some(v) = attempt(&mut failures, "steady", sys, || steady(&args, sys)) {
            res[i].steady = v;
        }
    }
    for &devices in args.devices().iter().filter(|_| args.runs("scale")) {
        for (i, &sys) in SYSTEMS.iter().enumerate() {
            eprintln!("== scale, {devices} devices: {}", sys.name());
            let what = format!("scale, {devices} devices");
            let p = attempt(&mut failures, &what, sys, || scale(&args, sys, devices));
            res[i].scale.push(p.unwrap_or(ScalePoint {
                devices,
                edge_rate: f64::NAN,
                upstream_rate: f64::NAN,
                rss_mib: f64::NAN,
            }));
        }
    }
    for (i, &sys) in SYSTEMS.iter().enumerate().filter(|_| args.runs("kill")) {
        eprintln!("== SIGKILL mid-stream: {}", sys.name());
        res[i].kill =
            attempt(&mut failures, "SIGKILL", sys, || kill(&args, sys)).unwrap_or_default();
    }
    for (i, &sys) in SYSTEMS.iter().enumerate().filter(|_| args.runs("outage")) {
        eprintln!("== outage: {}", sys.name());
        res[i].outage =
            attempt(&mut failures, "outage", sys, || outage(&args, sys, false)).unwrap_or_default();
    }
    for (i, &sys) in SYSTEMS
        .iter()
        .enumerate()
        .filter(|_| args.runs("kill-in-outage"))
    {
        eprintln!("== SIGKILL during an outage: {}", sys.name());
        res[i].kill_in_outage = attempt(&mut failures, "SIGKILL in an outage", sys, || {
            outage(&args, sys, true)
        })
        .unwrap_or_default();
    }
    for &n in args.backlogs().iter().filter(|_| args.runs("backlog")) {
        for (i, &sys) in SYSTEMS.iter().enumerate() {
            eprintln!("== backlog {n}: {}", sys.name());
            let what = format!("backlog {n}");
            let b = attempt(&mut failures, &what, sys, || backlog(&args, sys, n));
            res[i].backlogs.push(b.unwrap_or(Backlog {
                readings: n,
                rss_mib: f64::NAN,
                ..Backlog::default()
            }));
        }
    }
    let [fog, mosq] = res;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let table = report::markdown(&args, &env, &fog, &mosq, minutes, &failures);
    println!("{table}");
    if args.write {
        report::write(&args, &table, &fog, &mosq)?;
    }
    Ok(())
}

/// Runs one scenario; a failure is reported (and listed under the table) instead of
/// ending the whole comparison.
fn attempt<T>(
    failures: &mut Vec<String>,
    what: &str,
    sys: System,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
    match f() {
        Ok(v) => Some(v),
        Err(e) => {
            let line = format!("{what}, {}: {e:#}", sys.name());
            eprintln!("FAILED: {line}");
            failures.push(line);
            None
        }
    }
}

fn start_rig(args: &Args, sys: System, devices: u32, fast_reconnect: bool) -> anyhow::Result<Rig> {
    Rig::start(
        sys,
        RigOptions {
            devices,
            fast_reconnect,
            mosquitto_max_inflight: args.mosquitto_max_inflight,
        },
    )
}

fn sleep_sampling_rss(rig: &Rig, d: Duration, peak: &mut f64) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if let Ok(rss) = rig.edge_rss_mib() {
            *peak = peak.max(rss);
        }
        std::thread::sleep(Duration::from_millis(200).min(end - Instant::now()));
    }
}

fn acked_total(fleet: &Fleet) -> u64 {
    fleet.totals().1
}

fn nearest_rank(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64 / 1000.0
}

/// Has the upstream everything the edge had acknowledged by `target`? fogline: the
/// gateway's durable offset reached the agent's head; Mosquitto: every device's newest
/// reading up to its watermark arrived (the bridge forwards its queue in order, so what
/// is older either arrived too or was lost).
fn caught_up(rig: &Rig, target: &Target) -> bool {
    match target {
        Target::Head(head) => rig.received() >= *head,
        Target::Watermarks(w) => {
            let per = rig
                .observed
                .per_device
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            w.iter()
                .enumerate()
                .all(|(d, &want)| want == 0 || per.get(d).is_some_and(|rx| rx.max_seen >= want))
        }
    }
}

enum Target {
    Head(u64),
    Watermarks(Vec<u32>),
}

fn target_now(rig: &Rig, fleet: Option<&Fleet>) -> anyhow::Result<Target> {
    if let Some(head) = rig.edge_head()? {
        return Ok(Target::Head(head));
    }
    let fleet = fleet.context("a Mosquitto target needs the fleet's watermarks")?;
    Ok(Target::Watermarks(
        fleet.snapshots().iter().map(|s| s.acked).collect(),
    ))
}

/// Waits until `caught_up`, at most `timeout`; returns the time it took.
fn wait_caught_up(rig: &Rig, target: &Target, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if caught_up(rig, target) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Restores the cut link and waits (at most `timeout`) until the upstream caught up with
/// `target`. Returns the seconds that took from the restore and from the edge's reconnect
/// (the first new connection through the proxy); `None` when it did not happen.
fn restore_and_drain(rig: &Rig, target: &Target, timeout: Duration) -> (Option<f64>, Option<f64>) {
    let conns = rig.proxy.connections();
    rig.proxy.restore();
    let restored = Instant::now();
    let mut reconnected = None;
    while restored.elapsed() < timeout {
        if reconnected.is_none() && rig.proxy.connections() > conns {
            reconnected = Some(Instant::now());
        }
        if caught_up(rig, target) {
            let done = Instant::now();
            return (
                Some((done - restored).as_secs_f64()),
                reconnected.map(|r| done.saturating_duration_since(r).as_secs_f64()),
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (None, None)
}

/// Fixed moderate rate: publish-to-upstream latency, edge memory and CPU.
fn steady(args: &Args, sys: System) -> anyhow::Result<Steady> {
    let devices = args.rate_devices;
    let mut rig = start_rig(args, sys, devices, false)?;
    let mut fleet = rig.fleet(devices, 500, Some(args.rate), None)?;
    fleet.set_paused(false);
    std::thread::sleep(Duration::from_secs(3));
    let measure = Duration::from_secs(if args.quick { 5 } else { 10 });
    rig.observed.recording.store(true, Ordering::SeqCst);
    rig.sends.on.store(true, Ordering::SeqCst);
    let (cpu0, r0, t0) = (rig.edge_cpu_secs()?, rig.received(), Instant::now());
    let mut peak = 0.0;
    sleep_sampling_rss(&rig, measure, &mut peak);
    rig.sends.on.store(false, Ordering::SeqCst);
    let (cpu1, r1, secs) = (rig.edge_cpu_secs()?, rig.received(), t0.elapsed());
    let secs = secs.as_secs_f64();
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(60))?;
    let target = target_now(&rig, Some(&fleet))?;
    wait_caught_up(&rig, &target, Duration::from_secs(60))
        .context("upstream did not catch up within 60 s")?;
    std::thread::sleep(Duration::from_millis(200));
    rig.observed.recording.store(false, Ordering::SeqCst);
    fleet.shutdown();
    let mut lat: Vec<u64> = match sys {
        System::Mosquitto => std::mem::take(
            &mut *rig
                .observed
                .latencies_us
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ),
        System::Fogline => fogline_latencies(&mut rig)?,
    };
    lat.sort_unstable();
    let expected = rig.sends.len();
    if lat.len() < expected {
        eprintln!(
            "  latency: {} of {expected} readings sent while measuring were matched",
            lat.len()
        );
    }
    Ok(Steady {
        offered: f64::from(devices) * args.rate,
        upstream_rate: (r1 - r0) as f64 / secs,
        p50_ms: nearest_rank(&lat, 0.50),
        p99_ms: nearest_rank(&lat, 0.99),
        max_ms: lat.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
        samples: lat.len(),
        rss_mib: peak,
        cpu_pct: (cpu1 - cpu0) / secs * 100.0,
    })
}

/// A reading is received at the gateway when the first gateway ack covering its offset is
/// published (the ack follows the fsync).
fn fogline_latencies(rig: &mut Rig) -> anyhow::Result<Vec<u64>> {
    let acks = std::mem::take(&mut *rig.observed.acks.lock().unwrap_or_else(|e| e.into_inner()));
    let stored = rig.gateway_offsets()?;
    let mut out = Vec::new();
    for (device, seq, offset) in stored {
        let Some(sent) = rig.sends.get(device, seq) else {
            continue;
        };
        let i = acks.partition_point(|(_, next)| *next <= offset);
        if let Some((at, _)) = acks.get(i) {
            let us = at.saturating_duration_since(sent).as_micros();
            out.push(u64::try_from(us).unwrap_or(u64::MAX));
        }
    }
    Ok(out)
}

/// Saturation: every device keeps `window` readings in flight.
fn scale(args: &Args, sys: System, devices: u32) -> anyhow::Result<ScalePoint> {
    let rig = start_rig(args, sys, devices, false)?;
    let connect = Instant::now();
    let mut fleet = rig.fleet(devices, args.window, None, None)?;
    eprintln!("  {devices} devices connected in {:.1?}", connect.elapsed());
    fleet.set_paused(false);
    let mut peak = 0.0;
    sleep_sampling_rss(&rig, Duration::from_secs(2), &mut peak);
    let (a0, r0, t0) = (acked_total(&fleet), rig.received(), Instant::now());
    let mut peak = 0.0;
    sleep_sampling_rss(&rig, Duration::from_secs(args.scale_secs), &mut peak);
    let (a1, r1) = (acked_total(&fleet), rig.received());
    let secs = t0.elapsed().as_secs_f64();
    let snaps = fleet.snapshots();
    let reconnects: u32 = snaps.iter().map(|s| s.connects.saturating_sub(1)).sum();
    let errors: u32 = snaps.iter().map(|s| s.connection_errors).sum();
    let behind = snaps.iter().filter(|s| s.acked < s.sent).count();
    eprintln!(
        "  devices: {reconnects} reconnects, {errors} connection errors, {behind} waiting for an ack at the end"
    );
    fleet.stop_publishing();
    fleet.shutdown();
    let p = ScalePoint {
        devices,
        edge_rate: (a1 - a0) as f64 / secs,
        upstream_rate: (r1 - r0) as f64 / secs,
        rss_mib: peak,
    };
    eprintln!("  {p:?}");
    Ok(p)
}

/// Counts, per device, acknowledged readings missing upstream and extra copies.
fn count_loss(rig: &mut Rig, fleet: &Fleet, devices: u32) -> anyhow::Result<Loss> {
    let snaps = fleet.snapshots();
    let rx = rig.received_per_device(devices)?;
    let mut loss = Loss::default();
    for (d, snap) in snaps.iter().enumerate() {
        loss.acked += u64::from(snap.acked);
        let counts = rx.get(d).map(|r| r.counts.as_slice()).unwrap_or(&[]);
        for seq in 1..=snap.acked as usize {
            if counts.get(seq).copied().unwrap_or(0) == 0 {
                loss.lost += 1;
            }
        }
        loss.duplicates += counts
            .iter()
            .map(|&c| u64::from(c.saturating_sub(1)))
            .sum::<u64>();
    }
    Ok(loss)
}

/// Stops the devices, waits until they see everything acknowledged and the upstream has
/// it (or stops receiving: lost readings never arrive), then counts.
fn settle_and_count(rig: &mut Rig, mut fleet: Fleet, devices: u32) -> anyhow::Result<Loss> {
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(120))?;
    let target = target_now(rig, Some(&fleet))?;
    if wait_caught_up(rig, &target, Duration::from_secs(90)).is_none() {
        eprintln!("  upstream did not catch up within 90 s; counting what arrived");
    }
    // Late duplicates (a bridge re-sending its in-flight window) arrive right after.
    std::thread::sleep(Duration::from_secs(1));
    let loss = count_loss(rig, &fleet, devices)?;
    fleet.shutdown();
    Ok(loss)
}

/// SIGKILL of the edge process mid-stream, restarted at once on its data.
fn kill(args: &Args, sys: System) -> anyhow::Result<Loss> {
    let devices = args.rate_devices;
    let mut rig = start_rig(args, sys, devices, false)?;
    let fleet = rig.fleet(devices, 500, Some(args.rate), None)?;
    fleet.set_paused(false);
    std::thread::sleep(Duration::from_secs(5));
    rig.crash_and_restart_edge()?;
    std::thread::sleep(Duration::from_secs(5));
    let loss = settle_and_count(&mut rig, fleet, devices)?;
    eprintln!("  {loss:?}");
    Ok(loss)
}

/// The upstream link cut for the outage (optionally with a SIGKILL of the edge halfway),
/// then restored while the devices go on publishing.
fn outage(args: &Args, sys: System, kill_halfway: bool) -> anyhow::Result<Loss> {
    let devices = args.rate_devices;
    let mut rig = start_rig(args, sys, devices, false)?;
    let fleet = rig.fleet(devices, 500, Some(args.rate), None)?;
    fleet.set_paused(false);
    std::thread::sleep(Duration::from_secs(3));
    rig.proxy.cut();
    if kill_halfway {
        std::thread::sleep(args.outage() / 2);
        rig.crash_and_restart_edge()?;
        std::thread::sleep(args.outage() / 2);
    } else {
        std::thread::sleep(args.outage());
    }
    let target = target_now(&rig, Some(&fleet))?;
    let drain = restore_and_drain(&rig, &target, Duration::from_secs(180));
    let mut loss = settle_and_count(&mut rig, fleet, devices)?;
    (loss.drain_from_restore, loss.drain_from_reconnect) = drain;
    eprintln!("  {loss:?}");
    Ok(loss)
}

/// `readings` buffered at the edge behind a cut link; memory, then the drain.
fn backlog(args: &Args, sys: System, readings: u64) -> anyhow::Result<Backlog> {
    let devices = 100u32;
    let per_device = u32::try_from(readings / u64::from(devices)).unwrap_or(u32::MAX);
    let readings = u64::from(per_device) * u64::from(devices);
    let rig = start_rig(args, sys, devices, true)?;
    rig.proxy.cut();
    let mut fleet = rig.fleet(devices, 256, None, Some(per_device))?;
    let fill = Instant::now();
    fleet.set_paused(false);
    while acked_total(&fleet) < readings {
        anyhow::ensure!(
            fill.elapsed() < Duration::from_secs(600),
            "buffering {readings} readings took over 10 minutes ({} acknowledged)",
            acked_total(&fleet)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let fill_secs = fill.elapsed().as_secs_f64();
    fleet.shutdown();
    std::thread::sleep(Duration::from_millis(500));
    let rss_mib = rig.edge_rss_mib()?;
    let target = match rig.edge_head()? {
        Some(head) => Target::Head(head),
        None => Target::Watermarks(vec![per_device; devices as usize]),
    };
    let (drain_from_restore, drain_from_reconnect) =
        restore_and_drain(&rig, &target, Duration::from_secs(600));
    let b = Backlog {
        readings,
        fill_secs,
        rss_mib,
        drain_from_restore,
        drain_from_reconnect,
        drained: rig.received(),
    };
    eprintln!("  {b:?}");
    Ok(b)
}

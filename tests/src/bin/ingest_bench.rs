//! `ingest-bench`: how many readings per second the real agent makes durable.
//!
//! Starts `fogline-agent` as a separate process on a fresh data dir for each device count
//! and drives it with one MQTT connection per simulated device (QoS 1, sequenced readings,
//! a bounded window of readings not yet acked end-to-end, each device subscribed to its
//! own `fogline/ack/<device>`). Reports durable readings/s (counted by the ack
//! watermark), publish-to-ack latency, the agent's memory, fsyncs/s and bytes on disk per
//! buffered reading.
//!
//! Build the agent for speed first:
//!
//! ```text
//! cargo build --profile bench-fast -p fogline-agent -p fogline-tests
//! target/bench-fast/ingest-bench --devices 10,100,1000 --seconds 10 --markdown
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use fogline_firmware::wire::Timestamp;
use fogline_tests::{
    find_bin, json_payload, metric, postcard_frame, Agent, AgentOptions, DeviceSpec, Fleet,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Payload {
    /// `{"value":..,"seq":..,"boot":..}`
    Json,
    /// The firmware's postcard frame.
    Postcard,
}

/// Ingest benchmark for fogline-agent: durable readings/s, ack latency, memory, fsyncs.
#[derive(Debug, Parser)]
#[command(name = "ingest-bench")]
struct Args {
    /// The fogline-agent binary (default: $FOGLINE_AGENT_BIN, else next to this program).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Device counts to run, one fresh agent each; every device is its own connection.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    devices: Vec<u32>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds after all devices connected, before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Readings each device may have sent but not yet seen acked end-to-end.
    #[arg(long, default_value_t = 32)]
    window: u32,
    /// Readings per second per device (0: as fast as the window allows). A fixed rate
    /// measures latency and memory at a realistic load instead of at saturation.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Payload encoding.
    #[arg(long, value_enum, default_value_t = Payload::Json)]
    payload: Payload,
    /// Extra agent environment, KEY=VALUE (e.g. FOGLINE_BUFFER__BATCH_MAX_DELAY_MS=5).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// What counts as the durable acknowledgement: the `fogline/ack/<device>` watermark
    /// (each device subscribes to it), or the MQTT PUBACK (no subscription; the agent
    /// sends it after the commit). Use `watermark` for agents older than the front end.
    #[arg(long, value_enum, default_value_t = Ack::Watermark)]
    ack: Ack,
    /// Also print a Markdown table (for BENCHMARKS.md).
    #[arg(long)]
    markdown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ack {
    Watermark,
    Puback,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

struct Row {
    devices: u32,
    durable_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    hwm_mib: f64,
    fsyncs_per_sec: f64,
    per_fsync: f64,
    disk_bytes_per_reading: f64,
    stored_bytes_per_reading: f64,
    reconnects: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.agent_bin {
        Some(bin) => bin.clone(),
        None => find_bin("fogline-agent", "FOGLINE_AGENT_BIN")?,
    };
    print_machine(&args, &bin);
    let mut rows = Vec::new();
    for &devices in &args.devices {
        eprintln!("--- {devices} devices ---");
        let row =
            run(&args, &bin, devices).with_context(|| format!("run with {devices} devices"))?;
        print_row_text(&row, rows.is_empty());
        rows.push(row);
    }
    if args.markdown {
        println!();
        println!("| devices | durable readings/s | ack p50 (ms) | ack p99 (ms) | agent RSS (MiB) | RSS peak (MiB) | fsyncs/s | readings/fsync | file bytes/reading | stored bytes/reading |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
                r.devices,
                r.durable_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.rss_mib,
                r.hwm_mib,
                r.fsyncs_per_sec,
                r.per_fsync,
                r.disk_bytes_per_reading,
                r.stored_bytes_per_reading
            );
        }
    }
    Ok(())
}

fn print_machine(args: &Args, bin: &std::path::Path) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
        .unwrap_or_default();
    let cmdline: Vec<String> = std::env::args().collect();
    println!("machine: {cpus} CPUs, {model}, {mem} RAM");
    println!("command: {}", cmdline.join(" "));
    println!(
        "agent:   {} (profile dir: {})",
        bin.display(),
        bin.parent()
            .and_then(|p| p.file_name())
            .map_or("?".into(), |n| n.to_string_lossy())
    );
    println!(
        "runs:    {}s measured after {}s warm-up, window {} readings/device, {}, {:?} payloads; \
         the load generator shares the machine with the agent",
        args.seconds,
        args.warmup,
        args.window,
        if args.rate > 0.0 {
            format!("{} readings/s per device", args.rate)
        } else {
            "as fast as the window allows".to_owned()
        },
        args.payload
    );
}

fn run(args: &Args, bin: &std::path::Path, devices: u32) -> anyhow::Result<Row> {
    let mut opts = AgentOptions {
        bin: Some(bin.to_path_buf()),
        name: Some(format!("bench-agent-{devices}")),
        ..AgentOptions::default()
    }
    .env("FOGLINE_MQTT__MAX_CONNECTIONS", devices + 64)
    .env("FOGLINE_LOG__LEVEL", "warn");
    opts.env.extend(args.env.iter().cloned());
    let mut agent = Agent::start(opts)?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    fleet.set_measuring(false);
    fleet.set_paused(true);
    let connect_start = Instant::now();
    let payload = args.payload;
    for d in 0..devices {
        let mut spec = DeviceSpec::json(format!("bench-{d:04}"), "temp", 1);
        spec.window = args.window;
        spec.record_latency = true;
        if args.ack == Ack::Puback {
            spec.ack = fogline_tests::AckSource::PubAck;
        }
        if args.rate > 0.0 {
            spec.interval = Some(Duration::from_secs_f64(1.0 / args.rate));
        }
        if let Payload::Postcard = payload {
            let started = Instant::now();
            spec.payload = Arc::new(move |device, boot, seq| {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let value = f64::from(seq % 1000) / 10.0;
                let frame = postcard_frame(device, "temp", seq, boot, Timestamp::BootMs(ms), value)
                    .unwrap_or_default();
                (format!("sensors/{device}/temp"), frame)
            });
        } else {
            spec.payload = Arc::new(|device, boot, seq| {
                let value = f64::from(seq % 1000) / 10.0;
                (
                    format!("sensors/{device}/temp"),
                    json_payload(value, Some(seq), Some(boot), None),
                )
            });
        }
        fleet.add(spec)?;
        if (d + 1) % 100 == 0 {
            fleet.wait_connected(Duration::from_secs(60))?;
        }
    }
    // Devices connect in steps of 100, as a fleet coming online would, then all start
    // publishing together.
    fleet.wait_connected(Duration::from_secs(60))?;
    let snaps = fleet.snapshots();
    let failed_connects: u32 = snaps.iter().map(|s| s.connection_errors).sum();
    eprintln!(
        "{devices} devices connected in {:?} ({failed_connects} connection errors)",
        connect_start.elapsed()
    );
    report_errors(&snaps);
    fleet.set_paused(false);
    std::thread::sleep(Duration::from_secs(args.warmup));

    let commits = |agent: &Agent| -> anyhow::Result<f64> {
        Ok(metric(
            &agent.metrics()?,
            "fogline_buffer_commits_total",
            &[],
        ))
    };
    for d in fleet.devices() {
        d.take_latencies_us();
    }
    let c0 = commits(&agent)?;
    let a0 = fleet.totals().1;
    let t0 = Instant::now();
    fleet.set_measuring(true);
    let mut peak_rss = (0, 0);
    let end = t0 + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250).min(end - Instant::now()));
        if let Ok((rss, hwm)) = agent.rss_kib() {
            peak_rss = (peak_rss.0.max(rss), hwm);
        }
    }
    let c1 = commits(&agent)?;
    let a1 = fleet.totals().1;
    let elapsed = t0.elapsed().as_secs_f64();
    fleet.set_measuring(false);
    let (rss, hwm) = agent.rss_kib()?;
    let mut latencies: Vec<u32> = fleet
        .devices()
        .iter()
        .flat_map(|d| d.take_latencies_us())
        .collect();
    latencies.sort_unstable();
    let snaps = fleet.snapshots();
    let reconnects: u64 = snaps
        .iter()
        .map(|s| u64::from(s.connects.saturating_sub(1)))
        .sum();
    report_errors(&snaps);
    fleet.stop_publishing();
    fleet.shutdown();
    agent.stop(Duration::from_secs(20))?;
    let stats = agent.stats()?;
    let readings = stats["readings"].as_f64().unwrap_or(0.0);
    let stored_bytes_per_reading = stats["bytes_per_reading"].as_f64().unwrap_or(f64::NAN);
    let file_bytes = std::fs::metadata(agent.data_dir().join("buffer.redb"))
        .map(|m| m.len() as f64)
        .unwrap_or(0.0);

    let durable = (a1 - a0) as f64;
    let fsyncs = c1 - c0;
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        f64::from(latencies[i]) / 1000.0
    };
    Ok(Row {
        devices,
        durable_per_sec: durable / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rss_mib: rss.max(peak_rss.0) as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
        fsyncs_per_sec: fsyncs / elapsed,
        per_fsync: if fsyncs > 0.0 {
            durable / fsyncs
        } else {
            f64::NAN
        },
        disk_bytes_per_reading: if readings > 0.0 {
            file_bytes / readings
        } else {
            f64::NAN
        },
        stored_bytes_per_reading,
        reconnects,
    })
}

/// Prints each distinct last connection error and how many devices had it.
fn report_errors(snaps: &[fogline_tests::DeviceSnapshot]) {
    let mut errors: Vec<(String, usize)> = Vec::new();
    for e in snaps.iter().filter_map(|s| s.last_error.clone()) {
        match errors.iter_mut().find(|(k, _)| *k == e) {
            Some((_, n)) => *n += 1,
            None => errors.push((e, 1)),
        }
    }
    for (e, n) in errors {
        eprintln!("  {n} devices last saw connection error: {e}");
    }
}

fn print_row_text(r: &Row, header: bool) {
    if header {
        println!(
            "{:>8} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>6}",
            "devices",
            "durable/s",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
            "peak MiB",
            "fsyncs/s",
            "rd/fsync",
            "disk B/rd",
            "stored B/rd",
            "reconn"
        );
    }
    println!(
        "{:>8} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>9.1} {:>11.1} {:>11.1} {:>6}",
        r.devices,
        r.durable_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.rss_mib,
        r.hwm_mib,
        r.fsyncs_per_sec,
        r.per_fsync,
        r.disk_bytes_per_reading,
        r.stored_bytes_per_reading,
        r.reconnects
    );
}

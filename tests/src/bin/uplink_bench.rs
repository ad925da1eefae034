//! `uplink-bench`: how fast an agent drains a backlog to the gateway after an outage,
//! how fresh the live view stays meanwhile, and how much the gateway ingests from many
//! agents. Starts the real binaries as processes on loopback.
//!
//! ```text
//! cargo build --profile bench-fast -p fogline-agent -p fogline-gateway -p fogline-tests
//! target/bench-fast/uplink-bench --backlog 1000000 --agents 10
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fogline_tests::bench::{machine, percentile};
use fogline_tests::{Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[derive(Debug, Parser)]
#[command(name = "uplink-bench")]
struct Args {
    /// Readings to buffer behind a cut link before measuring the drain.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Agents feeding one gateway in the ingest run (0 skips it).
    #[arg(long, default_value_t = 10)]
    agents: u32,
    /// Drain paces to measure, readings/s (0: unlimited), one fresh run each.
    #[arg(long, value_delimiter = ',', default_value = "0,200000")]
    drain_rates: Vec<u64>,
    /// Seconds measured in the gateway ingest run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn agent_for(gateway: impl ToString, site: &str, node: &str) -> AgentOptions {
    AgentOptions::default()
        .env("FOGLINE_UPLINK__GATEWAY", gateway)
        .env("FOGLINE_NODE__SITE", site)
        .env("FOGLINE_NODE__ID", node)
        .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 100)
        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 500)
        .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 100)
        .env("FOGLINE_BUFFER__MAX_BYTES", 1u64 << 30)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "machine: {}\ncommand: {}",
        machine(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("\n| backlog | drain_rate | drain s | readings/s | MB/s | live p50 ms | live p99 ms | live samples |");
    println!("|---|---|---|---|---|---|---|---|");
    for &rate in &args.drain_rates {
        drain(&args, rate)?;
    }
    if args.agents > 0 {
        fan_in(&args)?;
    }
    Ok(())
}

/// Fills an agent behind a cut link, restores it, and times the drain while a probe
/// device's aggregate is watched at the gateway.
fn drain(args: &Args, rate: u64) -> anyhow::Result<()> {
    let gw = Gateway::start(&[])?;
    let proxy = TcpProxy::start(gw.mqtt_addr())?;
    proxy.cut();
    let agent = Agent::start(
        agent_for(proxy.addr(), "bench", "edge").env("FOGLINE_UPLINK__DRAIN_RATE", rate),
    )?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    let devices = 100u32;
    for i in 0..devices {
        let mut spec = DeviceSpec::json(format!("bulk-{i}"), "temp", 1);
        spec.window = 256;
        spec.max_seq = u32::try_from(args.backlog / u64::from(devices)).unwrap_or(u32::MAX);
        fleet.add(spec)?;
    }
    let fill_started = Instant::now();
    let per_device = args.backlog / u64::from(devices);
    while fleet.totals().1 < per_device * u64::from(devices) {
        anyhow::ensure!(
            fill_started.elapsed() < Duration::from_secs(600),
            "filling the backlog took over 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "filled {head} readings behind a cut link in {:.1}s",
        fill_started.elapsed().as_secs_f64()
    );
    fleet.shutdown();

    // A probe device publishes a new value every 100 ms during the drain; its aggregate
    // at the gateway shows when the live view caught up with it.
    let mut opts = MqttOptions::new("bench-dashboard", "127.0.0.1", gw.mqtt_port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (dash, mut dash_conn) = Client::new(opts, 100);
    dash.subscribe("agg/bench/probe/live/10s", QoS::AtMostOnce)?;
    let (tx, rx) = std::sync::mpsc::channel::<(f64, Instant)>();
    std::thread::spawn(move || {
        for event in dash_conn.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let json: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let Some(last) = json["last"].as_f64() {
                        let _ = tx.send((last, Instant::now()));
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    let mut probe_opts = MqttOptions::new("bench-probe", "127.0.0.1", agent.mqtt_port());
    probe_opts.set_keep_alive(Duration::from_secs(10));
    let (probe, mut probe_conn) = Client::new(probe_opts, 100);
    std::thread::spawn(move || for _ in probe_conn.iter() {});

    let bytes_before = agent.status()?["backlog"]["gateway"]["bytes_sent"]
        .as_u64()
        .unwrap_or(0);
    proxy.restore();
    let started = Instant::now();
    let mut sent_at: Vec<(f64, Instant)> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut n = 0u32;
    loop {
        n += 1;
        let value = f64::from(n);
        probe.publish(
            "sensors/probe/live",
            QoS::AtLeastOnce,
            false,
            value.to_string(),
        )?;
        sent_at.push((value, Instant::now()));
        std::thread::sleep(Duration::from_millis(50));
        while let Ok((last, at)) = rx.try_recv() {
            if let Some(i) = sent_at.iter().position(|(v, _)| *v == last) {
                latencies.push(at.duration_since(sent_at[i].1).as_secs_f64() * 1000.0);
                sent_at.drain(..=i);
            }
        }
        let at = gw.next_offset("bench", "edge")?;
        if at >= head {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "drain took over 10 minutes"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = agent.status()?["backlog"]["gateway"]["bytes_sent"]
        .as_u64()
        .unwrap_or(0)
        - bytes_before;
    latencies.sort_by(f64::total_cmp);
    println!(
        "| {head} | {} | {secs:.1} | {:.0} | {:.1} | {:.0} | {:.0} | {} |",
        if rate == 0 {
            "unlimited".to_owned()
        } else {
            rate.to_string()
        },
        head as f64 / secs,
        bytes as f64 / secs / 1e6,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    Ok(())
}

/// Many agents, each with its own devices, all uplinking to one gateway.
fn fan_in(args: &Args) -> anyhow::Result<()> {
    let gw = Gateway::start(&[])?;
    let mut agents = Vec::new();
    let mut fleets = Vec::new();
    for a in 0..args.agents {
        let agent = Agent::start(agent_for(gw.mqtt_addr(), "fan", &format!("edge-{a}")))
            .with_context(|| format!("agent {a}"))?;
        let mut fleet = Fleet::new(agent.mqtt_addr())?;
        for d in 0..10 {
            let mut spec = DeviceSpec::json(format!("dev-{d}"), "temp", 1);
            spec.window = 128;
            fleet.add(spec)?;
        }
        agents.push(agent);
        fleets.push(fleet);
    }
    std::thread::sleep(Duration::from_secs(3));
    let stored = || gw.metric("fogline_gateway_readings", &[]);
    let before = stored()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let after = stored()?;
    let secs = started.elapsed().as_secs_f64();
    println!("\n| agents | devices | gateway stored readings/s |");
    println!("|---|---|---|");
    println!(
        "| {} | {} | {:.0} |",
        args.agents,
        args.agents * 10,
        (after - before) / secs
    );
    for f in &mut fleets {
        f.stop_publishing();
    }
    Ok(())
}

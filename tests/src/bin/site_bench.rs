//! `site-bench`: how long a site is without an uplink when its leader dies, and what
//! replication costs. Starts three real agents and a real gateway on loopback (every
//! link through a test proxy, as in the site tests).
//!
//! ```text
//! cargo build --profile bench-fast -p fogline-agent -p fogline-gateway -p fogline-tests
//! target/bench-fast/site-bench --trials 20 --seconds 10
//! ```
//!
//! Failover: sensors publish to every agent; each trial SIGKILLs the leader and measures
//! the time until the gateway acks the first batch after the kill (and until a new leader
//! is elected), then restarts the killed agent and lets the site settle.
//!
//! Replication overhead: sensors publish as fast as their ack window allows to all three
//! agents; device acks wait for `min_insync = replication_factor` copies; the figure is
//! acked readings/s over the whole site.

use std::time::{Duration, Instant};

use clap::Parser;
use fogline_tests::bench::{machine, percentile};
use fogline_tests::{DeviceSpec, Fleet, Site, SiteOptions};

#[derive(Debug, Parser)]
#[command(name = "site-bench")]
struct Args {
    /// Leader kills to measure (0 skips the failover run).
    #[arg(long, default_value_t = 20)]
    trials: u32,
    /// Seconds measured per replication factor (0 skips the overhead run).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Replication factors to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    factors: Vec<usize>,
    /// Devices per agent in the overhead run.
    #[arg(long, default_value_t = 10)]
    devices: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "machine: {}\ncommand: {}",
        machine(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    if args.trials > 0 {
        failover(args.trials)?;
    }
    if args.seconds > 0 {
        println!("\n| replication factor | min_insync | site acked readings/s | per agent |");
        println!("|---|---|---|---|");
        for &rf in &args.factors {
            let rate = overhead(rf, args.devices, Duration::from_secs(args.seconds))?;
            println!("| {rf} | {rf} | {rate:.0} | {:.0} |", rate / 3.0);
        }
    }
    Ok(())
}

fn failover(trials: u32) -> anyhow::Result<()> {
    let mut site =
        Site::start(&SiteOptions::new("bench-f", 3).env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000))?;
    let all: Vec<usize> = (0..3).collect();
    site.wait_leader(Duration::from_secs(20), &[], &all)?;
    let mut fleets = site.fleets(1, Duration::from_millis(5), 1)?;
    let mut elected = Vec::new();
    let mut resumed = Vec::new();
    for trial in 1..=trials {
        std::thread::sleep(Duration::from_secs(2));
        let leader = site.wait_leader(Duration::from_secs(20), &[], &all)?;
        let origins: Vec<String> = (0..3)
            .map(|i| site.origin(i))
            .collect::<anyhow::Result<_>>()?;
        let before = site.gateway_marks(&origins)?;
        site.agents[leader].kill9()?;
        let killed = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let new = site.wait_leader(Duration::from_secs(20), &[leader], &survivors)?;
        let e = killed.elapsed();
        let r = site.wait_uplink_progress(&origins, &before, killed, Duration::from_secs(30))?;
        eprintln!(
            "trial {trial}: killed {}, {} elected after {:.0} ms, uplink resumed after {:.0} ms",
            site.ids[leader],
            site.ids[new],
            e.as_secs_f64() * 1000.0,
            r.as_secs_f64() * 1000.0
        );
        elected.push(e.as_secs_f64() * 1000.0);
        resumed.push(r.as_secs_f64() * 1000.0);
        site.agents[leader].restart()?;
    }
    for f in &mut fleets {
        f.stop_publishing();
        f.shutdown();
    }
    site.stop()?;
    elected.sort_by(f64::total_cmp);
    resumed.sort_by(f64::total_cmp);
    println!("\nfailover over {trials} leader kills (SIGKILL), 3 agents, tick 50 ms, election timeout 1-2 s:\n");
    println!("| measure | median ms | p90 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("kill → new leader elected", &elected),
        ("kill → first batch acked by the gateway", &resumed),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

fn overhead(rf: usize, devices: u32, measure: Duration) -> anyhow::Result<f64> {
    let mut site = Site::start(
        &SiteOptions::new("bench-r", 3)
            .env("FOGLINE_CLUSTER__REPLICATION_FACTOR", rf)
            .env("FOGLINE_CLUSTER__MIN_INSYNC", rf)
            .env("FOGLINE_CLUSTER__ACK_AFTER", "replicated"),
    )?;
    let all: Vec<usize> = (0..3).collect();
    site.wait_leader(Duration::from_secs(20), &[], &all)?;
    let mut fleets = Vec::new();
    for (i, agent) in site.agents.iter().enumerate() {
        let mut fleet = Fleet::new(agent.mqtt_addr())?;
        for k in 0..devices {
            let mut spec = DeviceSpec::json(format!("{}-d{k}", site.ids[i]), "temp", 1);
            spec.window = 64;
            fleet.add(spec)?;
        }
        fleet.wait_connected(Duration::from_secs(20))?;
        fleets.push(fleet);
    }
    std::thread::sleep(Duration::from_secs(2));
    let acked = |fleets: &[Fleet]| fleets.iter().map(|f| f.totals().1).sum::<u64>();
    let start = acked(&fleets);
    let t0 = Instant::now();
    std::thread::sleep(measure);
    let rate = (acked(&fleets) - start) as f64 / t0.elapsed().as_secs_f64();
    for f in &mut fleets {
        f.stop_publishing();
        f.shutdown();
    }
    site.stop()?;
    Ok(rate)
}

//! `faultlab`: power cuts, real partitions and a long soak, in numbers.
//!
//! Runs the trials of the fault lab (`fogline_tests::faultlab`) by the hundred — power
//! cuts of an agent (all unsynced writes lost, and with `--lose random` a random part of
//! them kept), of a gateway and of a peer's replica store; the partitions once each —
//! and the soak. Needs root (FUSE, network namespaces, nftables).
//!
//! ```text
//! cargo build --workspace --bins                 # the agent, gateway, fogline-powercut
//! target/debug/faultlab --trials 200 --write     # trials into BENCHMARKS.md
//! target/debug/faultlab --soak 1h --write        # the soak, its curve in docs/bench/soak.svg
//! target/debug/faultlab --quick                  # a short smoke run of everything, ~4 min
//! ```

mod plot;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fogline_tests::faultlab::partitions::{self, Partition, PartitionReport};
use fogline_tests::faultlab::powercut_trials::{self, TrialOptions, Trials};
use fogline_tests::faultlab::soak::{self, SoakOptions, SoakReport};

/// The fault lab: power cuts, partitions, soak.
#[derive(Debug, Parser)]
#[command(name = "faultlab")]
struct Args {
    /// Power-cut trials of the agent; a quarter as many each of the agent with random
    /// unsynced pages kept, the gateway and a peer's replica store.
    #[arg(long)]
    trials: Option<u32>,
    /// Run every partition scenario once.
    #[arg(long)]
    partitions: bool,
    /// Only these partitions (uplink, leader, follower, split, flap).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Soak for this long (`1h`, `10m`, `90s`).
    #[arg(long)]
    soak: Option<String>,
    /// Simulated devices in the soak.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Readings per second per device in the soak.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Time between two faults in the soak.
    #[arg(long, default_value = "60s")]
    fault_every: String,
    /// A short run of everything (few trials, the partitions, a 3-minute soak).
    #[arg(long)]
    quick: bool,
    /// Seed (random by default; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Write the results into BENCHMARKS.md (and docs/bench/soak.svg) under --root.
    #[arg(long)]
    write: bool,
    /// The workspace root.
    #[arg(long, default_value = ".")]
    root: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("faultlab: FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("faultlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{} GiB", kb / (1 << 20)));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {mem}, Linux {}", kernel.trim())
}

fn run(args: &Args) -> anyhow::Result<bool> {
    fogline_tests::powercut::powercut_available().context("power cuts need")?;
    fogline_tests::netlab::netlab_available().context("partitions need")?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    eprintln!("faultlab: seed {seed} (repeat with --seed {seed})");
    let trials = args.trials.or(args.quick.then_some(8));
    let soak_for = match (&args.soak, args.quick) {
        (Some(s), _) => Some(soak::parse_duration(s)?),
        (None, true) => Some(Duration::from_secs(180)),
        (None, false) => None,
    };
    let mut ok = true;
    if let Some(n) = trials {
        let results = run_trials(n, seed)?;
        ok &= results.iter().all(Trials::ok);
        let table = trials_markdown(&results, seed);
        println!("{table}");
        if args.write {
            write_block(args, "faultlab-trials", &table)?;
        }
    }
    if args.partitions || args.quick || args.only.is_some() {
        let which: Vec<Partition> = match &args.only {
            None => Partition::ALL.to_vec(),
            Some(names) => names
                .iter()
                .map(|n| parse_partition(n))
                .collect::<anyhow::Result<_>>()?,
        };
        let r = partitions::run_only(seed, 5, 3, &which)?;
        ok &= r.ok();
        let table = partitions_markdown(&r, seed);
        println!("{table}");
        if args.write && args.only.is_none() {
            write_block(args, "faultlab-partitions", &table)?;
        }
    }
    if let Some(duration) = soak_for {
        let opts = SoakOptions {
            duration,
            devices: args.devices,
            rate: args.rate,
            fault_every: if args.quick && args.soak.is_none() {
                Duration::from_secs(30)
            } else {
                soak::parse_duration(&args.fault_every)?
            },
            sample_every: Duration::from_secs(10),
            seed,
        };
        let r = soak::run(&opts)?;
        ok &= r.ok();
        let table = soak_markdown(&r, &opts, seed, args);
        println!("{table}");
        if args.write {
            write_block(args, "faultlab-soak", &table)?;
            let dir = args.root.join("docs").join("bench");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("soak.svg"), plot::soak_svg(&r))?;
        }
    }
    Ok(ok)
}

fn parse_partition(name: &str) -> anyhow::Result<Partition> {
    Ok(match name {
        "uplink" => Partition::UplinkCut,
        "leader" => Partition::IsolateLeader,
        "follower" => Partition::IsolateFollower,
        "split" => Partition::Split,
        "flap" => Partition::Flap,
        other => {
            anyhow::bail!("unknown partition {other:?} (uplink, leader, follower, split, flap)")
        }
    })
}

fn run_trials(n: u32, seed: u64) -> anyhow::Result<Vec<Trials>> {
    let quarter = (n / 4).max(1);
    let mut out = Vec::new();
    let t = powercut_trials::agent_trials(&TrialOptions::new(n, seed))?;
    eprintln!("[faultlab] {}", t.summary());
    out.push(t);
    let mut random = TrialOptions::new(quarter, seed ^ 1);
    random.lose_random = true;
    let mut t = powercut_trials::agent_trials(&random)?;
    t.kind = "agent, random unsynced pages kept";
    eprintln!("[faultlab] {}", t.summary());
    out.push(t);
    let t = powercut_trials::gateway_trials(&TrialOptions::new(quarter, seed ^ 2))?;
    eprintln!("[faultlab] {}", t.summary());
    out.push(t);
    let t = powercut_trials::replica_trials(&TrialOptions::new(quarter, seed ^ 3))?;
    eprintln!("[faultlab] {}", t.summary());
    out.push(t);
    Ok(out)
}

fn n(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn trials_markdown(results: &[Trials], seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Power-cut trials (`faultlab --trials {}`, seed {seed}, {}):\n",
        results.first().map_or(0, |t| t.trials),
        machine()
    );
    let _ = writeln!(
        s,
        "| store cut | trials | readings acked | lost at the cuts | lost at the end | duplicated | \
         check failures | unsynced pages at the cuts | requests caught in flight | time |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for t in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            t.kind,
            t.trials,
            n(t.at_end.acked),
            t.at_cuts.lost,
            t.at_end.lost,
            t.at_cuts.duplicated + t.at_end.duplicated,
            t.check_failures,
            n(t.unsynced_pages),
            t.held_requests,
            t.elapsed.as_secs_f64()
        );
    }
    for t in results.iter().filter(|t| !t.problems.is_empty()) {
        let _ = writeln!(s, "\nProblems ({}): {}", t.kind, t.problems.join("; "));
    }
    s
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
}

fn partitions_markdown(r: &PartitionReport, seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Partitions (`faultlab --partitions`, seed {seed}, {}): three agents and a gateway in \
         namespaces, packets dropped by nftables; `uplink.keepalive_secs` = {} s, lease 16 × \
         50 ms = 800 ms. Times from the moment the rules went in.\n",
        machine(),
        r.keepalive.as_secs()
    );
    let _ = writeln!(
        s,
        "| partition | leader | lease lost | gateway's last progress from the cut-off leader | \
         new leader elected | half-open links seen down | caught up after healing |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for sc in &r.scenarios {
        let detected: Vec<String> = sc
            .detected
            .iter()
            .map(|(l, d)| format!("{l} {:.1} s", d.as_secs_f64()))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} → {} | {} | {} | {} | {} | {} |",
            sc.name,
            sc.leader_before,
            sc.leader_after,
            ms(sc.lease_lost),
            match (sc.forwarded_until, sc.lease_lost) {
                (None, Some(_)) => "none after the cut".to_owned(),
                (f, _) => ms(f),
            },
            ms(sc.elected),
            if detected.is_empty() {
                "—".into()
            } else {
                detected.join(", ")
            },
            ms(sc.caught_up)
        );
    }
    let _ = writeln!(
        s,
        "\nAt the gateway: {} readings, lost {}, duplicated {} ({:.0} s in all).",
        n(r.at_end.acked),
        r.at_end.lost,
        r.at_end.duplicated,
        r.elapsed.as_secs_f64()
    );
    for sc in r.scenarios.iter().filter(|s| !s.problems.is_empty()) {
        let _ = writeln!(s, "\nProblems ({}): {}", sc.name, sc.problems.join("; "));
    }
    s
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn soak_markdown(r: &SoakReport, opts: &SoakOptions, seed: u64, args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Soak (`faultlab --soak {}`, seed {seed}, {}): {} devices × {} readings/s, a random fault \
         every {} s, RSS and descriptors sampled every {} s; {:.0} min run.\n",
        args.soak.as_deref().unwrap_or("3m"),
        machine(),
        r.devices,
        r.rate,
        opts.fault_every.as_secs(),
        opts.sample_every.as_secs(),
        r.elapsed.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        s,
        "![RSS and open descriptors during the soak](docs/bench/soak.svg)\n"
    );
    let _ = writeln!(
        s,
        "| process | RSS first / last / max (MiB) | descriptors first / last / max |"
    );
    let _ = writeln!(s, "|---|---|---|");
    let mut procs: Vec<String> = r
        .samples
        .iter()
        .flat_map(|x| x.procs.keys().cloned())
        .collect();
    procs.sort();
    procs.dedup();
    for p in &procs {
        let (Some(rss), Some(fds)) = (r.range(p, false), r.range(p, true)) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {p} | {} / {} / {} | {} / {} / {} |",
            mib(rss.0),
            mib(rss.1),
            mib(rss.2),
            fds.0,
            fds.1,
            fds.2
        );
    }
    let mut kinds: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for f in &r.faults {
        let kind = if f.what.starts_with("power cut of a") {
            "power cut of an agent".to_owned()
        } else if f.what.starts_with("SIGKILL") {
            "SIGKILL of an agent".to_owned()
        } else {
            f.what.clone()
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let shown: Vec<String> = kinds.iter().map(|(k, v)| format!("{k} × {v}")).collect();
    let failed = r.faults.iter().filter(|f| !f.problems.is_empty()).count();
    let _ = writeln!(
        s,
        "\n{} faults: {}; {} with problems. At the gateway: {} readings sent, lost {}, duplicated {}.",
        r.faults.len(),
        shown.join(", "),
        failed,
        n(r.at_end.acked),
        r.at_end.lost,
        r.at_end.duplicated
    );
    for f in r.faults.iter().filter(|f| !f.problems.is_empty()) {
        let _ = writeln!(
            s,
            "\nProblem at {:.0} s ({}): {}",
            f.at.as_secs_f64(),
            f.what,
            f.problems.join("; ")
        );
    }
    for p in &r.problems {
        let _ = writeln!(s, "\nProblem at the end: {p}");
    }
    s
}

/// Replaces `<!-- NAME:begin -->…<!-- NAME:end -->` in BENCHMARKS.md (or appends it to
/// the fault-lab section).
fn write_block(args: &Args, name: &str, body: &str) -> anyhow::Result<()> {
    let path = args.root.join("BENCHMARKS.md");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let begin = format!("<!-- {name}:begin (generated by faultlab --write) -->");
    let end = format!("<!-- {name}:end -->");
    let block = format!("{begin}\n{body}{end}");
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))
}

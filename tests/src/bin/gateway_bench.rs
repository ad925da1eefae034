//! `gateway-bench`: readings/s the gateway stores exactly once, side by side for its two
//! stores: one gateway on the embedded store, one on PostgreSQL, and two gateways sharing
//! one PostgreSQL with the agents split between them (issue 16). Starts the real
//! binaries and a real PostgreSQL 15 as processes on loopback.
//!
//! ```text
//! cargo build --profile bench-fast -p fogline-agent -p fogline-gateway -p fogline-tests
//! target/bench-fast/gateway-bench --backlog 1000000 --agents 4
//! ```
//!
//! Each setup starts fresh: its own PostgreSQL server (initdb), gateways and agents. The
//! agents buffer the backlog behind cut links (a [`TcpProxy`] each), so the devices'
//! publish rate is out of the measure; then every link is restored at once and the drain
//! is timed until every agent's head is acknowledged by its gateway. Afterwards the store
//! is checked: every offset of every origin once, nothing missing. CPU seconds per
//! process group during the drain show what the limit was: on a 2-core machine the
//! gateways, PostgreSQL and the agents all compete for the same cores.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, ValueEnum};
use fogline_tests::bench::{load_average, machine, machine_busy_secs};
use fogline_tests::postgres::{self, Postgres};
use fogline_tests::{
    cpu_secs, cpu_secs_with_reaped, http_get, process_tree, thread_cpu_secs, Agent, AgentOptions,
    DeviceSpec, Fleet, Gateway, TcpProxy,
};

#[derive(Debug, Parser)]
#[command(name = "gateway-bench")]
struct Args {
    /// Readings buffered behind cut links before the drain, over all agents.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Agents (each its own origin log); split between the gateways in the two-gateway
    /// setup.
    #[arg(long, default_value_t = 4)]
    agents: u32,
    /// Devices per agent (each its own series).
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Setups to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "embedded,postgres,postgres-2"
    )]
    only: Vec<Setup>,
    /// PostgreSQL settings on top of the harness's (`name=value`, repeatable), e.g. to
    /// see what `synchronous_commit=off` changes; the defaults are what production runs.
    #[arg(long = "pg-setting")]
    pg_settings: Vec<String>,
    /// For experiments: SQL run on the bench database once the gateways have made their
    /// tables, before any reading arrives (repeatable), e.g. `DROP INDEX
    /// fogline.readings_series` to see what that index costs.
    #[arg(long = "pg-sql")]
    pg_sql: Vec<String>,
    /// For experiments: create the bench database with this locale (`C`: byte-order
    /// text comparisons); default: the server's (initdb's, from the environment).
    #[arg(long)]
    db_locale: Option<String>,
    /// Longest wait for the fill and for the drain, each, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Setup {
    /// One gateway on the embedded (redb) store.
    Embedded,
    /// One gateway on PostgreSQL.
    Postgres,
    /// Two gateways on one PostgreSQL.
    #[value(name = "postgres-2")]
    Postgres2,
}

impl Setup {
    fn gateways(self) -> usize {
        match self {
            Setup::Embedded | Setup::Postgres => 1,
            Setup::Postgres2 => 2,
        }
    }

    fn on_postgres(self) -> bool {
        self != Setup::Embedded
    }

    fn label(self) -> &'static str {
        match self {
            Setup::Embedded => "1 gateway, embedded store",
            Setup::Postgres => "1 gateway, PostgreSQL",
            Setup::Postgres2 => "2 gateways, one PostgreSQL",
        }
    }
}

/// Durability as production runs it, said in the output as the server reports it.
const PG_SETTINGS: [&str; 2] = ["fsync=on", "synchronous_commit=on"];

/// The settings read back from the server for the output.
const PG_SHOWN: [&str; 9] = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "wal_sync_method",
    "lc_collate",
];

/// One agent behind its own cut link to its gateway.
struct Node {
    agent: Agent,
    proxy: TcpProxy,
    fleet: Fleet,
    gateway: usize,
    origin: String,
    head: u64,
}

/// CPU seconds of one kind of process (or one process, by its kind).
type KindSecs = (String, f64);

/// CPU seconds used so far, per process group.
#[derive(Debug, Clone, Default)]
struct Cpu {
    gateways: f64,
    /// The gateways' `store-writer` threads (decode, COPY, commit: one per gateway).
    writers: f64,
    /// Per process of PostgreSQL's tree: (what it is, seconds).
    postgres: HashMap<u32, KindSecs>,
    agents: f64,
    /// This program: the proxies, the polling.
    harness: f64,
    machine: f64,
}

impl Cpu {
    fn postgres_total(&self) -> f64 {
        self.postgres.values().map(|(_, s)| s).sum()
    }
}

/// What one setup measured.
struct Outcome {
    setup: Setup,
    readings: u64,
    secs: f64,
    first_ms: f64,
    commits: f64,
    check: String,
    cpu: Cpu,
    /// PostgreSQL's CPU per kind of process, busiest first.
    pg_kinds: Vec<KindSecs>,
    /// The busiest single PostgreSQL process.
    pg_busiest: Option<KindSecs>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.readings as f64 / self.secs
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.agents > 0 && args.devices > 0,
        "--agents and --devices must be > 0"
    );
    ensure!(
        args.backlog >= u64::from(args.agents * args.devices),
        "--backlog must be at least one reading per device"
    );
    if args.only.iter().any(|s| s.on_postgres()) {
        if let Some(why) = postgres::unavailable() {
            bail!("PostgreSQL is needed for the postgres setups: {why}");
        }
    }
    let started = Instant::now();
    println!("machine: {}", machine());
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("load average at the start: {}", load_average());
    let mut outcomes = Vec::new();
    for &setup in &args.only {
        eprintln!("--- {} ---", setup.label());
        let outcome = run(&args, setup).with_context(|| setup.label())?;
        eprintln!(
            "{}: {} readings in {:.2} s, {:.0} readings/s",
            setup.label(),
            outcome.readings,
            outcome.secs,
            outcome.rate()
        );
        outcomes.push(outcome);
    }
    print_report(&args, &outcomes);
    println!(
        "\nload average at the end: {}; {:.1} minutes in all",
        load_average(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn run(args: &Args, setup: Setup) -> anyhow::Result<Outcome> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let pg = if setup.on_postgres() {
        let mut settings: Vec<&str> = PG_SETTINGS.to_vec();
        settings.extend(args.pg_settings.iter().map(String::as_str));
        Some(Postgres::start(&settings).context("starting PostgreSQL")?)
    } else {
        None
    };
    let url = match (&pg, &args.db_locale) {
        (Some(pg), Some(locale)) => {
            pg.client("postgres")?.batch_execute(&format!(
                "CREATE DATABASE bench TEMPLATE template0 LOCALE '{locale}'"
            ))?;
            Some(pg.url("bench"))
        }
        (Some(pg), None) => Some(pg.create_db("bench")?),
        (None, _) => None,
    };
    // The server's settings, once: with the first PostgreSQL setup.
    if let Some(pg) = &pg {
        if args.only.iter().find(|s| s.on_postgres()) == Some(&setup) {
            println!("PostgreSQL: {}", shown_settings(pg)?);
        }
    }
    let mut gateways = Vec::new();
    for g in 0..setup.gateways() {
        gateways.push(
            Gateway::start_on(&[], None, url.as_deref()).with_context(|| format!("gateway {g}"))?,
        );
    }
    if let Some(pg) = &pg {
        let mut c = pg.client("bench")?;
        for sql in &args.pg_sql {
            c.batch_execute(sql)
                .with_context(|| format!("--pg-sql {sql}"))?;
        }
    }

    let nodes = fill(args, &gateways, timeout)?;
    let readings: u64 = nodes.iter().map(|n| n.head).sum();
    let before_commits = commits(&gateways)?;
    let cpu_before = cpu(&gateways, pg.as_ref(), &nodes)?;
    for n in &nodes {
        n.proxy.restore();
    }
    let restored = Instant::now();
    let mut first: Option<Duration> = None;
    loop {
        let mut done = true;
        let mut any = false;
        for (g, gw) in gateways.iter().enumerate() {
            let next = watermarks(gw)?;
            for n in nodes.iter().filter(|n| n.gateway == g) {
                let at = next.get(&n.origin).copied().unwrap_or(0);
                any |= at > 0;
                done &= at >= n.head;
            }
        }
        if any && first.is_none() {
            first = Some(restored.elapsed());
        }
        if done {
            break;
        }
        if restored.elapsed() > timeout {
            let behind: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let at = watermarks(&gateways[n.gateway])
                        .ok()
                        .and_then(|w| w.get(&n.origin).copied())
                        .unwrap_or(0);
                    format!("{}: {at} of {}", n.origin, n.head)
                })
                .collect();
            bail!(
                "the drain did not finish within {timeout:?} ({}); gateway log tail:\n{}",
                behind.join(", "),
                gateways[0].log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = restored.elapsed().as_secs_f64();
    let cpu_after = cpu(&gateways, pg.as_ref(), &nodes)?;
    let commits = commits(&gateways)? - before_commits;
    let cpu = delta(&cpu_before, &cpu_after);
    let (pg_kinds, pg_busiest) = postgres_split(&cpu);

    let heads: BTreeMap<String, u64> = nodes.iter().map(|n| (n.origin.clone(), n.head)).collect();
    drop(nodes);
    let check = match &pg {
        Some(pg) => check_postgres(pg, &heads)?,
        None => {
            let mut gw = gateways.pop().context("no gateway")?;
            gw.stop(Duration::from_secs(30))?;
            check_embedded(&gw, &heads)?
        }
    };
    for mut gw in gateways {
        gw.stop(Duration::from_secs(30))?;
    }
    drop(pg);
    Ok(Outcome {
        setup,
        readings,
        secs,
        first_ms: first.unwrap_or_default().as_secs_f64() * 1000.0,
        commits,
        check,
        cpu,
        pg_kinds,
        pg_busiest,
    })
}

fn shown_settings(pg: &Postgres) -> anyhow::Result<String> {
    let mut c = pg.client("bench")?;
    let version: String = c.query_one("SHOW server_version", &[])?.get(0);
    let mut shown = vec![format!("version {version}")];
    for name in PG_SHOWN {
        let v: String = c.query_one(&format!("SHOW {name}"), &[])?.get(0);
        shown.push(format!("{name}={v}"));
    }
    Ok(shown.join(", "))
}

/// Starts the agents behind cut links (agent `a` on gateway `a % gateways`) and fills
/// their logs; returns once every reading is durable at its agent and the devices are
/// gone.
fn fill(args: &Args, gateways: &[Gateway], timeout: Duration) -> anyhow::Result<Vec<Node>> {
    let per_device = args.backlog / u64::from(args.agents * args.devices);
    let per_device = u32::try_from(per_device).context("--backlog is too large")?;
    let mut nodes = Vec::new();
    for a in 0..args.agents {
        let gateway = a as usize % gateways.len();
        let proxy = TcpProxy::start(gateways[gateway].mqtt_addr())?;
        proxy.cut();
        let agent = Agent::start(
            AgentOptions::default()
                .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
                .env("FOGLINE_NODE__SITE", "bench")
                .env("FOGLINE_NODE__ID", format!("edge-{a}"))
                // Back within 50 ms of the restore: the drain, not the backoff, is timed.
                .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 20)
                .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 50)
                .env("FOGLINE_BUFFER__MAX_BYTES", 1u64 << 30),
        )
        .with_context(|| format!("agent {a}"))?;
        let origin = agent.status()?["origin"]
            .as_str()
            .context("the agent's /status has no origin")?
            .to_owned();
        let mut fleet = Fleet::new(agent.mqtt_addr())?;
        for d in 0..args.devices {
            // Each agent has devices of its own (a series each), as in a fleet.
            let mut spec = DeviceSpec::json(format!("a{a}-dev-{d}"), "temp", 1);
            spec.window = 256;
            spec.max_seq = per_device;
            fleet.add(spec)?;
        }
        nodes.push(Node {
            agent,
            proxy,
            fleet,
            gateway,
            origin,
            head: 0,
        });
    }
    let started = Instant::now();
    let want = u64::from(per_device) * u64::from(args.devices);
    loop {
        let acked: Vec<u64> = nodes.iter().map(|n| n.fleet.totals().1).collect();
        if acked.iter().all(|&a| a >= want) {
            break;
        }
        if started.elapsed() > timeout {
            bail!("filling the backlog took over {timeout:?}: acked per agent {acked:?} of {want}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in &mut nodes {
        n.fleet.shutdown();
        n.head = n.agent.status()?["buffer"]["next_offset"]
            .as_u64()
            .context("the agent's /status has no buffer.next_offset")?;
        ensure!(
            n.head >= want,
            "{} holds {} readings, {want} were acked",
            n.origin,
            n.head
        );
    }
    eprintln!(
        "filled {} readings in {} agents behind cut links in {:.1} s",
        nodes.iter().map(|n| n.head).sum::<u64>(),
        nodes.len(),
        started.elapsed().as_secs_f64()
    );
    // Let the agents' writers and aggregators settle before the measured window.
    std::thread::sleep(Duration::from_secs(1));
    Ok(nodes)
}

/// Each origin's watermark at `gw`, from one `/status`.
fn watermarks(gw: &Gateway) -> anyhow::Result<HashMap<String, u64>> {
    let (code, body) = http_get(gw.http_addr(), "/status")?;
    ensure!(code == 200, "the gateway's /status answered {code}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    Ok(status["origins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| Some((o["origin"].as_str()?.to_owned(), o["next_offset"].as_u64()?)))
        .collect())
}

fn commits(gateways: &[Gateway]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for gw in gateways {
        total += gw.metric("fogline_gateway_commits_total", &[])?;
    }
    Ok(total)
}

fn cpu(gateways: &[Gateway], pg: Option<&Postgres>, nodes: &[Node]) -> anyhow::Result<Cpu> {
    let mut cpu = Cpu::default();
    for gw in gateways {
        let pid = gw.pid().context("a gateway is not running")?;
        cpu.gateways += cpu_secs(pid)?;
        cpu.writers += thread_cpu_secs(pid, "store-writer")?;
    }
    if let Some(root) = pg.and_then(Postgres::pid) {
        for pid in process_tree(root) {
            // A process may exit between the listing and the read: its time is in its
            // parent's reaped-children count once the postmaster has reaped it.
            if let Ok(secs) = cpu_secs_with_reaped(pid) {
                cpu.postgres.insert(pid, (postgres_kind(pid), secs));
            }
        }
    }
    for n in nodes {
        cpu.agents += cpu_secs(n.agent.pid().context("an agent is not running")?)?;
    }
    cpu.harness = cpu_secs(std::process::id())?;
    cpu.machine = machine_busy_secs().unwrap_or(f64::NAN);
    Ok(cpu)
}

/// What a PostgreSQL process is, from the title it sets (`postgres: walwriter`,
/// `postgres: postgres bench 127.0.0.1(40000) COPY`, …).
fn postgres_kind(pid: u32) -> String {
    let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .replace('\0', " ");
    let title = title.trim();
    for kind in [
        "walwriter",
        "checkpointer",
        "background writer",
        "autovacuum",
        "logical replication",
        "archiver",
    ] {
        if title.contains(kind) {
            return kind.to_owned();
        }
    }
    if title.starts_with("postgres: postgres ") {
        "backends".into()
    } else if title.contains("runuser") {
        "runuser".into()
    } else {
        "postmaster".into()
    }
}

fn delta(before: &Cpu, after: &Cpu) -> Cpu {
    let postgres = after
        .postgres
        .iter()
        .map(|(pid, (kind, secs))| {
            let was = before.postgres.get(pid).map_or(0.0, |(_, s)| *s);
            (*pid, (kind.clone(), secs - was))
        })
        .collect();
    Cpu {
        gateways: after.gateways - before.gateways,
        writers: after.writers - before.writers,
        postgres,
        agents: after.agents - before.agents,
        harness: after.harness - before.harness,
        machine: after.machine - before.machine,
    }
}

fn postgres_split(cpu: &Cpu) -> (Vec<KindSecs>, Option<KindSecs>) {
    let mut kinds: BTreeMap<String, f64> = BTreeMap::new();
    for (kind, secs) in cpu.postgres.values() {
        *kinds.entry(kind.clone()).or_default() += secs;
    }
    let mut kinds: Vec<KindSecs> = kinds.into_iter().filter(|(_, s)| *s >= 0.01).collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let busiest = cpu
        .postgres
        .values()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .cloned();
    (kinds, busiest)
}

/// Every origin's readings in PostgreSQL are offsets `0..head`, each once.
fn check_postgres(pg: &Postgres, heads: &BTreeMap<String, u64>) -> anyhow::Result<String> {
    let mut c = pg.client("bench")?;
    c.batch_execute("SET statement_timeout = '120s'")?;
    let rows = c.query(
        "SELECT origin, count(*), count(DISTINCT \"offset\"), min(\"offset\"), max(\"offset\") \
         FROM fogline.readings WHERE site = 'bench' GROUP BY origin",
        &[],
    )?;
    let mut seen = BTreeMap::new();
    for r in &rows {
        let origin: String = r.get(0);
        let (count, distinct, min, max): (i64, i64, i64, i64) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        seen.insert(origin, (count, distinct, min, max));
    }
    let mut total = 0;
    for (origin, &head) in heads {
        let Some(&(count, distinct, min, max)) = seen.get(origin) else {
            bail!("no readings of {origin} in fogline.readings");
        };
        let head = i64::try_from(head)?;
        ensure!(
            count == head && distinct == head && min == 0 && max == head - 1,
            "{origin}: {count} rows, {distinct} distinct offsets {min}..={max}, {head} were sent"
        );
        total += count;
    }
    ensure!(
        seen.len() == heads.len(),
        "fogline.readings holds origins that were not sent: {:?}",
        seen.keys().collect::<Vec<_>>()
    );
    let row = c.query_one(
        "SELECT coalesce(sum(next_offset), 0)::int8, coalesce(sum(stored), 0)::int8 \
         FROM fogline.origins WHERE site = 'bench'",
        &[],
    )?;
    let (next, stored): (i64, i64) = (row.get(0), row.get(1));
    ensure!(
        next == total && stored == total,
        "fogline.origins: next_offset sums to {next}, stored to {stored}, {total} rows"
    );
    Ok(format!("{total} rows = {total} distinct"))
}

/// The same check on the (stopped) gateway's embedded store, through `store export`.
fn check_embedded(gw: &Gateway, heads: &BTreeMap<String, u64>) -> anyhow::Result<String> {
    let mut offsets: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in gw.export()? {
        offsets.entry(r.origin).or_default().push(r.offset);
    }
    let mut total = 0;
    for (origin, &head) in heads {
        let mut got = offsets.remove(origin).unwrap_or_default();
        let count = got.len() as u64;
        got.sort_unstable();
        got.dedup();
        let distinct = got.len() as u64;
        ensure!(
            count == head && distinct == head && got.last() == Some(&(head - 1)),
            "{origin}: {count} readings, {distinct} distinct offsets, {head} were sent"
        );
        total += count;
    }
    ensure!(
        offsets.is_empty(),
        "the store holds origins that were not sent: {:?}",
        offsets.keys().collect::<Vec<_>>()
    );
    Ok(format!("{total} exported = {total} distinct"))
}

fn print_report(args: &Args, outcomes: &[Outcome]) {
    println!(
        "\n{} agents × {} devices, {} readings buffered behind cut links, then drained; \
         readings/s = readings ÷ seconds from restoring the links to the last agent's head \
         acked (first batch stored: ms after the restore).\n",
        args.agents,
        args.devices,
        outcomes.first().map_or(args.backlog, |o| o.readings)
    );
    println!(
        "| setup | readings | drain s | first batch ms | readings/s | per gateway | commits | readings/commit | stored exactly once |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for o in outcomes {
        let gws = o.setup.gateways() as f64;
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {:.0} | {} | {} |",
            o.setup.label(),
            thousands(o.readings as f64),
            o.secs,
            o.first_ms,
            thousands(o.rate()),
            thousands(o.rate() / gws),
            o.commits,
            thousands(o.readings as f64 / o.commits.max(1.0)),
            o.check
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nCPU seconds during the drain (cores busy = seconds ÷ drain seconds; the machine \
         has {cores}; harness: this program, i.e. the proxies and the polling; \"other\": the rest of \
         the machine's busy time, work outside this run):\n"
    );
    println!(
        "| setup | gateways (store-writer threads) | postgres | agents | harness | other | cores busy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let c = &o.cpu;
        let pg = c.postgres_total();
        let ours = c.gateways + pg + c.agents + c.harness;
        let pg_cell = if o.setup.on_postgres() {
            format!("{pg:.2}")
        } else {
            "—".into()
        };
        println!(
            "| {} | {:.2} ({:.2}) | {pg_cell} | {:.2} | {:.2} | {:.2} | {:.2} of {cores} |",
            o.setup.label(),
            c.gateways,
            c.writers,
            c.agents,
            c.harness,
            (c.machine - ours).max(0.0),
            c.machine / o.secs
        );
    }
    println!();
    for o in outcomes {
        let c = &o.cpu;
        let mut line = format!(
            "- {}: store-writer threads at {:.0} % of a core each",
            o.setup.label(),
            100.0 * c.writers / o.secs / o.setup.gateways() as f64
        );
        if let Some((kind, secs)) = &o.pg_busiest {
            let kinds: Vec<String> = o
                .pg_kinds
                .iter()
                .map(|(k, s)| format!("{k} {s:.2} s"))
                .collect();
            line.push_str(&format!(
                "; postgres: {}; its busiest process ({kind}) at {:.0} % of a core",
                kinds.join(", "),
                100.0 * secs / o.secs
            ));
        }
        println!("{line}");
    }
    let rate = |s: Setup| outcomes.iter().find(|o| o.setup == s).map(Outcome::rate);
    if let Some(one) = rate(Setup::Postgres) {
        println!(
            "\nOne gateway into PostgreSQL: {} readings/s (target ≥ 100,000: {}).",
            thousands(one),
            if one >= 100_000.0 { "met" } else { "not met" }
        );
        if let Some(two) = rate(Setup::Postgres2) {
            println!(
                "Two gateways ÷ one on PostgreSQL: {:.2}× (target ≥ 1.6× where the database \
                 is not the limit).",
                two / one
            );
        }
    }
}

/// `1234567.8` as `1,234,568`.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

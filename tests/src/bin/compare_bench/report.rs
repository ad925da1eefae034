//! The results as a Markdown section (printed, and written into BENCHMARKS.md between two
//! markers) and the scale curves as SVG files in `docs/bench/`.

use std::fmt::Write;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use fogline_tests::{agent_bin, run_bounded};

use crate::plot::{line_chart, Series};
use crate::{Args, Loss, Results};

const BEGIN: &str = "<!-- compare-bench:begin (generated; edit the program, not this) -->";
const END: &str = "<!-- compare-bench:end -->";
const FOG_COLOR: &str = "#1f77b4";
const MOSQ_COLOR: &str = "#d62728";

/// Where and with what the run happened.
pub struct Environment {
    pub date: String,
    pub machine: String,
    pub versions: String,
    pub command: String,
    pub load_start: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    run_bounded(Command::new(cmd).args(args), Duration::from_secs(10))
        .map(|o| o.stdout.trim().to_owned())
        .unwrap_or_default()
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Environment {
    pub fn capture(_args: &Args) -> anyhow::Result<Environment> {
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU", |(_, v)| v.trim())
            .to_owned();
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let debian = std::fs::read_to_string("/etc/debian_version").unwrap_or_default();
        let machine = format!(
            "{cpus} vCPU {model}, {:.0} GiB RAM, Debian {}, Linux {}",
            mem_kib / 1024.0 / 1024.0,
            debian.trim(),
            sh("uname", &["-r"])
        );
        let agent = agent_bin()?;
        let profile = agent
            .parent()
            .and_then(|p| p.file_name())
            .map_or("?".into(), |n| n.to_string_lossy().into_owned());
        let commit = sh("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = if sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            " with local changes"
        };
        let versions = format!(
            "fogline {} (commit {commit}{dirty}, `{profile}` profile), {} (Debian package {}), {}",
            env!("CARGO_PKG_VERSION"),
            fogline_tests::mosquitto::version()?,
            sh("dpkg-query", &["-W", "-f=${Version}", "mosquitto"]),
            sh("rustc", &["--version"]),
        );
        // The program as run from the workspace root, without this machine's paths.
        let mut argv: Vec<String> = std::env::args().collect();
        if let Some(first) = argv.first_mut() {
            if let Some(i) = first.find("target/") {
                *first = first[i..].to_owned();
            }
        }
        Ok(Environment {
            date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            machine,
            versions,
            command: argv.join(" "),
            load_start: load_average(),
        })
    }

    pub fn text(&self) -> String {
        format!(
            "date:     {}\nmachine:  {}\nversions: {}\ncommand:  {}\nload:     {}",
            self.date, self.machine, self.versions, self.command, self.load_start
        )
    }
}

fn n(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let r = v.round() as i64;
    let s = r.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if r < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn f1(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "–".into()
    }
}

fn f2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "–".into()
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("did not finish".into(), |s| format!("{s:.1} s"))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn opt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => "–".into(),
    }
}

fn lost(l: &Loss) -> String {
    format!("{} of {}", n(l.lost as f64), n(l.acked as f64))
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The whole generated section.
pub fn markdown(
    args: &Args,
    env: &Environment,
    fog: &Results,
    mosq: &Results,
    minutes: f64,
    failures: &[String],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Run {}, {minutes:.1} minutes in all.\n", env.date);
    let _ = writeln!(md, "- Machine: {}", env.machine);
    let _ = writeln!(md, "- Versions: {}", env.versions);
    let _ = writeln!(
        md,
        "- Load average (1, 5, 15 min) at the start: {}; at the end: {}",
        env.load_start,
        load_average()
    );
    let _ = writeln!(md, "- Command: `{}`\n", env.command);

    let (fs, ms) = (&fog.steady, &mosq.steady);
    let rate = format!(
        "{} readings/s ({} devices × {})",
        n(fs.offered),
        args.rate_devices,
        args.rate
    );
    let _ = writeln!(
        md,
        "| measure | fogline | Mosquitto + bridge | fogline ÷ Mosquitto |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (f, m) in fog.scale.iter().zip(&mosq.scale) {
        let _ = writeln!(
            md,
            "| throughput, {} devices: readings/s received upstream (acknowledged at the edge) | {} ({}) | {} ({}) | {} |",
            f.devices,
            n(f.upstream_rate),
            n(f.edge_rate),
            n(m.upstream_rate),
            n(m.edge_rate),
            ratio(f.upstream_rate, m.upstream_rate)
        );
    }
    for (f, m) in fog.scale.iter().zip(&mosq.scale) {
        let _ = writeln!(
            md,
            "| edge RSS at saturation, {} devices (MiB) | {} | {} | {} |",
            f.devices,
            f1(f.rss_mib),
            f1(m.rss_mib),
            ratio(f.rss_mib, m.rss_mib)
        );
    }
    let _ = writeln!(
        md,
        "| latency publish → upstream at {rate}: p50 / p99 / max (ms) | {} / {} / {} | {} / {} / {} | {} (p99) |",
        f2(fs.p50_ms), f2(fs.p99_ms), f1(fs.max_ms), f2(ms.p50_ms), f2(ms.p99_ms), f1(ms.max_ms),
        ratio(fs.p99_ms, ms.p99_ms)
    );
    let _ = writeln!(
        md,
        "| latency samples (readings matched) | {} | {} | |",
        n(fs.samples as f64),
        n(ms.samples as f64)
    );
    let _ = writeln!(
        md,
        "| edge RSS at {rate} (MiB) | {} | {} | {} |",
        f1(fs.rss_mib),
        f1(ms.rss_mib),
        ratio(fs.rss_mib, ms.rss_mib)
    );
    let _ = writeln!(
        md,
        "| edge CPU at {rate} (% of one core) | {} | {} | {} |",
        f1(fs.cpu_pct),
        f1(ms.cpu_pct),
        ratio(fs.cpu_pct, ms.cpu_pct)
    );
    let outage = args.outage().as_secs();
    let rows: [(&str, &Loss, &Loss); 3] = [
        ("SIGKILL of the edge mid-stream", &fog.kill, &mosq.kill),
        (
            &format!("{outage} s upstream outage"),
            &fog.outage,
            &mosq.outage,
        ),
        (
            &format!(
                "SIGKILL of the edge {} s into a {outage} s outage",
                outage / 2
            ),
            &fog.kill_in_outage,
            &mosq.kill_in_outage,
        ),
    ]
    .map(|(a, b, c)| (Box::leak(a.to_owned().into_boxed_str()) as &str, b, c));
    for (name, f, m) in rows {
        let _ = writeln!(
            md,
            "| {name}: acknowledged readings lost | {} | {} | |",
            lost(f),
            lost(m)
        );
        let _ = writeln!(
            md,
            "| {name}: duplicates received | {} | {} | |",
            n(f.duplicates as f64),
            n(m.duplicates as f64)
        );
        if f.drain_from_restore.is_some() || m.drain_from_restore.is_some() {
            let _ = writeln!(
                md,
                "| {name}: drain from link restored (from the edge's reconnect) | {} ({}) | {} ({}) | {} ({}) |",
                secs(f.drain_from_restore),
                secs(f.drain_from_reconnect),
                secs(m.drain_from_restore),
                secs(m.drain_from_reconnect),
                opt_ratio(f.drain_from_restore, m.drain_from_restore),
                opt_ratio(f.drain_from_reconnect, m.drain_from_reconnect)
            );
        }
    }
    for (f, m) in fog.backlogs.iter().zip(&mosq.backlogs) {
        let _ = writeln!(
            md,
            "| {} readings buffered: edge RSS (MiB) | {} | {} | {} |",
            n(f.readings as f64),
            f1(f.rss_mib),
            f1(m.rss_mib),
            ratio(f.rss_mib, m.rss_mib)
        );
        let _ = writeln!(
            md,
            "| {} readings buffered: drain from the edge's reconnect (from link restored) | {} ({}) | {} ({}) | {} |",
            n(f.readings as f64),
            secs(f.drain_from_reconnect),
            secs(f.drain_from_restore),
            secs(m.drain_from_reconnect),
            secs(m.drain_from_restore),
            opt_ratio(f.drain_from_reconnect, m.drain_from_reconnect)
        );
    }

    // Targets of the issue, judged on this run.
    let _ = writeln!(
        md,
        "\n| target (fogline ÷ Mosquitto-bridge, this run) | result | status |"
    );
    let _ = writeln!(md, "|---|---|---|");
    let thr: Vec<String> = fog
        .scale
        .iter()
        .zip(&mosq.scale)
        .map(|(f, m)| format!("{}: {}", f.devices, ratio(f.upstream_rate, m.upstream_rate)))
        .collect();
    let thr_ok = fog
        .scale
        .iter()
        .zip(&mosq.scale)
        .all(|(f, m)| f.upstream_rate >= m.upstream_rate);
    let _ = writeln!(
        md,
        "| throughput ≥ 1.0× at every device count | {} | {} |",
        thr.join(", "),
        met(thr_ok)
    );
    for (name, l) in [
        ("loss after SIGKILL = 0 for fogline", &fog.kill),
        ("loss after an outage = 0 for fogline", &fog.outage),
        (
            "loss after SIGKILL during an outage = 0 for fogline",
            &fog.kill_in_outage,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} lost | {} |",
            lost(l),
            met(l.lost == 0 && l.acked > 0)
        );
    }
    let mut drains: Vec<String> = Vec::new();
    let mut drain_ok = true;
    let outage_pair = (
        fog.outage.drain_from_reconnect,
        mosq.outage.drain_from_reconnect,
    );
    drains.push(format!(
        "outage: {}",
        opt_ratio(outage_pair.0, outage_pair.1)
    ));
    drain_ok &= matches!(outage_pair, (Some(f), Some(m)) if f <= m);
    for (f, m) in fog.backlogs.iter().zip(&mosq.backlogs) {
        drains.push(format!(
            "{}: {}",
            n(f.readings as f64),
            opt_ratio(f.drain_from_reconnect, m.drain_from_reconnect)
        ));
        drain_ok &= match (f.drain_from_reconnect, m.drain_from_reconnect) {
            (Some(f), Some(m)) => f <= m,
            (Some(_), None) => true,
            _ => false,
        };
    }
    let _ = writeln!(
        md,
        "| drain time ≤ 1.0× (from the edge's reconnect) | {} | {} |",
        drains.join(", "),
        met(drain_ok)
    );

    if !failures.is_empty() {
        let _ = writeln!(
            md,
            "\nScenarios that failed in this run (their cells are empty or 0):\n"
        );
        for f in failures {
            let _ = writeln!(md, "- {}", f.replace('\n', " "));
        }
    }
    let _ = writeln!(md, "\nScale curves (throughput received upstream, and edge RSS, against devices; RSS and drain time against buffered readings):\n");
    for (file, alt) in SVGS {
        let _ = writeln!(md, "![{alt}](docs/bench/{file})");
    }
    md
}

const SVGS: [(&str, &str); 4] = [
    ("scale-throughput.svg", "throughput against devices"),
    ("scale-rss.svg", "edge RSS against devices"),
    ("backlog-rss.svg", "edge RSS against buffered readings"),
    ("backlog-drain.svg", "drain time against buffered readings"),
];

/// Replaces the generated block of BENCHMARKS.md (or appends a section with it) and
/// writes the SVGs.
pub fn write(args: &Args, table: &str, fog: &Results, mosq: &Results) -> anyhow::Result<()> {
    let path = args.root.join("BENCHMARKS.md");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let block = format!("{BEGIN}\n{table}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &text[..a], &text[b + END.len()..]),
        _ => format!(
            "{}\n## fogline and Mosquitto with a bridge, side by side\n\n{block}\n",
            text.trim_end()
        ),
    };
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;

    let dir = args.root.join("docs").join("bench");
    std::fs::create_dir_all(&dir)?;
    let xs: Vec<f64> = fog.scale.iter().map(|p| f64::from(p.devices)).collect();
    let two = |f: Vec<Option<f64>>, m: Vec<Option<f64>>| {
        vec![
            Series {
                name: "fogline (agent → gateway)",
                color: FOG_COLOR,
                values: f,
            },
            Series {
                name: "Mosquitto + bridge",
                color: MOSQ_COLOR,
                values: m,
            },
        ]
    };
    let charts = [
        (
            SVGS[0].0,
            line_chart(
                "End-to-end throughput (received upstream)",
                "devices",
                "readings/s",
                &xs,
                &two(
                    fog.scale.iter().map(|p| Some(p.upstream_rate)).collect(),
                    mosq.scale.iter().map(|p| Some(p.upstream_rate)).collect(),
                ),
            ),
        ),
        (
            SVGS[1].0,
            line_chart(
                "Edge process RSS at saturation",
                "devices",
                "MiB",
                &xs,
                &two(
                    fog.scale.iter().map(|p| Some(p.rss_mib)).collect(),
                    mosq.scale.iter().map(|p| Some(p.rss_mib)).collect(),
                ),
            ),
        ),
    ];
    let bx: Vec<f64> = fog.backlogs.iter().map(|b| b.readings as f64).collect();
    let backlog_charts = [
        (
            SVGS[2].0,
            line_chart(
                "Edge process RSS holding a backlog",
                "buffered readings",
                "MiB",
                &bx,
                &two(
                    fog.backlogs.iter().map(|b| Some(b.rss_mib)).collect(),
                    mosq.backlogs.iter().map(|b| Some(b.rss_mib)).collect(),
                ),
            ),
        ),
        (
            SVGS[3].0,
            line_chart(
                "Backlog drain time (from the edge's reconnect)",
                "buffered readings",
                "seconds",
                &bx,
                &two(
                    fog.backlogs
                        .iter()
                        .map(|b| b.drain_from_reconnect)
                        .collect(),
                    mosq.backlogs
                        .iter()
                        .map(|b| b.drain_from_reconnect)
                        .collect(),
                ),
            ),
        ),
    ];
    for (file, svg) in charts.into_iter().chain(backlog_charts) {
        let p = dir.join(file);
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
    }
    eprintln!("wrote {} and {}", path.display(), dir.display());
    Ok(())
}

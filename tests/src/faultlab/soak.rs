//! The soak: a site of three agents and a gateway in network namespaces, every data
//! directory on a power-cut disk, simulated devices at a steady rate, and a random
//! fault every so often — a power cut of an agent or of the gateway, a SIGKILL of an
//! agent, or one of the partitions of [`super::partitions`]. Every process's RSS and open
//! descriptors are sampled all along. At the end every reading sent must be at the
//! gateway exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::partitions::{self, Partition, SiteLab, SiteLabOptions};
use super::Tally;

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    pub devices: u32,
    /// Readings per second per device.
    pub rate: f64,
    pub fault_every: Duration,
    pub sample_every: Duration,
    pub seed: u64,
}

/// One sample: per process, `(RSS KiB, open descriptors)`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub procs: BTreeMap<String, (u64, u64)>,
}

/// One fault and what came of it.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub at: Duration,
    pub what: String,
    pub outcome: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub elapsed: Duration,
    pub devices: u32,
    pub rate: f64,
    pub samples: Vec<Sample>,
    pub faults: Vec<FaultRecord>,
    pub at_end: Tally,
    pub problems: Vec<String>,
}

impl SoakReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.faults.iter().all(|f| f.problems.is_empty())
            && self.at_end.lost == 0
            && self.at_end.duplicated == 0
    }

    /// `(first, last, max)` of one process's RSS (KiB) or descriptors.
    pub fn range(&self, proc: &str, fds: bool) -> Option<(u64, u64, u64)> {
        let vals: Vec<u64> = self
            .samples
            .iter()
            .filter_map(|s| s.procs.get(proc))
            .map(|(rss, fd)| if fds { *fd } else { *rss })
            .collect();
        Some((*vals.first()?, *vals.last()?, *vals.iter().max()?))
    }
}

/// Descriptors open in process `pid`.
pub fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64)
}

/// Parses `1h`, `30m`, `90s` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        _ => anyhow::bail!("bad duration unit in {s:?} (s, m or h)"),
    };
    Ok(Duration::from_secs(secs))
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    PowerCutAgent(usize),
    PowerCutGateway,
    KillAgent(usize),
    Partition(Partition),
}

fn pick(rng: &mut fastrand::Rng, agents: usize) -> Fault {
    match rng.u32(0..10) {
        0..=2 => Fault::PowerCutAgent(rng.usize(0..agents)),
        3 => Fault::PowerCutGateway,
        4 => Fault::KillAgent(rng.usize(0..agents)),
        _ => Fault::Partition(Partition::ALL[rng.usize(0..Partition::ALL.len())]),
    }
}

/// Restarts agent `i` and waits until it answers.
fn restart_agent(lab: &mut SiteLab, i: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    lab.agents[i].start()?;
    let http = lab.http(i)?;
    lab.agents[i].wait_ready(http, Duration::from_secs(60))?;
    Ok(t.elapsed())
}

fn run_fault(lab: &mut SiteLab, fault: Fault, rng: &mut fastrand::Rng) -> FaultRecord {
    let mut rec = FaultRecord {
        at: Duration::ZERO,
        what: String::new(),
        outcome: String::new(),
        problems: Vec::new(),
    };
    let result: anyhow::Result<()> = (|| {
        match fault {
            Fault::PowerCutAgent(i) => {
                rec.what = format!("power cut of {}", lab.ids[i]);
                let pid = lab.agents[i].pid().context("agent not running")?;
                let cut = lab.disks[i].power_cut(&[pid])?;
                lab.agents[i].kill9()?;
                let took = restart_agent(lab, i)?;
                rec.outcome = format!(
                    "{} unsynced pages lost, {} requests caught; back in {} ms",
                    cut.unsynced_pages,
                    cut.held,
                    took.as_millis()
                );
            }
            Fault::PowerCutGateway => {
                rec.what = "power cut of the gateway".into();
                let pid = lab.gateway.pid().context("gateway not running")?;
                let n = lab.disks.len() - 1;
                let cut = lab.disks[n].power_cut(&[pid])?;
                lab.gateway.kill9()?;
                let t = Instant::now();
                lab.gateway.start()?;
                let http = lab.gw_http()?;
                lab.gateway.wait_ready(http, Duration::from_secs(60))?;
                rec.outcome = format!(
                    "{} unsynced pages lost, {} requests caught; back in {} ms",
                    cut.unsynced_pages,
                    cut.held,
                    t.elapsed().as_millis()
                );
            }
            Fault::KillAgent(i) => {
                rec.what = format!("SIGKILL of {}", lab.ids[i]);
                lab.agents[i].kill9()?;
                std::thread::sleep(Duration::from_millis(rng.u64(0..2000)));
                let took = restart_agent(lab, i)?;
                rec.outcome = format!("back in {} ms", took.as_millis());
            }
            Fault::Partition(p) => {
                rec.what = p.name().into();
                let sc = partitions::inject(lab, p, rng, 3)?;
                let line = sc.line();
                let prefix = format!("{}: ", sc.name);
                rec.outcome = line.strip_prefix(&prefix).unwrap_or(&line).to_owned();
                rec.problems = sc.problems.clone();
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        rec.problems.push(format!("{e:#}"));
    }
    rec
}

/// Runs the soak and returns what it saw.
pub fn run(opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut lab_opts = SiteLabOptions::new("site-soak");
    lab_opts.powercut = true;
    lab_opts.devices = opts.devices;
    lab_opts.interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.01));
    lab_opts.boot = 1 + rng.u32(0..1000);
    // Acked readings leave the agents after a minute: the stores stay bounded and the
    // deletion paths run all along.
    lab_opts.env = vec![("FOGLINE_UPLINK__RETENTION_SECS".into(), "60".into())];
    let mut lab = SiteLab::start(&lab_opts)?;
    let everyone: Vec<usize> = (0..lab.agents.len()).collect();
    lab.wait_leader(Duration::from_secs(30), &[], &everyone)?;

    let started = Instant::now();
    let pids: Arc<Mutex<BTreeMap<String, u32>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let refresh = |lab: &SiteLab, pids: &Mutex<BTreeMap<String, u32>>| {
        let mut p = pids.lock().unwrap_or_else(|e| e.into_inner());
        p.clear();
        for (i, a) in lab.agents.iter().enumerate() {
            if let Some(pid) = a.pid() {
                p.insert(lab.ids[i].clone(), pid);
            }
        }
        if let Some(pid) = lab.gateway.pid() {
            p.insert("gateway".into(), pid);
        }
    };
    refresh(&lab, &pids);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pids, samples, stop) = (pids.clone(), samples.clone(), stop.clone());
        let every = opts.sample_every;
        std::thread::Builder::new()
            .name("soak-sampler".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        next += every;
                        let current = pids.lock().map(|p| p.clone()).unwrap_or_default();
                        let mut procs = BTreeMap::new();
                        for (name, pid) in current {
                            let rss = crate::rss_kib(pid).map(|(rss, _)| rss);
                            if let (Ok(rss), Ok(fds)) = (rss, open_fds(pid)) {
                                procs.insert(name, (rss, fds));
                            }
                        }
                        let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                        s.push(Sample {
                            at: started.elapsed(),
                            procs,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })?
    };

    let mut report = SoakReport {
        devices: opts.devices,
        rate: opts.rate,
        ..SoakReport::default()
    };
    let mut next_fault = started + opts.fault_every;
    while started.elapsed() < opts.duration {
        if Instant::now() < next_fault {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        next_fault += opts.fault_every;
        let fault = pick(&mut rng, lab.agents.len());
        let at = started.elapsed();
        let mut rec = run_fault(&mut lab, fault, &mut rng);
        rec.at = at;
        refresh(&lab, &pids);
        eprintln!(
            "[soak {:>5.0}s] {}: {}{}",
            at.as_secs_f64(),
            rec.what,
            rec.outcome,
            if rec.problems.is_empty() {
                String::new()
            } else {
                format!(" PROBLEMS: {}", rec.problems.join("; "))
            }
        );
        let failed = !rec.problems.is_empty();
        report.faults.push(rec);
        if failed {
            // A site left half-broken would make every later fault meaningless: heal
            // and restart whatever is down, then go on.
            let _ = lab.net.heal_all();
            for i in 0..lab.agents.len() {
                if !lab.agents[i].is_running() {
                    let _ = restart_agent(&mut lab, i);
                }
            }
            refresh(&lab, &pids);
        }
        if next_fault < Instant::now() {
            next_fault = Instant::now() + opts.fault_every;
        }
    }
    report.elapsed = started.elapsed();
    let finished = lab.finish(Duration::from_secs(180));
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    report.samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    match finished {
        Ok((t, problems)) => {
            report.at_end = t;
            report.problems = problems;
        }
        Err(e) => {
            lab.keep_logs();
            report.problems.push(format!("finishing: {e:#}"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("90").ok(), Some(Duration::from_secs(90)));
        assert!(parse_duration("1d").is_err());
    }
}

//! Power-cut trials: a store under load on a [`PowercutDisk`], the power cut at a random
//! moment (disk and process at once), the survivor checked, the process restarted on it.
//!
//! What each trial checks, on exactly what the cut left:
//! - **agent**: `buffer check` is clean; every reading acknowledged so far — by PUBACK
//!   (counted per packet id) or by the `fogline/ack/<device>` watermark — is in the
//!   export exactly once; the agent then starts on the same directory without repair.
//! - **gateway**: every origin's log in the store is `0..next` with no hole, and `next`
//!   is at least every ack (`fogline/uplink/<site>/<origin>/ack`) the gateway published.
//! - **replica** (a peer of a site): the replica store's copy of the origin's log is
//!   `0..next` with no hole, and `next` is at least every replication ack the peer
//!   published (`fogline/repl/<site>/<origin>/ack`, on its own broker); its own buffer's
//!   `buffer check` is clean.
//!
//! After the last trial the load stops, everything sent is re-sent until acknowledged,
//! and the final store must hold every reading sent exactly once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{Event, MqttOptions, Packet, QoS};

use super::{as_exported, offsets_of, tally, Tally};
use crate::netlab::LabProc;
use crate::powercut::{CutOutcome, PowercutDisk};
use crate::puback::PubackDevice;
use crate::{
    find_bin, free_port, local, run_bounded, Agent, AgentOptions, DeviceSpec, Fleet, GatewayReading,
};

/// What a series of trials did.
#[derive(Debug, Clone, Default)]
pub struct Trials {
    /// Which store was cut: `agent`, `gateway` or `replica`.
    pub kind: &'static str,
    pub trials: u32,
    /// At the checks after each cut (acked counts are cumulative per trial).
    pub at_cuts: Tally,
    /// Inconsistencies found by `buffer check` or the offset checks.
    pub check_failures: u32,
    /// Readings acknowledged by the end, and the final store's tally of them.
    pub at_end: Tally,
    /// Readings sent by the end (all re-sent until acknowledged).
    pub sent: u64,
    /// Unsynced 4 KiB pages the cuts threw away, and requests they caught waiting.
    pub unsynced_pages: u64,
    pub held_requests: u64,
    /// Cuts that caught nothing unsynced at all (a trial that tested little).
    pub quiet_cuts: u32,
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl Trials {
    fn new(kind: &'static str) -> Trials {
        Trials {
            kind,
            ..Trials::default()
        }
    }

    fn cut(&mut self, c: &CutOutcome) {
        self.unsynced_pages += c.unsynced_pages;
        self.held_requests += c.held;
        if c.unsynced_pages == 0 && c.held == 0 {
            self.quiet_cuts += 1;
        }
    }

    fn problem(&mut self, trial: u32, what: impl Into<String>) {
        let what = what.into();
        eprintln!("[powercut {}] trial {trial}: {what}", self.kind);
        if self.problems.len() < 40 {
            self.problems.push(format!("trial {trial}: {what}"));
        }
    }

    /// Nothing lost, nothing twice, every check clean.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.at_cuts.lost == 0
            && self.at_cuts.duplicated == 0
            && self.at_end.lost == 0
            && self.at_end.duplicated == 0
            && self.check_failures == 0
    }

    pub fn summary(&self) -> String {
        format!(
            "{} trials on the {}: acked {} by the end ({} sent), lost {} at cuts / {} at the end, \
             duplicated {} / {}, check failures {}, unsynced pages thrown away {}, requests caught \
             waiting {}, quiet cuts {}, {:.0} s",
            self.trials,
            self.kind,
            self.at_end.acked,
            self.sent,
            self.at_cuts.lost,
            self.at_end.lost,
            self.at_cuts.duplicated,
            self.at_end.duplicated,
            self.check_failures,
            self.unsynced_pages,
            self.held_requests,
            self.quiet_cuts,
            self.elapsed.as_secs_f64()
        )
    }
}

/// How a series runs.
#[derive(Debug, Clone)]
pub struct TrialOptions {
    pub trials: u32,
    pub seed: u64,
    /// `--lose random`: a random part of the unsynced writes survives each cut.
    pub lose_random: bool,
    /// Load between cuts, at random in this range.
    pub run_ms: (u64, u64),
}

impl TrialOptions {
    pub fn new(trials: u32, seed: u64) -> TrialOptions {
        TrialOptions {
            trials,
            seed,
            lose_random: false,
            run_ms: (150, 900),
        }
    }

    fn disk(&self, salt: u64) -> anyhow::Result<PowercutDisk> {
        if self.lose_random {
            let seed = (self.seed ^ salt).to_string();
            PowercutDisk::mount_with(&["--lose", "random", "--seed", &seed])
        } else {
            PowercutDisk::mount()
        }
    }
}

/// Waits until `progress()` exceeds `since` (bounded): a cut must land on a store that
/// is taking writes, or the trial tests nothing.
fn wait_progress(
    since: u64,
    timeout: Duration,
    mut progress: impl FnMut() -> u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while progress() <= since {
        if Instant::now() >= deadline {
            bail!("no progress past {since} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Trials on one setup at most: every check exports the whole store, so a long series
/// runs as rounds on fresh disks and processes.
const ROUND: u32 = 20;

fn rounds(
    opts: &TrialOptions,
    kind: &'static str,
    round: fn(&TrialOptions, &mut Trials) -> anyhow::Result<()>,
) -> anyhow::Result<Trials> {
    let started = Instant::now();
    let mut out = Trials::new(kind);
    let mut left = opts.trials;
    let mut n = 0u64;
    while left > 0 {
        let mut o = opts.clone();
        o.trials = left.min(ROUND);
        o.seed = opts.seed.wrapping_add(n);
        round(&o, &mut out)?;
        left -= o.trials;
        n += 1;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// The agent's own buffer on a power-cut disk, QoS 1 publishers counting PUBACKs and
/// devices counting watermarks.
pub fn agent_trials(opts: &TrialOptions) -> anyhow::Result<Trials> {
    rounds(opts, "agent", agent_round)
}

/// The gateway's store on a power-cut disk, fed by one agent's uplink.
pub fn gateway_trials(opts: &TrialOptions) -> anyhow::Result<Trials> {
    rounds(opts, "gateway", gateway_round)
}

/// A peer's replica store on a power-cut disk: a site of two agents, the origin with
/// devices, the peer on the disk (acks wait for it: `ack_after = "replicated"`).
pub fn replica_trials(opts: &TrialOptions) -> anyhow::Result<Trials> {
    rounds(opts, "replica", replica_round)
}

/// Agents keep a small disk reserve on the power-cut disk (it lives in memory).
const AGENT_ENV: [(&str, &str); 2] = [
    ("FOGLINE_BUFFER__MIN_FREE_DISK_BYTES", "4194304"),
    ("FOGLINE_LOG__LEVEL", "info,rumqttd=warn"),
];

fn agent_round(opts: &TrialOptions, out: &mut Trials) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut disk = opts.disk(1)?;
    // As an installer leaves it: the parent exists and is durable; the agent makes
    // its data directory itself on first start.
    let data_dir = disk.durable_dir("var-lib-fogline")?.join("data");
    let mut agent_opts = AgentOptions {
        name: Some("powercut-agent".into()),
        data_dir: Some(data_dir),
        ..AgentOptions::default()
    };
    for (k, v) in AGENT_ENV {
        agent_opts = agent_opts.env(k, v);
    }
    let mut agent = Agent::start(agent_opts)?;
    let boot = 1 + rng.u32(0..1000);
    let mut pubacks = Vec::new();
    for i in 0..3 {
        pubacks.push(PubackDevice::start(
            agent.mqtt_addr(),
            &format!("pc-puback-{i}"),
            "temp",
            boot,
            16,
            u32::MAX - 1,
        )?);
    }
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..3 {
        let mut spec = DeviceSpec::json(format!("pc-mark-{i}"), "temp", boot);
        spec.interval = Some(Duration::from_millis(3));
        spec.window = 200;
        spec.max_backoff = Duration::from_millis(200);
        fleet.add(spec)?;
    }
    crate::puback::wait_connected(&pubacks, Duration::from_secs(10))?;
    fleet.wait_connected(Duration::from_secs(10))?;
    let promised = |pubacks: &[PubackDevice], fleet: &Fleet| -> Vec<(String, u32, u32)> {
        let mut p: Vec<(String, u32, u32)> = pubacks
            .iter()
            .map(|d| {
                let s = d.snapshot();
                (s.device, s.boot, s.acked)
            })
            .collect();
        p.extend(
            fleet
                .snapshots()
                .into_iter()
                .map(|s| (s.device, s.boot, s.acked)),
        );
        p
    };
    let acked_sum = |pubacks: &[PubackDevice], fleet: &Fleet| -> u64 {
        promised(pubacks, fleet)
            .iter()
            .map(|(_, _, a)| u64::from(*a))
            .sum()
    };
    for _ in 0..opts.trials {
        let trial = out.trials + 1;
        let before = acked_sum(&pubacks, &fleet);
        wait_progress(before, Duration::from_secs(20), || {
            acked_sum(&pubacks, &fleet)
        })
        .with_context(|| format!("trial {trial}: nothing acked after the restart"))?;
        std::thread::sleep(Duration::from_millis(rng.u64(opts.run_ms.0..opts.run_ms.1)));
        let pid = agent.pid().context("the agent is not running")?;
        let cut = disk.power_cut(&[pid])?;
        out.cut(&cut);
        agent.kill9()?;
        // Acks already on their way when the power went may still land.
        std::thread::sleep(Duration::from_millis(100));
        let promise = promised(&pubacks, &fleet);
        if let Err(e) = agent.check() {
            out.check_failures += 1;
            out.problem(trial, format!("buffer check after the cut: {e:#}"));
        }
        match agent.export() {
            Ok(readings) => {
                let t = tally(&readings, &promise);
                if t.lost > 0 || t.duplicated > 0 {
                    out.problem(
                        trial,
                        format!(
                            "after the cut ({cut:?}): {} acked readings lost, {} duplicated; \
                             export holds {}",
                            t.lost,
                            t.duplicated,
                            readings.len()
                        ),
                    );
                }
                out.at_cuts += t;
            }
            Err(e) => {
                // Nothing readable survived: every acknowledged reading is lost.
                out.check_failures += 1;
                out.at_cuts += tally(&[], &promise);
                out.problem(trial, format!("buffer export after the cut: {e:#}"));
            }
        }
        out.trials = trial;
        eprintln!(
            "[powercut agent] trial {trial}: cut with {} unsynced pages, {} requests waiting; \
             {} readings acked so far",
            cut.unsynced_pages,
            cut.held,
            promise.iter().map(|p| u64::from(p.2)).sum::<u64>()
        );
        // The agent must start on what survived, with no repair step.
        agent
            .restart()
            .with_context(|| format!("trial {trial}: the agent does not start after the cut"))?;
    }
    pubacks.iter().for_each(PubackDevice::stop_publishing);
    fleet.stop_publishing();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pubacks.iter().any(|d| {
        let s = d.snapshot();
        s.acked < s.sent
    }) {
        if Instant::now() >= deadline {
            bail!("not every PUBACK device was fully acknowledged within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    fleet.wait_all_acked(Duration::from_secs(60))?;
    let promise = promised(&pubacks, &fleet);
    let sent: u64 = pubacks
        .iter()
        .map(|d| u64::from(d.snapshot().sent))
        .chain(fleet.snapshots().iter().map(|s| u64::from(s.sent)))
        .sum();
    out.sent += sent;
    let regressions: u32 = fleet.snapshots().iter().map(|s| s.ack_regressions).sum();
    if regressions > 0 {
        out.problem(
            out.trials,
            format!("{regressions} ack watermarks went backwards after a cut"),
        );
    }
    pubacks.iter_mut().for_each(PubackDevice::shutdown);
    fleet.shutdown();
    agent.stop(Duration::from_secs(20))?;
    if let Err(e) = agent.check() {
        out.check_failures += 1;
        out.problem(out.trials, format!("final buffer check: {e:#}"));
    }
    let readings = agent.export()?;
    out.at_end += tally(&readings, &promise);
    if readings.len() as u64 != sent {
        out.problem(
            out.trials,
            format!("{} readings stored for {sent} sent", readings.len()),
        );
    }
    drop(agent);
    disk.unmount()?;
    Ok(())
}

/// The highest `{"next":N}` seen on each topic matching a filter, from a broker.
pub struct AckWatch {
    marks: Arc<Mutex<HashMap<String, u64>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl AckWatch {
    /// Subscribes (QoS 1) to `filter` at `broker` and keeps watching across reconnects.
    pub fn start(broker: std::net::SocketAddr, filter: &str) -> anyhow::Result<AckWatch> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ackwatch")
            .enable_all()
            .build()?;
        let marks = Arc::new(Mutex::new(HashMap::new()));
        let mut opts = MqttOptions::new(
            format!("ackwatch-{:08x}", fastrand::u32(..)),
            broker.ip().to_string(),
            broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let m = marks.clone();
        let filter = filter.to_owned();
        rt.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let next = serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .and_then(|v| v["next"].as_u64());
                        if let Some(next) = next {
                            let mut marks = m.lock().unwrap_or_else(|e| e.into_inner());
                            let e = marks.entry(p.topic.clone()).or_insert(0);
                            *e = (*e).max(next);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(AckWatch {
            marks,
            rt: Some(rt),
        })
    }

    /// Highest ack per topic so far.
    pub fn marks(&self) -> HashMap<String, u64> {
        self.marks.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Highest ack on any topic containing `part`.
    pub fn max_for(&self, part: &str) -> u64 {
        self.marks()
            .iter()
            .filter(|(t, _)| t.contains(part))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for AckWatch {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// `fogline-gateway store export` of a store file (a gateway's `gateway.redb` or an
/// agent's `replicas.redb`, the same format). The file is copied first: the export opens
/// the store for writing, and what a cut left must stay as it was.
pub fn export_store(file: &Path) -> anyhow::Result<Vec<GatewayReading>> {
    let copy = tempfile::Builder::new()
        .prefix("fogline-store-copy-")
        .tempdir()?;
    std::fs::copy(file, copy.path().join("gateway.redb"))
        .with_context(|| format!("copying {}", file.display()))?;
    let bin = find_bin("fogline-gateway", "FOGLINE_GATEWAY_BIN")?;
    let out = run_bounded(
        Command::new(bin)
            .env_remove(crate::SEED_VAR)
            .arg("store")
            .arg("export")
            .arg("--data-dir")
            .arg(copy.path())
            .arg("--format")
            .arg("jsonl"),
        Duration::from_secs(120),
    )?;
    if !out.status.success() {
        bail!("store export failed: {}", out.stderr.trim());
    }
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("export line {l:?}")))
        .collect()
}

/// A gateway started by hand (its data dir may be anywhere, e.g. on a power-cut disk).
pub fn gateway_proc(
    name: &str,
    data_dir: &Path,
    mqtt: std::net::SocketAddr,
    http: std::net::SocketAddr,
    netns: Option<&str>,
    log: PathBuf,
) -> anyhow::Result<LabProc> {
    let bin = find_bin("fogline-gateway", "FOGLINE_GATEWAY_BIN")?;
    let args: Vec<OsString> = vec![
        "run".into(),
        "--data-dir".into(),
        data_dir.into(),
        "--mqtt-listen".into(),
        mqtt.to_string().into(),
        "--http-listen".into(),
        http.to_string().into(),
    ];
    Ok(LabProc::new(name, &bin, args, Vec::new(), netns, log))
}

fn gateway_round(opts: &TrialOptions, out: &mut Trials) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0x6761);
    let mut disk = opts.disk(2)?;
    let gw_dir = disk.durable_dir("gateway")?.join("data");
    let logs = tempfile::Builder::new()
        .prefix("fogline-pc-gw-")
        .tempdir()?;
    let (mqtt, http) = (local(free_port()?), local(free_port()?));
    let mut gw = gateway_proc(
        "powercut-gateway",
        &gw_dir,
        mqtt,
        http,
        None,
        logs.path().join("gateway.log"),
    )?;
    gw.start()?;
    gw.wait_ready(http, Duration::from_secs(30))?;
    let site = "site-pcg";
    let mut agent = Agent::start(
        AgentOptions {
            name: Some("pcg-edge".into()),
            ..AgentOptions::default()
        }
        .env("FOGLINE_NODE__SITE", site)
        .env("FOGLINE_NODE__ID", "edge-1")
        .env("FOGLINE_UPLINK__GATEWAY", mqtt)
        .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 100)
        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 500)
        .env("FOGLINE_UPLINK__BATCH_READINGS", 256),
    )?;
    let watch = AckWatch::start(mqtt, &format!("fogline/uplink/{site}/+/ack"))?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    let boot = 1 + rng.u32(0..1000);
    for i in 0..4 {
        let mut spec = DeviceSpec::json(format!("pcg-{i}"), "temp", boot);
        spec.interval = Some(Duration::from_millis(2));
        spec.window = 200;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    for _ in 0..opts.trials {
        let trial = out.trials + 1;
        let before = watch.max_for("/edge-1.");
        wait_progress(before, Duration::from_secs(30), || {
            watch.max_for("/edge-1.")
        })
        .with_context(|| format!("trial {trial}: the gateway acked nothing new"))?;
        std::thread::sleep(Duration::from_millis(rng.u64(opts.run_ms.0..opts.run_ms.1)));
        let pid = gw.pid().context("the gateway is not running")?;
        let cut = disk.power_cut(&[pid])?;
        out.cut(&cut);
        gw.kill9()?;
        std::thread::sleep(Duration::from_millis(150));
        let promised = watch.max_for("/edge-1.");
        match export_store(&gw_dir.join("gateway.redb")) {
            Ok(stored) => {
                let (next, holes, repeats) = offsets_of(&stored, "edge-1.");
                let lost = promised.saturating_sub(next) + holes;
                out.at_cuts += Tally {
                    acked: promised,
                    lost,
                    duplicated: repeats,
                };
                if lost > 0 || repeats > 0 {
                    out.problem(
                        trial,
                        format!(
                            "the gateway had acked {promised}; after the cut it holds 0..{next} \
                             with {holes} holes and {repeats} repeats"
                        ),
                    );
                }
                eprintln!(
                    "[powercut gateway] trial {trial}: cut with {} unsynced pages; acked \
                     {promised}, survived 0..{next}",
                    cut.unsynced_pages
                );
            }
            Err(e) => {
                out.check_failures += 1;
                out.at_cuts += Tally {
                    acked: promised,
                    lost: promised,
                    duplicated: 0,
                };
                out.problem(trial, format!("store export after the cut: {e:#}"));
            }
        }
        out.trials = trial;
        gw.start()?;
        gw.wait_ready(http, Duration::from_secs(30))
            .with_context(|| format!("trial {trial}: the gateway does not start after the cut"))?;
    }
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(60))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    wait_progress(head.saturating_sub(1), Duration::from_secs(60), || {
        watch.max_for("/edge-1.")
    })
    .context("the gateway did not catch up with the agent")?;
    agent.stop(Duration::from_secs(20))?;
    gw.stop(Duration::from_secs(20))?;
    let stored = export_store(&gw_dir.join("gateway.redb"))?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    out.sent += sent.iter().map(|s| u64::from(s.2)).sum::<u64>();
    out.at_end += tally(&as_exported(&stored), &sent);
    let (next, holes, repeats) = offsets_of(&stored, "edge-1.");
    if next != head || holes > 0 || repeats > 0 {
        out.problem(
            out.trials,
            format!("final store 0..{next} ({holes} holes, {repeats} repeats), agent head {head}"),
        );
    }
    drop(watch);
    drop(gw);
    disk.unmount()?;
    Ok(())
}

fn replica_round(opts: &TrialOptions, out: &mut Trials) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0x7265);
    let mut disk = opts.disk(3)?;
    let peer_dir = disk.durable_dir("peer")?.join("data");
    let site = "site-pcr";
    let (p1, p2) = (free_port()?, free_port()?);
    let agent = |id: &str, port: u16, peer: &str, peer_port: u16, data: Option<PathBuf>| {
        let mut o = AgentOptions {
            name: Some(format!("pcr-{id}")),
            mqtt_port: Some(port),
            data_dir: data,
            args: vec![
                "--node-id".into(),
                id.into(),
                "--site".into(),
                site.into(),
                "--peers".into(),
                format!("{peer}={}", local(peer_port)),
            ],
            ..AgentOptions::default()
        };
        for (k, v) in AGENT_ENV {
            o = o.env(k, v);
        }
        o
    };
    let mut origin = Agent::spawn(agent("a1", p1, "a2", p2, None))?;
    let mut peer = Agent::spawn(agent("a2", p2, "a1", p1, Some(peer_dir.clone())))?;
    origin.wait_ready(Duration::from_secs(30))?;
    peer.wait_ready(Duration::from_secs(30))?;
    let origin_id = poll_origin(&origin)?;
    // The peer acks on its own broker, where the origin's replication client listens.
    let watch = AckWatch::start(
        peer.mqtt_addr(),
        &format!("fogline/repl/{site}/{origin_id}/ack"),
    )?;
    let mut fleet = Fleet::new(origin.mqtt_addr())?;
    let boot = 1 + rng.u32(0..1000);
    for i in 0..4 {
        let mut spec = DeviceSpec::json(format!("pcr-{i}"), "temp", boot);
        spec.interval = Some(Duration::from_millis(2));
        spec.window = 200;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    let replicas = peer_dir.join("replicas.redb");
    for _ in 0..opts.trials {
        let trial = out.trials + 1;
        let before = watch.max_for(&origin_id);
        wait_progress(before, Duration::from_secs(30), || {
            watch.max_for(&origin_id)
        })
        .with_context(|| format!("trial {trial}: the peer acked nothing new"))?;
        std::thread::sleep(Duration::from_millis(rng.u64(opts.run_ms.0..opts.run_ms.1)));
        let pid = peer.pid().context("the peer is not running")?;
        let cut = disk.power_cut(&[pid])?;
        out.cut(&cut);
        peer.kill9()?;
        std::thread::sleep(Duration::from_millis(150));
        let promised = watch.max_for(&origin_id);
        match export_store(&replicas) {
            Ok(stored) => {
                let (next, holes, repeats) = offsets_of(&stored, &origin_id);
                let lost = promised.saturating_sub(next) + holes;
                out.at_cuts += Tally {
                    acked: promised,
                    lost,
                    duplicated: repeats,
                };
                if lost > 0 || repeats > 0 {
                    out.problem(
                        trial,
                        format!(
                            "the peer had acked {promised}; after the cut its replica holds \
                             0..{next} with {holes} holes and {repeats} repeats"
                        ),
                    );
                }
                eprintln!(
                    "[powercut replica] trial {trial}: cut with {} unsynced pages; acked \
                     {promised}, survived 0..{next}",
                    cut.unsynced_pages
                );
            }
            Err(e) => {
                out.check_failures += 1;
                out.at_cuts += Tally {
                    acked: promised,
                    lost: promised,
                    duplicated: 0,
                };
                out.problem(trial, format!("replica export after the cut: {e:#}"));
            }
        }
        if let Err(e) = peer.check() {
            out.check_failures += 1;
            out.problem(
                trial,
                format!("the peer's buffer check after the cut: {e:#}"),
            );
        }
        out.trials = trial;
        peer.restart()
            .with_context(|| format!("trial {trial}: the peer does not start after the cut"))?;
    }
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(60))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = origin.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    wait_progress(head.saturating_sub(1), Duration::from_secs(60), || {
        watch.max_for(&origin_id)
    })
    .context("the peer did not catch up with the origin")?;
    peer.stop(Duration::from_secs(20))?;
    origin.stop(Duration::from_secs(20))?;
    let stored = export_store(&replicas)?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    out.sent += sent.iter().map(|s| u64::from(s.2)).sum::<u64>();
    out.at_end += tally(&as_exported(&stored), &sent);
    let (next, holes, repeats) = offsets_of(&stored, &origin_id);
    if next != head || holes > 0 || repeats > 0 {
        out.problem(
            out.trials,
            format!(
                "final replica 0..{next} ({holes} holes, {repeats} repeats), origin head {head}"
            ),
        );
    }
    drop(watch);
    drop(peer);
    drop(origin);
    disk.unmount()?;
    Ok(())
}

fn poll_origin(agent: &Agent) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = agent.status() {
            if let Some(o) = s["origin"].as_str() {
                return Ok(o.to_owned());
            }
        }
        if Instant::now() >= deadline {
            bail!("no origin in /status");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

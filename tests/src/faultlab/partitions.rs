//! Partitions in network namespaces: a site of three agents and a gateway, each in a
//! namespace of its own, links cut by nftables rules that drop packets silently.
//!
//! Scenarios (each healed before the next): the leader's uplink cut; the leader cut off
//! from its site; one follower cut off; a 1–2 split with the gateway on the leader's
//! (minority) side; one link flapping every two seconds. Measured in each: how long
//! keepalives took to notice the half-open links (against `uplink.keepalive_secs`, which
//! the uplink and replication clients use), when a cut-off leader lost its lease and
//! when the gateway last stored anything it forwarded (against `lease_ticks × tick_ms`),
//! and how long the site took to elect a new leader. At the end every reading any device
//! sent (each re-sent until acknowledged) must be at the gateway exactly once.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{as_exported, offsets_of, tally, Tally};
use crate::netlab::{LabProc, NetLab};
use crate::powercut::PowercutDisk;
use crate::{agent_bin, http_get, DeviceSpec, Fleet};

pub const AGENT_MQTT: u16 = 1883;
pub const AGENT_HTTP: u16 = 9180;
pub const GW_MQTT: u16 = 1883;
pub const GW_HTTP: u16 = 9280;
/// The election's defaults: `cluster.lease_ticks` × `cluster.tick_ms`.
pub const LEASE: Duration = Duration::from_millis(16 * 50);

/// How a [`SiteLab`] starts.
#[derive(Debug, Clone)]
pub struct SiteLabOptions {
    pub site: String,
    pub agents: usize,
    /// `uplink.keepalive_secs` of every agent (uplink and replication links).
    pub keepalive_secs: u64,
    /// Put every agent's and the gateway's data directory on a power-cut disk.
    pub powercut: bool,
    /// Simulated devices in all, spread over the agents.
    pub devices: u32,
    /// Extra environment for every agent.
    pub env: Vec<(String, String)>,
    /// Time between readings of one device.
    pub interval: Duration,
    pub boot: u32,
}

impl SiteLabOptions {
    pub fn new(site: &str) -> SiteLabOptions {
        SiteLabOptions {
            site: site.into(),
            agents: 3,
            keepalive_secs: 5,
            powercut: false,
            devices: 6,
            env: Vec::new(),
            interval: Duration::from_millis(5),
            boot: 1,
        }
    }
}

/// A site in namespaces: `agents[i]` runs in namespace `a<i+1>`, the gateway in `gw`.
pub struct SiteLab {
    pub opts: SiteLabOptions,
    pub ids: Vec<String>,
    pub fleets: Vec<Fleet>,
    pub agents: Vec<LabProc>,
    pub gateway: LabProc,
    /// One per agent, then the gateway's (with `powercut`).
    pub disks: Vec<PowercutDisk>,
    pub data_dirs: Vec<PathBuf>,
    pub gw_data: PathBuf,
    /// Dropped last: namespaces go after the processes in them.
    pub net: NetLab,
    tmp: Option<tempfile::TempDir>,
}

impl SiteLab {
    pub fn start(opts: &SiteLabOptions) -> anyhow::Result<SiteLab> {
        let ids: Vec<String> = (1..=opts.agents).map(|i| format!("a{i}")).collect();
        let mut names: Vec<&str> = ids.iter().map(String::as_str).collect();
        names.push("gw");
        let net = NetLab::create(&names)?;
        let tmp = tempfile::Builder::new()
            .prefix("fogline-netlab-")
            .tempdir()?;
        let mut disks = Vec::new();
        let mut data_dirs = Vec::new();
        for id in &ids {
            if opts.powercut {
                let disk = PowercutDisk::mount()?;
                data_dirs.push(disk.durable_dir("fogline")?.join(id));
                disks.push(disk);
            } else {
                data_dirs.push(tmp.path().join(id));
            }
        }
        let gw_data = if opts.powercut {
            let disk = PowercutDisk::mount()?;
            let dir = disk.durable_dir("gateway")?.join("data");
            disks.push(disk);
            dir
        } else {
            tmp.path().join("gateway")
        };
        let gw_node = net.node("gw")?.clone();
        let mut gateway = super::powercut_trials::gateway_proc(
            "gw",
            &gw_data,
            gw_node.addr(GW_MQTT),
            gw_node.addr(GW_HTTP),
            Some(&gw_node.ns),
            tmp.path().join("gateway.log"),
        )?;
        gateway.start()?;
        let bin = agent_bin()?;
        let mut agents = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let node = net.node(id)?;
            let peers: Vec<String> = ids
                .iter()
                .filter(|p| *p != id)
                .map(|p| Ok(format!("{p}={}", net.node(p)?.addr(AGENT_MQTT))))
                .collect::<anyhow::Result<_>>()?;
            let args: Vec<OsString> = [
                "run",
                "--node-id",
                id,
                "--site",
                &opts.site,
                "--data-dir",
                &data_dirs[i].to_string_lossy(),
                "--mqtt-listen",
                &node.addr(AGENT_MQTT).to_string(),
                "--mqtt-listen-v5",
                "",
                "--http-listen",
                &node.addr(AGENT_HTTP).to_string(),
                "--peers",
                &peers.join(","),
                "--gateway",
                &gw_node.addr(GW_MQTT).to_string(),
            ]
            .iter()
            .map(OsString::from)
            .collect();
            let mut env = vec![
                (
                    "FOGLINE_UPLINK__KEEPALIVE_SECS".to_owned(),
                    opts.keepalive_secs.to_string(),
                ),
                ("FOGLINE_UPLINK__BACKOFF_MIN_MS".into(), "200".into()),
                ("FOGLINE_UPLINK__BACKOFF_MAX_MS".into(), "2000".into()),
                (
                    "FOGLINE_BUFFER__MIN_FREE_DISK_BYTES".into(),
                    "4194304".into(),
                ),
                ("FOGLINE_LOG__LEVEL".into(), "info,rumqttd=warn".into()),
            ];
            env.extend(opts.env.iter().cloned());
            let mut p = LabProc::new(
                id,
                &bin,
                args,
                env,
                Some(&node.ns),
                tmp.path().join(format!("{id}.log")),
            );
            p.start()?;
            agents.push(p);
        }
        let mut lab = SiteLab {
            opts: opts.clone(),
            ids,
            fleets: Vec::new(),
            agents,
            gateway,
            disks,
            data_dirs,
            gw_data,
            net,
            tmp: Some(tmp),
        };
        lab.gateway
            .wait_ready(gw_node.addr(GW_HTTP), Duration::from_secs(30))?;
        for i in 0..lab.agents.len() {
            let http = lab.http(i)?;
            lab.agents[i].wait_ready(http, Duration::from_secs(30))?;
        }
        for i in 0..lab.agents.len() {
            let mut fleet = Fleet::new(lab.net.node(&lab.ids[i])?.addr(AGENT_MQTT))?;
            let n = lab.agents.len() as u32;
            for k in (0..opts.devices).filter(|k| k % n == i as u32) {
                let mut spec = DeviceSpec::json(format!("{}-d{k}", lab.ids[i]), "temp", opts.boot);
                spec.interval = Some(opts.interval);
                spec.window = 2000;
                spec.max_backoff = Duration::from_millis(500);
                fleet.add(spec)?;
            }
            lab.fleets.push(fleet);
        }
        for f in &lab.fleets {
            f.wait_connected(Duration::from_secs(20))?;
        }
        Ok(lab)
    }

    /// Keeps the logs (and plain data directories) for whoever investigates a failure.
    pub fn keep_logs(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let kept = tmp.keep();
            eprintln!("kept the lab's logs and data in {}", kept.display());
        }
    }

    pub fn http(&self, i: usize) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.net.node(&self.ids[i])?.addr(AGENT_HTTP))
    }

    pub fn gw_http(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.net.node("gw")?.addr(GW_HTTP))
    }

    /// Agent `i`'s `/status`.
    pub fn status(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let (code, body) = http_get(self.http(i)?, "/status")?;
        if code != 200 {
            bail!("{} /status answered {code}", self.ids[i]);
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Sum of the gateway's watermarks over every origin of the site.
    pub fn gateway_total(&self) -> anyhow::Result<u64> {
        let (_, body) = http_get(self.gw_http()?, "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["origins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["site"] == self.opts.site.as_str())
            .filter_map(|o| o["next_offset"].as_u64())
            .sum())
    }

    /// The gateway's watermark of one origin id.
    pub fn gateway_next(&self, origin: &str) -> anyhow::Result<u64> {
        let (_, body) = http_get(self.gw_http()?, "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["origins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["site"] == self.opts.site.as_str() && o["origin"] == origin)
            .filter_map(|o| o["next_offset"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// Running agents that say they lead.
    pub fn leaders(&mut self) -> Vec<usize> {
        let running: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].is_running())
            .collect();
        running
            .into_iter()
            .filter(|&i| self.status(i).is_ok_and(|s| s["role"] == "leader"))
            .collect()
    }

    /// Waits for one leader (not in `not`) that every agent in `agree` names.
    pub fn wait_leader(
        &mut self,
        timeout: Duration,
        not: &[usize],
        agree: &[usize],
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<usize> = self
                .leaders()
                .into_iter()
                .filter(|l| !not.contains(l))
                .collect();
            if let [l] = leaders[..] {
                let id = self.ids[l].clone();
                if agree
                    .iter()
                    .all(|&a| a == l || self.status(a).is_ok_and(|s| s["leader"] == id.as_str()))
                {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                bail!("no single leader within {timeout:?} (leaders: {leaders:?})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every origin log the running agents hold, with the highest offset any holds.
    pub fn known_heads(&mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut heads = std::collections::BTreeMap::<String, u64>::new();
        for i in 0..self.agents.len() {
            if !self.agents[i].is_running() {
                continue;
            }
            let s = self.status(i)?;
            if let (Some(o), Some(h)) = (s["origin"].as_str(), s["buffer"]["next_offset"].as_u64())
            {
                let e = heads.entry(o.to_owned()).or_default();
                *e = (*e).max(h);
            }
            for r in s["cluster"]["replicas"].as_array().into_iter().flatten() {
                if let (Some(o), Some(n)) = (r["origin"].as_str(), r["next"].as_u64()) {
                    let e = heads.entry(o.to_owned()).or_default();
                    *e = (*e).max(n);
                }
            }
        }
        Ok(heads.into_iter().collect())
    }

    /// Waits until the gateway holds every origin up to the head any agent held when
    /// this was called (a snapshot: while devices publish, the heads move on, and the
    /// gateway trails them by what is in flight).
    pub fn wait_gateway_caught_up(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let heads = self.known_heads()?;
        loop {
            let mut behind = Vec::new();
            for (o, h) in &heads {
                let at = self.gateway_next(o)?;
                if at < *h {
                    behind.push(format!("{o}: {at} < {h}"));
                }
            }
            if behind.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                for i in 0..self.agents.len() {
                    eprintln!(
                        "----- {} /status -----\n{}",
                        self.ids[i],
                        self.status(i)
                            .map_or_else(|e| e.to_string(), |s| s.to_string())
                    );
                }
                bail!(
                    "the gateway did not catch up within {timeout:?}: {}",
                    behind.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops new readings, waits until every device is acknowledged, then the gateway
    /// has everything; stops the site and returns the gateway store's tally of everything
    /// sent, plus problems with the offsets.
    pub fn finish(&mut self, timeout: Duration) -> anyhow::Result<(Tally, Vec<String>)> {
        let mut sent = Vec::new();
        for f in &self.fleets {
            f.stop_publishing();
        }
        for f in &mut self.fleets {
            f.wait_all_acked(timeout)?;
            sent.extend(
                f.snapshots()
                    .into_iter()
                    .map(|s| (s.device, s.boot, s.sent)),
            );
            f.shutdown();
        }
        self.wait_gateway_caught_up(timeout)?;
        let heads = self.known_heads()?;
        for a in &mut self.agents {
            a.stop(Duration::from_secs(20))?;
        }
        self.gateway.stop(Duration::from_secs(20))?;
        let stored = super::powercut_trials::export_store(&self.gw_data.join("gateway.redb"))?;
        let t = tally(&as_exported(&stored), &sent);
        let mut problems = Vec::new();
        for (origin, head) in heads {
            let (next, holes, repeats) = offsets_of(&stored, &origin);
            if next < head || holes > 0 || repeats > 0 {
                problems.push(format!(
                    "{origin}: gateway holds 0..{next} ({holes} holes, {repeats} repeats), head {head}"
                ));
            }
        }
        Ok((t, problems))
    }
}

/// What one scenario measured. Times are from the moment the rules went in.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub name: &'static str,
    pub leader_before: String,
    pub leader_after: String,
    /// A new leader agreed by the agents that can reach each other.
    pub elected: Option<Duration>,
    /// The cut-off leader's `cluster.lease` went false.
    pub lease_lost: Option<Duration>,
    /// The gateway's last progress before a new leader took over: how long the cut-off
    /// leader kept forwarding.
    pub forwarded_until: Option<Duration>,
    /// `(link, time)`: a half-open link seen as down in `/status`.
    pub detected: Vec<(String, Duration)>,
    /// Time from healing to the gateway holding every head.
    pub caught_up: Option<Duration>,
    pub problems: Vec<String>,
}

impl Scenario {
    pub fn line(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
        };
        let detected: Vec<String> = self
            .detected
            .iter()
            .map(|(l, d)| format!("{l} {:.1} s", d.as_secs_f64()))
            .collect();
        format!(
            "{}: leader {} -> {}; lease lost {}, forwarded until {}, elected {}; half-open links \
             detected: [{}]; caught up {} after healing{}",
            self.name,
            self.leader_before,
            self.leader_after,
            ms(self.lease_lost),
            ms(self.forwarded_until),
            ms(self.elected),
            detected.join(", "),
            ms(self.caught_up),
            if self.problems.is_empty() {
                String::new()
            } else {
                format!("; PROBLEMS: {}", self.problems.join("; "))
            }
        )
    }
}

/// Everything a partition run measured.
#[derive(Debug, Clone, Default)]
pub struct PartitionReport {
    pub keepalive: Duration,
    pub scenarios: Vec<Scenario>,
    pub at_end: Tally,
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl PartitionReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.scenarios.iter().all(|s| s.problems.is_empty())
            && self.at_end.lost == 0
            && self.at_end.duplicated == 0
    }

    /// The longest keepalive detection seen.
    pub fn slowest_detection(&self) -> Option<Duration> {
        self.scenarios
            .iter()
            .flat_map(|s| s.detected.iter().map(|(_, d)| *d))
            .max()
    }
}

/// A half-open link must be seen down within two keepalive periods (the client pings
/// after one period of silence and gives up when the next is due without an answer),
/// plus the time `/status` takes to show it.
pub fn detection_bound(keepalive: Duration) -> Duration {
    keepalive * 2 + Duration::from_secs(2)
}

/// What observing the lease costs on top of it: a tick (the lease is checked each tick,
/// 50 ms) and one turn of the observation loop, which asks up to five `/status`es and
/// the gateway's in turn and then sleeps 20 ms. On the 2-core machine at load 10 a lease
/// was seen lost 970 ms after the cut; the lease itself ends 600–800 ms after it (it runs
/// from the start of the last heartbeat round a majority acknowledged, every 200 ms).
pub const LEASE_TOLERANCE: Duration = Duration::from_millis(400);

fn link_of(status: &serde_json::Value, peer: &str) -> Option<String> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["id"] == peer)
        .and_then(|p| p["link"].as_str())
        .map(str::to_owned)
}

/// Watches, until `until` passes or everything is seen: the links in `links`
/// (`(agent, Some(peer))`: its replication link to that peer; `(agent, None)`: its
/// uplink) until each is not "connected"; with `cut_leader`, its lease and the gateway's
/// progress until a leader other than it, agreed by `majority`, appears.
fn observe(
    lab: &mut SiteLab,
    sc: &mut Scenario,
    t0: Instant,
    links: &[(usize, Option<usize>)],
    cut_leader: Option<usize>,
    majority: &[usize],
    until: Duration,
) -> anyhow::Result<()> {
    let mut pending: Vec<(usize, Option<usize>)> = links.to_vec();
    let mut last_total = lab.gateway_total().unwrap_or(0);
    let mut last_progress: Option<Duration> = None;
    let mut elected_seen = cut_leader.is_none();
    let mut new_leader_seen = false;
    while t0.elapsed() < until {
        let now = t0.elapsed();
        let mut still = Vec::new();
        for (a, peer) in pending {
            let s = lab.status(a)?;
            let link = match peer {
                Some(p) => link_of(&s, &lab.ids[p]),
                None => s["backlog"]["gateway"]["link"].as_str().map(str::to_owned),
            };
            if link.as_deref() == Some("connected") {
                still.push((a, peer));
            } else {
                let name = match peer {
                    Some(p) => format!("{}->{} replication", lab.ids[a], lab.ids[p]),
                    None => format!("{} uplink", lab.ids[a]),
                };
                sc.detected.push((name, now));
            }
        }
        pending = still;
        if let Some(old) = cut_leader {
            if sc.lease_lost.is_none() && lab.status(old)?["cluster"]["lease"] == false {
                sc.lease_lost = Some(now);
            }
            if !elected_seen {
                let leaders: Vec<usize> = majority
                    .iter()
                    .copied()
                    .filter(|&i| lab.status(i).is_ok_and(|s| s["role"] == "leader"))
                    .collect();
                // Progress counts as the cut-off leader's only while no other agent leads:
                // a new leader forwards as soon as it holds the lease, before every agent
                // of the majority reports it. Leaders are looked at before the gateway, so
                // progress seen in this round came before any new leader.
                if leaders.is_empty() && !new_leader_seen {
                    let total = lab.gateway_total().unwrap_or(last_total);
                    if total > last_total {
                        last_total = total;
                        last_progress = Some(now);
                    }
                } else {
                    new_leader_seen = true;
                }
                if let [l] = leaders[..] {
                    let id = lab.ids[l].clone();
                    if majority
                        .iter()
                        .all(|&a| lab.status(a).is_ok_and(|s| s["leader"] == id.as_str()))
                    {
                        elected_seen = true;
                        sc.elected = Some(now);
                        sc.forwarded_until = last_progress;
                        sc.leader_after = id;
                    }
                }
            }
        }
        let lease_done = cut_leader.is_none() || sc.lease_lost.is_some();
        if pending.is_empty() && elected_seen && lease_done {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (a, peer) in pending {
        let name = match peer {
            Some(p) => format!("{}->{} replication", lab.ids[a], lab.ids[p]),
            None => format!("{} uplink", lab.ids[a]),
        };
        sc.problems
            .push(format!("{name} still 'connected' {until:?} after the cut"));
    }
    if !elected_seen {
        sc.problems.push(format!("no new leader within {until:?}"));
    }
    Ok(())
}

fn check_bounds(sc: &mut Scenario, keepalive: Duration) {
    let bound = detection_bound(keepalive);
    for (link, d) in &sc.detected {
        if *d > bound {
            sc.problems.push(format!(
                "{link}: half-open link seen after {:.1} s, beyond {:.1} s (keepalive {} s)",
                d.as_secs_f64(),
                bound.as_secs_f64(),
                keepalive.as_secs()
            ));
        }
    }
    if let Some(l) = sc.lease_lost {
        if l > LEASE + LEASE_TOLERANCE {
            sc.problems.push(format!(
                "the cut-off leader held its lease {} ms (lease {} ms)",
                l.as_millis(),
                LEASE.as_millis()
            ));
        }
    }
    if let Some(f) = sc.forwarded_until {
        if f > LEASE + LEASE_TOLERANCE {
            sc.problems.push(format!(
                "the gateway stored forwarded readings {} ms after the cut (lease {} ms)",
                f.as_millis(),
                LEASE.as_millis()
            ));
        }
    }
}

fn all(lab: &SiteLab) -> Vec<usize> {
    (0..lab.agents.len()).collect()
}

fn settle(lab: &mut SiteLab, sc: &mut Scenario) -> anyhow::Result<()> {
    lab.net.heal_all()?;
    let healed = Instant::now();
    let everyone = all(lab);
    let leader = lab.wait_leader(Duration::from_secs(30), &[], &everyone)?;
    if sc.leader_after.is_empty() {
        sc.leader_after = lab.ids[leader].clone();
    }
    lab.wait_gateway_caught_up(Duration::from_secs(90))?;
    sc.caught_up = Some(healed.elapsed());
    Ok(())
}

/// The partitions a lab can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// The leader's link to the gateway.
    UplinkCut,
    /// The leader from every other agent (not from the gateway).
    IsolateLeader,
    /// One follower from every other agent.
    IsolateFollower,
    /// The leader and the gateway on one side, the other two agents on the other.
    Split,
    /// The link between the leader and one follower, cut and healed `flaps` times.
    Flap,
}

impl Partition {
    pub const ALL: [Partition; 5] = [
        Partition::UplinkCut,
        Partition::IsolateLeader,
        Partition::IsolateFollower,
        Partition::Split,
        Partition::Flap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Partition::UplinkCut => "uplink cut",
            Partition::IsolateLeader => "leader isolated",
            Partition::IsolateFollower => "follower isolated",
            Partition::Split => "split 1-2 (leader with the gateway)",
            Partition::Flap => "flapping leader-follower link",
        }
    }
}

/// Makes one partition, watches what it does, heals it and waits until the site and
/// the gateway have caught up.
pub fn inject(
    lab: &mut SiteLab,
    what: Partition,
    rng: &mut fastrand::Rng,
    flaps: u32,
) -> anyhow::Result<Scenario> {
    let keepalive = Duration::from_secs(lab.opts.keepalive_secs);
    let watch = keepalive * 3 + Duration::from_secs(5);
    let everyone = all(lab);
    let l = lab.wait_leader(Duration::from_secs(30), &[], &everyone)?;
    let others: Vec<usize> = everyone.iter().copied().filter(|&i| i != l).collect();
    let f = others[rng.usize(0..others.len())];
    let mut sc = Scenario {
        name: what.name(),
        leader_before: lab.ids[l].clone(),
        ..Scenario::default()
    };
    let (lid, fid) = (lab.ids[l].clone(), lab.ids[f].clone());
    std::thread::sleep(Duration::from_millis(rng.u64(300..1200)));
    let t0 = Instant::now();
    match what {
        Partition::UplinkCut => {
            // The site keeps going; only the uplink sees its link die.
            lab.net.cut(&lid, "gw")?;
            observe(lab, &mut sc, t0, &[(l, None)], None, &[], watch)?;
            std::thread::sleep(Duration::from_secs(2));
            if lab.status(l)?["role"] != "leader" {
                sc.problems
                    .push(format!("losing only its uplink cost {lid} the lead"));
            }
        }
        Partition::IsolateLeader => {
            lab.net.isolate(&lid)?;
            let links: Vec<(usize, Option<usize>)> = others
                .iter()
                .map(|&o| (o, Some(l)))
                .chain(others.iter().map(|&o| (l, Some(o))))
                .collect();
            observe(lab, &mut sc, t0, &links, Some(l), &others, watch)?;
            // Cut off, it must not lead again.
            std::thread::sleep(Duration::from_secs(2));
            let s = lab.status(l)?;
            if s["role"] == "leader" || s["cluster"]["lease"] == true {
                sc.problems
                    .push(format!("the isolated agent leads or holds a lease: {s}"));
            }
        }
        Partition::IsolateFollower => {
            lab.net.isolate(&fid)?;
            let rest: Vec<usize> = everyone.iter().copied().filter(|&i| i != f).collect();
            let links: Vec<(usize, Option<usize>)> = rest
                .iter()
                .map(|&o| (o, Some(f)))
                .chain(rest.iter().map(|&o| (f, Some(o))))
                .collect();
            observe(lab, &mut sc, t0, &links, None, &[], watch)?;
            let s = lab.status(l)?;
            if s["role"] != "leader" || s["cluster"]["lease"] != true {
                sc.problems.push(format!(
                    "the leader lost its lead when a follower was cut off: {s}"
                ));
            }
            if lab.status(f)?["role"] == "leader" {
                sc.problems.push("the isolated follower leads".into());
            }
        }
        Partition::Split => {
            let majority: Vec<String> = others.iter().map(|&i| lab.ids[i].clone()).collect();
            let b: Vec<&str> = majority.iter().map(String::as_str).collect();
            lab.net.split(&[&[lid.as_str(), "gw"], &b])?;
            // The majority's uplinks were on standby: the leader's replication links
            // and its lease are what to watch.
            let links: Vec<(usize, Option<usize>)> = others.iter().map(|&o| (l, Some(o))).collect();
            observe(lab, &mut sc, t0, &links, Some(l), &others, watch)?;
            std::thread::sleep(Duration::from_secs(1));
            let s = lab.status(l)?;
            if s["role"] == "leader" || s["cluster"]["lease"] == true {
                sc.problems
                    .push(format!("the minority leader leads or holds a lease: {s}"));
            }
        }
        Partition::Flap => {
            let mut changes = 0u32;
            let mut last = lid.clone();
            for _ in 0..flaps {
                for cut in [true, false] {
                    if cut {
                        lab.net.cut(&lid, &fid)?;
                    } else {
                        lab.net.heal(&lid, &fid)?;
                    }
                    let until = Instant::now() + Duration::from_millis(rng.u64(1500..3000));
                    while Instant::now() < until {
                        // Never two agents holding a lease at once.
                        let holders: Vec<usize> = everyone
                            .iter()
                            .copied()
                            .filter(|&i| lab.status(i).is_ok_and(|s| s["cluster"]["lease"] == true))
                            .collect();
                        if holders.len() > 1 {
                            sc.problems.push(format!("two leases at once: {holders:?}"));
                        }
                        if let [h] = holders[..] {
                            if lab.ids[h] != last {
                                changes += 1;
                                last = lab.ids[h].clone();
                            }
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            sc.detected.clear();
            eprintln!("[partitions] flapping {lid}-{fid}: {flaps} flaps, {changes} lease changes");
        }
    }
    settle(lab, &mut sc)?;
    check_bounds(&mut sc, keepalive);
    Ok(sc)
}

/// Runs every partition once on a fresh site; `flaps` cut/heal cycles in the last one.
pub fn run(seed: u64, keepalive_secs: u64, flaps: u32) -> anyhow::Result<PartitionReport> {
    run_only(seed, keepalive_secs, flaps, &Partition::ALL)
}

/// Runs the partitions in `which`, in order, on a fresh site.
pub fn run_only(
    seed: u64,
    keepalive_secs: u64,
    flaps: u32,
    which: &[Partition],
) -> anyhow::Result<PartitionReport> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut opts = SiteLabOptions::new("site-net");
    opts.keepalive_secs = keepalive_secs;
    opts.boot = 1 + rng.u32(0..1000);
    let mut lab = SiteLab::start(&opts)?;
    let mut report = PartitionReport {
        keepalive: Duration::from_secs(keepalive_secs),
        ..PartitionReport::default()
    };
    let everyone = all(&lab);
    lab.wait_leader(Duration::from_secs(30), &[], &everyone)?;
    lab.wait_gateway_caught_up(Duration::from_secs(60))?;
    for &what in which {
        let sc = inject(&mut lab, what, &mut rng, flaps).map_err(|e| {
            lab.keep_logs();
            e.context(format!("during '{}'", what.name()))
        })?;
        eprintln!("[partitions] {}", sc.line());
        report.scenarios.push(sc);
    }
    let (t, problems) = lab
        .finish(Duration::from_secs(90))
        .inspect_err(|_| lab.keep_logs())?;
    report.at_end = t;
    report.problems = problems;
    report.elapsed = started.elapsed();
    Ok(report)
}

//! A site of several real agents and a real gateway, with every link between them running
//! through a [`TcpProxy`] the test controls: `links[i][j]` carries what agent `i` sends
//! to agent `j`'s broker, `cloud[i]` carries agent `i`'s uplink to the gateway. Cutting
//! both directions between one agent and the rest partitions it; cutting every `cloud`
//! link takes the site offline.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{free_port, local, Agent, AgentOptions, DeviceSpec, Fleet, Gateway, TcpProxy};

/// How to start a [`Site`].
#[derive(Debug, Clone)]
pub struct SiteOptions {
    pub site: String,
    pub agents: usize,
    /// Extra environment for every agent.
    pub env: Vec<(String, String)>,
}

impl SiteOptions {
    pub fn new(site: &str, agents: usize) -> SiteOptions {
        SiteOptions {
            site: site.to_owned(),
            agents,
            env: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }
}

pub struct Site {
    pub site: String,
    pub ids: Vec<String>,
    pub agents: Vec<Agent>,
    /// `links[i][j]`: agent `i` → agent `j` (`None` on the diagonal).
    pub links: Vec<Vec<Option<TcpProxy>>>,
    /// Agent `i` → the gateway.
    pub cloud: Vec<TcpProxy>,
    pub gateway: Gateway,
    /// The agents' lease (`cluster.lease_ticks` × `cluster.tick_ms`), as they run.
    lease: Duration,
}

/// The lease of agents started with `env`, as the agent itself computes its config.
fn lease_of(env: &[(String, String)]) -> anyhow::Result<Duration> {
    let mut cmd = std::process::Command::new(crate::agent_bin()?);
    crate::clean_env(&mut cmd).args(["config", "check"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = crate::run_bounded(&mut cmd, Duration::from_secs(30))?;
    anyhow::ensure!(out.status.success(), "config check: {}", out.stderr.trim());
    let c: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    let (Some(ticks), Some(tick_ms)) = (
        c["cluster"]["lease_ticks"].as_u64(),
        c["cluster"]["tick_ms"].as_u64(),
    ) else {
        anyhow::bail!("config check shows no cluster.lease_ticks / tick_ms: {c}");
    };
    Ok(Duration::from_millis(ticks * tick_ms))
}

impl Site {
    /// Starts a gateway and `opts.agents` agents named `a1`, `a2`, … that know each other
    /// through proxies; waits until every agent is ready (not for a leader).
    pub fn start(opts: &SiteOptions) -> anyhow::Result<Site> {
        let gateway = Gateway::start(&[])?;
        let n = opts.agents;
        let ids: Vec<String> = (1..=n).map(|i| format!("a{i}")).collect();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let mut links = Vec::with_capacity(n);
        for i in 0..n {
            let mut row = Vec::with_capacity(n);
            for (j, port) in ports.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(TcpProxy::start(local(*port))?)
                });
            }
            links.push(row);
        }
        let cloud: Vec<TcpProxy> = (0..n)
            .map(|_| TcpProxy::start(gateway.mqtt_addr()))
            .collect::<anyhow::Result<_>>()?;
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            let peers: Vec<String> = (0..n)
                .filter_map(|j| {
                    let proxy = links[i][j].as_ref()?;
                    Some(format!("{}={}", ids[j], proxy.addr()))
                })
                .collect();
            let mut agent_opts = AgentOptions {
                name: Some(ids[i].clone()),
                mqtt_port: Some(ports[i]),
                args: vec![
                    "--node-id".into(),
                    ids[i].clone(),
                    "--site".into(),
                    opts.site.clone(),
                    "--peers".into(),
                    peers.join(","),
                    "--gateway".into(),
                    cloud[i].addr().to_string(),
                ],
                ..AgentOptions::default()
            };
            for (k, v) in &opts.env {
                agent_opts = agent_opts.env(k.clone(), v);
            }
            agents.push(Agent::spawn(agent_opts)?);
        }
        for a in &mut agents {
            a.wait_ready(Duration::from_secs(30))?;
        }
        let lease = lease_of(&opts.env)?;
        Ok(Site {
            site: opts.site.clone(),
            ids,
            agents,
            links,
            cloud,
            gateway,
            lease,
        })
    }

    /// How long a leader keeps forwarding without hearing a majority: the lease the
    /// agents run with (from `fogline-agent config check` with the site's environment).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The agents that run and say they are leader.
    pub fn leaders(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for i in 0..self.agents.len() {
            if !self.agents[i].is_running() {
                continue;
            }
            if let Ok(s) = self.agents[i].status() {
                if s["role"] == "leader" {
                    out.push(i);
                }
            }
        }
        out
    }

    /// Waits until exactly one running agent other than those in `not` leads, and every
    /// other running agent in `agree` names it as leader.
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
                let id = &self.ids[l];
                let agreed = agree.iter().all(|&a| {
                    a == l
                        || self.agents[a]
                            .status()
                            .is_ok_and(|s| s["leader"].as_str() == Some(id))
                });
                if agreed {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                bail!("no single leader within {timeout:?} (leaders: {leaders:?})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One fleet per agent, `per_agent` devices each (`<agent>-d<k>`, metric `temp`), a
    /// reading every `interval`, connected.
    pub fn fleets(
        &self,
        per_agent: u32,
        interval: Duration,
        boot: u32,
    ) -> anyhow::Result<Vec<Fleet>> {
        let mut fleets = Vec::with_capacity(self.agents.len());
        for (i, agent) in self.agents.iter().enumerate() {
            let mut fleet = Fleet::new(agent.mqtt_addr())?;
            for k in 0..per_agent {
                let mut spec = DeviceSpec::json(format!("{}-d{k}", self.ids[i]), "temp", boot);
                spec.interval = Some(interval);
                spec.window = 200;
                fleet.add(spec)?;
            }
            fleet.wait_connected(Duration::from_secs(10))?;
            fleets.push(fleet);
        }
        Ok(fleets)
    }

    /// Stops every fleet's new readings, waits until each device's ack covers what it
    /// sent, shuts the fleets down and returns `(device, boot, sent)` of every device:
    /// what the gateway must end up with.
    pub fn finish_fleets(fleets: &mut [Fleet]) -> anyhow::Result<Vec<(String, u32, u32)>> {
        let mut expect = Vec::new();
        for f in fleets.iter_mut() {
            f.stop_publishing();
            f.wait_all_acked(Duration::from_secs(60))?;
            expect.extend(
                f.snapshots()
                    .into_iter()
                    .map(|s| (s.device, s.boot, s.sent)),
            );
            f.shutdown();
        }
        Ok(expect)
    }

    /// The gateway's watermark of every origin in `origins`.
    pub fn gateway_marks(&self, origins: &[String]) -> anyhow::Result<Vec<u64>> {
        origins.iter().map(|o| self.gateway_next(o)).collect()
    }

    /// Waits until the gateway's watermark of any of `origins` passes its value in
    /// `before`: the first batch acked by the gateway since then. Returns the time since
    /// `since`.
    pub fn wait_uplink_progress(
        &self,
        origins: &[String],
        before: &[u64],
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        loop {
            let moved = origins
                .iter()
                .zip(before)
                .any(|(o, b)| self.gateway_next(o).is_ok_and(|n| n > *b));
            if moved {
                return Ok(since.elapsed());
            }
            if since.elapsed() >= timeout {
                bail!("the gateway acked nothing new within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Cuts every link between agent `i` and the other agents (not its uplink).
    pub fn isolate(&self, i: usize) {
        for j in 0..self.agents.len() {
            for (a, b) in [(i, j), (j, i)] {
                if let Some(p) = &self.links[a][b] {
                    p.cut();
                }
            }
        }
    }

    /// Restores what [`Site::isolate`] cut.
    pub fn heal(&self, i: usize) {
        for j in 0..self.agents.len() {
            for (a, b) in [(i, j), (j, i)] {
                if let Some(p) = &self.links[a][b] {
                    p.restore();
                }
            }
        }
    }

    pub fn cut_cloud(&self) {
        for p in &self.cloud {
            p.cut();
        }
    }

    pub fn restore_cloud(&self) {
        for p in &self.cloud {
            p.restore();
        }
    }

    /// Agent `i`'s origin id, from its `/status`.
    pub fn origin(&self, i: usize) -> anyhow::Result<String> {
        let s = self.agents[i].status()?;
        s["origin"]
            .as_str()
            .map(str::to_owned)
            .context("status has no origin")
    }

    /// The gateway's watermark of an origin id.
    pub fn gateway_next(&self, origin: &str) -> anyhow::Result<u64> {
        self.gateway.next_offset(&self.site, origin)
    }

    /// Waits until the gateway holds every origin in `heads` up to its head.
    pub fn wait_gateway_has(
        &self,
        heads: &[(String, u64)],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut behind = Vec::new();
            for (origin, head) in heads {
                let at = self.gateway_next(origin)?;
                if at < *head {
                    behind.push(format!("{origin}: {at} < {head}"));
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // What each agent thinks, for whoever reads the failure.
                for (id, agent) in self.ids.iter().zip(&self.agents) {
                    let status = agent
                        .status()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                    eprintln!(
                        "----- {id} /status -----\n{status}\n----- {id} log tail -----\n{}",
                        agent.log_tail(60)
                    );
                }
                bail!(
                    "the gateway did not catch up within {timeout:?}: {}",
                    behind.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every origin log the running agents know of, with the highest offset any of them
    /// holds: their own heads and their replicas.
    pub fn known_heads(&mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut heads: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for i in 0..self.agents.len() {
            if !self.agents[i].is_running() {
                continue;
            }
            let s = self.agents[i].status()?;
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

    /// Stops the site, exports the gateway's store and asserts that it holds every
    /// `(device, boot, 1..=n)` of `expect` exactly once, each origin contiguous and in
    /// order. Returns what the gateway stored.
    pub fn stop_and_check(
        &mut self,
        expect: &[(String, u32, u32)],
        seed: u64,
    ) -> anyhow::Result<Vec<crate::GatewayReading>> {
        self.stop()?;
        let stored = self.gateway.export()?;
        let mut problems = crate::check_gateway_log(&stored, expect);
        for o in self.gateway.skipped_at_edge()? {
            problems.push(format!("readings skipped at the edge: {o}"));
        }
        assert!(
            problems.is_empty(),
            "seed {seed}: {} readings at the gateway; problems:\n{}",
            stored.len(),
            problems.join("\n")
        );
        Ok(stored)
    }

    /// Stops every agent and the gateway (SIGTERM, then SIGKILL after the timeout).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        for a in &mut self.agents {
            if a.is_running() {
                a.stop(Duration::from_secs(15))?;
            }
        }
        self.gateway.stop(Duration::from_secs(15))
    }
}

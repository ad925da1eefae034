//! One system under test: an edge process, an upstream process, the TCP proxy between
//! them (to cut the link), and an observer client at the upstream that sees what arrives.
//!
//! - fogline: `fogline-agent` → proxy → `fogline-gateway`; the observer subscribes to the
//!   gateway's uplink ack (`{"next":N}`: every reading below offset N is durable there).
//! - Mosquitto: `mosquitto` (edge, persistence, QoS 1 bridge) → proxy → `mosquitto`
//!   (upstream); the observer is a QoS 1 subscriber to `sensors/#` with a persistent
//!   session, counting every (device, seq) it receives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fogline_tests::mosquitto::Broker;
use fogline_tests::{
    cpu_secs, json_payload, rss_kib, AckSource, Agent, AgentOptions, DeviceSpec, Fleet, Gateway,
    TcpProxy,
};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Fogline,
    Mosquitto,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Fogline => "fogline",
            System::Mosquitto => "Mosquitto + bridge",
        }
    }
}

/// Mosquitto settings shared by both brokers. `max_queued_messages` is raised from its
/// default of 1,000 (beyond which a disconnected bridge or a slow subscriber silently
/// loses QoS 1 messages that were already PUBACKed) to 10 million: enough for the largest
/// backlog measured here (5 million) with room, still a bound.
pub const MOSQUITTO_COMMON: &str = "autosave_interval 1800\nmax_queued_messages 10000000";

/// How to start a rig.
#[derive(Debug, Clone, Copy)]
pub struct RigOptions {
    pub devices: u32,
    /// Reconnect the edge's uplink within about a second (backlog runs, which measure
    /// the drain from the reconnect); otherwise both systems keep their default backoff.
    pub fast_reconnect: bool,
    /// Mosquitto's `max_inflight_messages` on both brokers.
    pub mosquitto_max_inflight: u32,
}

/// When each reading was first published (only while `on`), shared by the payload
/// function and the Mosquitto observer.
#[derive(Default)]
pub struct SendTable {
    pub on: AtomicBool,
    times: Mutex<HashMap<(u32, u32), Instant>>,
}

impl SendTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<(u32, u32), Instant>> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, device: u32, seq: u32) {
        if self.on.load(Ordering::Relaxed) {
            self.lock()
                .entry((device, seq))
                .or_insert_with(Instant::now);
        }
    }

    pub fn get(&self, device: u32, seq: u32) -> Option<Instant> {
        self.lock().get(&(device, seq)).copied()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// What one device's readings look like at the upstream (Mosquitto observer).
#[derive(Default, Clone)]
pub struct DeviceRx {
    /// Times each seq was received, index seq (saturating).
    pub counts: Vec<u8>,
    /// Highest seq received.
    pub max_seen: u32,
}

/// What the observer saw.
#[derive(Default)]
pub struct Observed {
    /// fogline: the gateway's durable `next` offset; Mosquitto: distinct readings received.
    pub received: AtomicU64,
    /// Mosquitto: messages received, duplicates included.
    pub messages: AtomicU64,
    pub per_device: Mutex<Vec<DeviceRx>>,
    /// fogline: (time, next) of every gateway ack, while `recording`.
    pub acks: Mutex<Vec<(Instant, u64)>>,
    /// Mosquitto: publish-to-receive latencies of readings in the send table.
    pub latencies_us: Mutex<Vec<u64>>,
    pub recording: AtomicBool,
    ready: AtomicBool,
    stop: AtomicBool,
}

pub enum Edge {
    Agent(Agent),
    Mosquitto(Broker),
}

pub enum Upstream {
    Gateway(Gateway),
    /// Held so that the process lives (and is killed) with the rig.
    Mosquitto(#[allow(dead_code)] Broker),
}

pub struct Rig {
    pub system: System,
    pub edge: Edge,
    pub proxy: TcpProxy,
    pub upstream: Upstream,
    pub observed: Arc<Observed>,
    pub sends: Arc<SendTable>,
    observer: Client,
}

/// `dev-00042` → 42.
pub fn device_index(device: &str) -> u32 {
    device
        .strip_prefix("dev-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX)
}

impl Rig {
    pub fn start(system: System, opts: RigOptions) -> anyhow::Result<Rig> {
        let observed = Arc::new(Observed::default());
        match system {
            System::Fogline => {
                let gw = Gateway::start(&[])?;
                let proxy = TcpProxy::start(gw.mqtt_addr())?;
                let observer = observe_fogline(gw.mqtt_port(), observed.clone())?;
                let mut agent_opts = AgentOptions {
                    name: Some("bench-edge".into()),
                    ..AgentOptions::default()
                }
                .env("FOGLINE_UPLINK__GATEWAY", proxy.addr())
                .env("FOGLINE_NODE__SITE", "bench")
                .env("FOGLINE_NODE__ID", "edge")
                .env("FOGLINE_MQTT__MAX_CONNECTIONS", opts.devices + 64)
                .env("FOGLINE_BUFFER__MAX_BYTES", 1u64 << 30)
                .env("FOGLINE_LOG__LEVEL", "warn");
                if opts.fast_reconnect {
                    agent_opts = agent_opts
                        .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 100)
                        .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000);
                }
                let agent = Agent::start(agent_opts)?;
                let rig = Rig {
                    system,
                    edge: Edge::Agent(agent),
                    proxy,
                    upstream: Upstream::Gateway(gw),
                    observed,
                    sends: Arc::default(),
                    observer,
                };
                rig.wait_observer()?;
                Ok(rig)
            }
            System::Mosquitto => {
                let common = format!(
                    "{MOSQUITTO_COMMON}\nmax_inflight_messages {}",
                    opts.mosquitto_max_inflight
                );
                let up = Broker::start("upstream", &common)?;
                let proxy = TcpProxy::start(up.addr())?;
                let sends: Arc<SendTable> = Arc::default();
                let observer =
                    observe_mosquitto(up.addr().port(), observed.clone(), sends.clone())?;
                let restart = if opts.fast_reconnect { "1" } else { "5 30" };
                let edge = Broker::start(
                    "edge",
                    &format!(
                        "{common}\n\
                         connection upstream\n\
                         address {}\n\
                         topic sensors/# out 1\n\
                         cleansession false\n\
                         clientid fogline-bench-bridge\n\
                         bridge_protocol_version mqttv311\n\
                         restart_timeout {restart}",
                        proxy.addr()
                    ),
                )?;
                let rig = Rig {
                    system,
                    edge: Edge::Mosquitto(edge),
                    proxy,
                    upstream: Upstream::Mosquitto(up),
                    observed,
                    sends,
                    observer,
                };
                rig.wait_observer()?;
                Ok(rig)
            }
        }
    }

    fn wait_observer(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.observed.ready.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                bail!("the upstream observer did not subscribe within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn edge_addr(&self) -> std::net::SocketAddr {
        match &self.edge {
            Edge::Agent(a) => a.mqtt_addr(),
            Edge::Mosquitto(b) => b.addr(),
        }
    }

    pub fn edge_pid(&self) -> Option<u32> {
        match &self.edge {
            Edge::Agent(a) => a.pid(),
            Edge::Mosquitto(b) => b.pid(),
        }
    }

    /// VmRSS of the edge process in MiB.
    pub fn edge_rss_mib(&self) -> anyhow::Result<f64> {
        let pid = self.edge_pid().context("edge not running")?;
        Ok(rss_kib(pid)?.0 as f64 / 1024.0)
    }

    pub fn edge_cpu_secs(&self) -> anyhow::Result<f64> {
        cpu_secs(self.edge_pid().context("edge not running")?)
    }

    /// SIGKILL the edge process and start it again on its data.
    pub fn crash_and_restart_edge(&mut self) -> anyhow::Result<()> {
        match &mut self.edge {
            Edge::Agent(a) => {
                a.kill9()?;
                a.restart()
            }
            Edge::Mosquitto(b) => {
                b.kill9()?;
                b.restart()
            }
        }
    }

    /// fogline: the agent's head offset (readings in its log); Mosquitto: `None`.
    pub fn edge_head(&self) -> anyhow::Result<Option<u64>> {
        match &self.edge {
            Edge::Agent(a) => Ok(Some(
                a.status()?["buffer"]["next_offset"]
                    .as_u64()
                    .context("no buffer.next_offset in /status")?,
            )),
            Edge::Mosquitto(_) => Ok(None),
        }
    }

    pub fn received(&self) -> u64 {
        self.observed.received.load(Ordering::SeqCst)
    }

    /// Devices of this system's kind, `dev-00000`…, sending JSON readings with a sequence
    /// number; connected (paused) before this returns.
    pub fn fleet(
        &self,
        devices: u32,
        window: u32,
        rate: Option<f64>,
        max_seq: Option<u32>,
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet::new(self.edge_addr())?;
        fleet.set_measuring(false);
        fleet.set_paused(true);
        for d in 0..devices {
            let mut spec = DeviceSpec::json(format!("dev-{d:05}"), "temp", 1);
            spec.window = window;
            spec.interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
            if let Some(max) = max_seq {
                spec.max_seq = max;
            }
            spec.ack = match self.system {
                System::Fogline => AckSource::Watermark,
                System::Mosquitto => AckSource::PubAck,
            };
            let sends = self.sends.clone();
            spec.payload = Arc::new(move |device, boot, seq| {
                sends.record(device_index(device), seq);
                let value = f64::from(seq % 1000) / 10.0;
                (
                    format!("sensors/{device}/temp"),
                    json_payload(value, Some(seq), Some(boot), None),
                )
            });
            fleet.add(spec)?;
            if (d + 1) % 100 == 0 {
                fleet.wait_connected(Duration::from_secs(120))?;
            }
        }
        fleet.wait_connected(Duration::from_secs(120))?;
        Ok(fleet)
    }

    /// Readings received upstream per device and seq. fogline: stops the gateway and
    /// exports its store; Mosquitto: what the observer counted.
    pub fn received_per_device(&mut self, devices: u32) -> anyhow::Result<Vec<DeviceRx>> {
        match &mut self.upstream {
            Upstream::Gateway(gw) => {
                gw.stop(Duration::from_secs(60))?;
                let mut out = vec![DeviceRx::default(); devices as usize];
                for r in gw.export()? {
                    let (Some(seq), Some(rx)) =
                        (r.seq, out.get_mut(device_index(&r.device) as usize))
                    else {
                        continue;
                    };
                    count(rx, seq);
                }
                Ok(out)
            }
            Upstream::Mosquitto(_) => Ok(self
                .observed
                .per_device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()),
        }
    }

    /// fogline only: stops the gateway and returns its readings as (device, seq, offset).
    pub fn gateway_offsets(&mut self) -> anyhow::Result<Vec<(u32, u32, u64)>> {
        let Upstream::Gateway(gw) = &mut self.upstream else {
            bail!("not a fogline rig");
        };
        gw.stop(Duration::from_secs(60))?;
        Ok(gw
            .export()?
            .into_iter()
            .filter_map(|r| Some((device_index(&r.device), r.seq?, r.offset)))
            .collect())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.observed.stop.store(true, Ordering::SeqCst);
        let _ = self.observer.try_disconnect();
    }
}

fn count(rx: &mut DeviceRx, seq: u32) {
    let i = seq as usize;
    if rx.counts.len() <= i {
        rx.counts.resize((i + 1).max(rx.counts.len() * 2), 0);
    }
    rx.counts[i] = rx.counts[i].saturating_add(1);
    rx.max_seen = rx.max_seen.max(seq);
}

/// Connects a client to the upstream at `port`, subscribes to `filter`, and hands every
/// publish (with its arrival time) to `on_publish` on a thread of its own, until the rig
/// is dropped. `ready` is set once the subscription is acknowledged.
fn observe(
    id: &str,
    port: u16,
    persistent: bool,
    filter: &str,
    qos: QoS,
    observed: Arc<Observed>,
    mut on_publish: impl FnMut(&Observed, rumqttc::Publish, Instant) + Send + 'static,
) -> anyhow::Result<Client> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(!persistent)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 1000);
    let mut net = conn.eventloop.network_options();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    client.subscribe(filter, qos)?;
    std::thread::Builder::new()
        .name("observer".into())
        .spawn(move || {
            for event in conn.iter() {
                if observed.stop.load(Ordering::SeqCst) {
                    break;
                }
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        observed.ready.store(true, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        on_publish(&observed, p, Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
    Ok(client)
}

/// The gateway's uplink ack: every reading below `next` is durable there.
fn observe_fogline(gateway_port: u16, observed: Arc<Observed>) -> anyhow::Result<Client> {
    // Origin ids are `<node>.<incarnation>`: the one agent of the bench, whatever its
    // incarnation.
    let filter = "fogline/uplink/bench/+/ack";
    observe(
        "bench-ack-observer",
        gateway_port,
        false,
        filter,
        QoS::AtMostOnce,
        observed,
        |observed, p, now| {
            let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
            if let Some(next) = json["next"].as_u64() {
                observed.received.fetch_max(next, Ordering::SeqCst);
                if observed.recording.load(Ordering::Relaxed) {
                    if let Ok(mut acks) = observed.acks.lock() {
                        acks.push((now, next));
                    }
                }
            }
        },
    )
}

/// `{"value":..,"seq":N,...}` → N, without a full JSON parse.
fn seq_of(payload: &[u8]) -> Option<u32> {
    let at = payload.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits: Vec<u8> = payload[at..]
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// A QoS 1 subscriber with a persistent session at the upstream broker, counting every
/// (device, seq) it receives.
fn observe_mosquitto(
    port: u16,
    observed: Arc<Observed>,
    sends: Arc<SendTable>,
) -> anyhow::Result<Client> {
    let id = "bench-upstream-observer";
    observe(
        id,
        port,
        true,
        "sensors/#",
        QoS::AtLeastOnce,
        observed,
        move |observed, p, now| {
            observed.messages.fetch_add(1, Ordering::SeqCst);
            let device = p
                .topic
                .strip_prefix("sensors/")
                .and_then(|t| t.split('/').next())
                .map_or(u32::MAX, device_index);
            let Some(seq) = seq_of(&p.payload) else {
                return;
            };
            let mut first = false;
            if let Ok(mut per) = observed.per_device.lock() {
                let i = device as usize;
                if i < 1_000_000 && per.len() <= i {
                    per.resize(i + 1, DeviceRx::default());
                }
                if let Some(rx) = per.get_mut(i) {
                    count(rx, seq);
                    first = rx.counts[seq as usize] == 1;
                }
            }
            if !first {
                return;
            }
            observed.received.fetch_add(1, Ordering::SeqCst);
            if let Some(at) = sends.get(device, seq) {
                if let Ok(mut l) = observed.latencies_us.lock() {
                    let us = now.duration_since(at).as_micros();
                    l.push(u64::try_from(us).unwrap_or(u64::MAX));
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_found_in_a_json_reading() {
        assert_eq!(seq_of(br#"{"value":1.5,"seq":42,"boot":1}"#), Some(42));
        assert_eq!(seq_of(br#"{"value":1.5}"#), None);
    }
}

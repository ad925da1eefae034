//! A QoS 1 (or QoS 2) publisher that counts a reading as acknowledged only by the PUBACK
//! (PUBREC) carrying its own packet id: the packet id is derived from the sequence number,
//! so an ack can never be credited to the wrong reading, not even across reconnects.
//! (rumqttc re-sends requests queued before a connection failed on the next one, which
//! makes "the n-th PUBACK belongs to the n-th publish" unreliable right where a crash test
//! looks.)
//!
//! Plain MQTT 3.1.1 over a blocking socket, one thread per device, keepalive 0: after each
//! reconnect it re-sends every reading above its ack watermark (with DUP, as the
//! specification asks of a client resuming a session), and with QoS 2 the PUBREL of every
//! reading PUBREC'd but not yet PUBCOMP'd. A clean session is the default; with
//! [`PubackSpec::persistent`] the agent keeps the session, and with it the QoS 2 packet
//! ids it has seen, across reconnects and restarts.

use std::collections::{BTreeSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a [`PubackDevice`] has done so far.
#[derive(Debug, Clone, Default)]
pub struct PubackSnapshot {
    pub device: String,
    pub boot: u32,
    /// Highest sequence number sent.
    pub sent: u32,
    /// Every reading up to this one got its PUBACK.
    pub acked: u32,
    pub connects: u64,
    pub resent: u64,
    /// PUBACKs whose packet id was not the oldest one in flight (MQTT-4.6.0-2).
    pub out_of_order: u64,
    pub connected: bool,
}

pub struct PubackDevice {
    state: Arc<Mutex<PubackSnapshot>>,
    stop_new: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn packet_id(seq: u32) -> u16 {
    u16::try_from(seq % 65_535).unwrap_or(0) + 1
}

fn encode_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

fn mqtt_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(u16::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend(s);
}

fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(&mut body, b"MQTT");
    // 3.1.1, clean session or not, keepalive 0
    body.extend([4, if clean { 0x02 } else { 0x00 }, 0, 0]);
    mqtt_str(&mut body, client_id.as_bytes());
    let mut p = vec![0x10];
    encode_len(&mut p, body.len());
    p.extend(body);
    p
}

fn publish_packet(topic: &str, qos: u8, dup: bool, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_str(&mut body, topic.as_bytes());
    body.extend(pkid.to_be_bytes());
    body.extend(payload);
    let mut p = vec![0x30 | (qos << 1) | if dup { 0x08 } else { 0 }];
    encode_len(&mut p, body.len());
    p.extend(body);
    p
}

/// How a [`PubackDevice`] publishes.
#[derive(Debug, Clone)]
pub struct PubackSpec {
    pub device: String,
    pub metric: String,
    pub boot: u32,
    /// Most readings unacknowledged at once.
    pub window: u32,
    /// The last sequence number it sends.
    pub max_seq: u32,
    /// 1 (PUBACK) or 2 (PUBREC, PUBREL, PUBCOMP).
    pub qos: u8,
    /// Clean session 0: the agent keeps the session across reconnects.
    pub persistent: bool,
    /// At most one new reading per this interval (`None`: as fast as the window allows).
    pub pace: Option<Duration>,
}

impl PubackSpec {
    pub fn new(device: &str, metric: &str, boot: u32, window: u32, max_seq: u32) -> PubackSpec {
        PubackSpec {
            device: device.to_owned(),
            metric: metric.to_owned(),
            boot,
            window,
            max_seq,
            qos: 1,
            persistent: false,
            pace: None,
        }
    }
}

impl PubackDevice {
    /// Starts publishing `{"value","seq","boot"}` on `sensors/<device>/<metric>` at QoS 1
    /// with at most `window` readings unacknowledged, up to `max_seq`.
    pub fn start(
        addr: SocketAddr,
        device: &str,
        metric: &str,
        boot: u32,
        window: u32,
        max_seq: u32,
    ) -> anyhow::Result<PubackDevice> {
        PubackDevice::start_with(addr, PubackSpec::new(device, metric, boot, window, max_seq))
    }

    /// Starts a device as `spec` says.
    pub fn start_with(addr: SocketAddr, spec: PubackSpec) -> anyhow::Result<PubackDevice> {
        anyhow::ensure!(matches!(spec.qos, 1 | 2), "QoS must be 1 or 2");
        let state = Arc::new(Mutex::new(PubackSnapshot {
            device: spec.device.clone(),
            boot: spec.boot,
            ..PubackSnapshot::default()
        }));
        let stop_new = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        let name = format!("puback-{}", spec.device);
        let worker = Worker {
            addr,
            topic: format!("sensors/{}/{}", spec.device, spec.metric),
            client_id: spec.device.clone(),
            spec,
            released: Mutex::new(BTreeSet::new()),
            state: state.clone(),
            stop_new: stop_new.clone(),
            quit: quit.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run())?;
        Ok(PubackDevice {
            state,
            stop_new,
            quit,
            thread: Some(thread),
        })
    }

    pub fn snapshot(&self) -> PubackSnapshot {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// No new readings from now on (re-sends go on until everything is acknowledged).
    pub fn stop_publishing(&self) {
        self.stop_new.store(true, Ordering::SeqCst);
    }

    /// Stops the thread and closes the connection.
    pub fn shutdown(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PubackDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    addr: SocketAddr,
    topic: String,
    client_id: String,
    spec: PubackSpec,
    /// QoS 2: PUBREC'd, PUBREL sent, PUBCOMP not yet seen (sent again after a reconnect).
    released: Mutex<BTreeSet<u16>>,
    state: Arc<Mutex<PubackSnapshot>>,
    stop_new: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
}

impl Worker {
    fn lock(&self) -> std::sync::MutexGuard<'_, PubackSnapshot> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(self) {
        while !self.quit.load(Ordering::SeqCst) {
            if let Err(e) = self.session() {
                tracing_lite(&self.client_id, &e);
            }
            self.lock().connected = false;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One connection: connect, re-send what is unacknowledged, publish until it breaks.
    fn session(&self) -> std::io::Result<()> {
        let spec = &self.spec;
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
        s.set_nodelay(true)?;
        s.write_all(&connect_packet(&self.client_id, !spec.persistent))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack)?;
        if connack[0] != 0x20 || connack[3] != 0 {
            return Err(std::io::Error::other(format!("CONNACK {connack:?}")));
        }
        s.set_read_timeout(Some(Duration::from_millis(2)))?;
        let (acked, sent) = {
            let mut st = self.lock();
            st.connects += 1;
            st.connected = true;
            (st.acked, st.sent)
        };
        // In flight on this connection, oldest first; acked above the watermark.
        let mut inflight: VecDeque<u32> = VecDeque::new();
        let mut above: BTreeSet<u32> = BTreeSet::new();
        let mut out = Vec::new();
        let released: Vec<u16> = self.released_lock().iter().copied().collect();
        for pkid in released {
            out.extend([0x62, 2]);
            out.extend(pkid.to_be_bytes());
        }
        for seq in acked.saturating_add(1)..=sent {
            out.extend(self.publish(seq, true));
            inflight.push_back(seq);
        }
        self.lock().resent += u64::from(sent.saturating_sub(acked));
        let mut rbuf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut next_at = Instant::now();
        while !self.quit.load(Ordering::SeqCst) {
            // New readings while the window has room.
            {
                let mut st = self.lock();
                while !self.stop_new.load(Ordering::SeqCst)
                    && st.sent < spec.max_seq
                    && st.sent.saturating_sub(st.acked) < spec.window
                    && Instant::now() >= next_at
                {
                    st.sent += 1;
                    out.extend(self.publish(st.sent, false));
                    inflight.push_back(st.sent);
                    if let Some(pace) = spec.pace {
                        next_at = Instant::now() + pace;
                    }
                }
            }
            if !out.is_empty() {
                s.write_all(&out)?;
                out.clear();
            }
            match s.read(&mut chunk) {
                Ok(0) => return Err(std::io::Error::other("closed by the agent")),
                Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
            let mut at = 0;
            while rbuf.len() >= at + 4 {
                let kind = rbuf[at];
                if rbuf[at + 1] != 2 || !matches!(kind, 0x40 | 0x50 | 0x70) {
                    return Err(std::io::Error::other(format!(
                        "unexpected packet {kind:#04x}"
                    )));
                }
                let pkid = u16::from_be_bytes([rbuf[at + 2], rbuf[at + 3]]);
                at += 4;
                match (spec.qos, kind) {
                    (2, 0x70) => {
                        self.released_lock().remove(&pkid);
                        continue;
                    }
                    (1, 0x40) => {}
                    (2, 0x50) => {
                        // PUBREC: the reading is the agent's now; release it.
                        self.released_lock().insert(pkid);
                        out.extend([0x62, 2]);
                        out.extend(pkid.to_be_bytes());
                    }
                    _ => {
                        return Err(std::io::Error::other(format!(
                            "packet {kind:#04x} in a QoS {} flow",
                            spec.qos
                        )))
                    }
                }
                let Some(pos) = inflight.iter().position(|&q| packet_id(q) == pkid) else {
                    continue;
                };
                let mut st = self.lock();
                if pos != 0 {
                    st.out_of_order += 1;
                }
                if let Some(seq) = inflight.remove(pos) {
                    above.insert(seq);
                }
                while above.remove(&(st.acked + 1)) {
                    st.acked += 1;
                }
            }
            rbuf.drain(..at);
        }
        Ok(())
    }

    fn released_lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u16>> {
        self.released.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, seq: u32, dup: bool) -> Vec<u8> {
        let payload =
            crate::json_payload(f64::from(seq % 1000), Some(seq), Some(self.spec.boot), None);
        publish_packet(&self.topic, self.spec.qos, dup, packet_id(seq), &payload)
    }
}

/// Connection errors are expected in crash tests; keep only the first few per device.
fn tracing_lite(device: &str, e: &std::io::Error) {
    static SHOWN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 8 {
        eprintln!("[puback {device}] connection ended: {e}");
    }
}

/// Waits until every device is connected, or fails after `timeout`.
pub fn wait_connected(devices: &[PubackDevice], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !devices.iter().all(|d| d.snapshot().connected) {
        if Instant::now() >= deadline {
            anyhow::bail!("not every PUBACK device connected within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

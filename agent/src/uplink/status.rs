//! What an uplink shares with the rest of the agent: its state for `/status` and
//! `/metrics`, the acked offset the buffer deletes by, and the aggregates it relays.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::Notify;

/// Aggregates waiting to be relayed to the gateway: the newest JSON per topic.
#[derive(Default)]
pub struct AggRelay {
    state: Mutex<RelayState>,
    pub(super) changed: Notify,
}

#[derive(Default)]
struct RelayState {
    latest: HashMap<String, String>,
    dirty: VecDeque<String>,
}

impl AggRelay {
    /// Called by the writer for every aggregate it publishes locally.
    pub fn offer(&self, topic: &str, json: &str) {
        if let Ok(mut s) = self.state.lock() {
            if s.latest.insert(topic.to_owned(), json.to_owned()).is_none()
                || !s.dirty.iter().any(|t| t == topic)
            {
                s.dirty.push_back(topic.to_owned());
            }
        }
        self.changed.notify_one();
    }

    /// Every aggregate, for a fresh connection (the gateway may have missed some).
    pub(super) fn all(&self) -> Vec<(String, String)> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |mut s| {
                s.dirty.clear();
                s.latest
                    .iter()
                    .map(|(t, j)| (t.clone(), j.clone()))
                    .collect()
            },
        )
    }

    pub(super) fn take_dirty(&self, max: usize) -> Vec<(String, String)> {
        let Ok(mut s) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(topic) = s.dirty.pop_front() else {
                break;
            };
            if let Some(json) = s.latest.get(&topic) {
                out.push((topic, json.clone()));
            }
        }
        out
    }
}

/// The uplink's figures on `/metrics` (`fogline_uplink_*`), copied from its status.
#[derive(Default)]
pub struct Metrics {
    connected: Gauge,
    acked: Gauge,
    sent: Gauge,
    backlog: Gauge,
    in_flight: Gauge,
    connects: Gauge,
    batches: Gauge,
    bytes: Gauge,
    acks_refused: Gauge,
    acks_backwards: Gauge,
    failovers: Gauge,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        for (name, help, g) in [
            (
                "uplink_connected",
                "1 while the uplink to the gateway is connected",
                &self.connected,
            ),
            (
                "uplink_acked_offset",
                "The gateway has every reading below this offset",
                &self.acked,
            ),
            (
                "uplink_sent_offset",
                "Readings below this offset were sent",
                &self.sent,
            ),
            (
                "uplink_backlog_readings",
                "Readings the gateway does not have yet",
                &self.backlog,
            ),
            (
                "uplink_in_flight_readings",
                "Readings sent but not yet acked",
                &self.in_flight,
            ),
            (
                "uplink_connects",
                "Successful uplink connections since start",
                &self.connects,
            ),
            (
                "uplink_batches_sent",
                "Batches sent upstream since start",
                &self.batches,
            ),
            (
                "uplink_bytes_sent",
                "Batch bytes sent upstream since start",
                &self.bytes,
            ),
            (
                "uplink_acks_refused",
                "Gateway acks refused since start: not an ack, or beyond everything this log holds",
                &self.acks_refused,
            ),
            (
                "uplink_acks_backwards",
                "Gateway acks below an earlier ack since start (ignored)",
                &self.acks_backwards,
            ),
            (
                "uplink_failovers",
                "Moves to the next gateway of uplink.gateway after a failed session, since start",
                &self.failovers,
            ),
        ] {
            r.register(name, help, g.clone());
        }
    }

    /// Copies the uplink's state into its gauges.
    pub fn set(&self, u: &UplinkStatus) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.connected.set(i64::from(u.link == "connected"));
        self.acked.set(g(u.acked));
        self.sent.set(g(u.sent));
        self.backlog.set(g(u.backlog()));
        self.in_flight.set(g(u.in_flight()));
        self.connects.set(g(u.connects));
        self.batches.set(g(u.batches_sent));
        self.bytes.set(g(u.bytes_sent));
        self.acks_refused.set(g(u.acks_refused));
        self.acks_backwards.set(g(u.acks_backwards));
        self.failovers.set(g(u.failovers));
    }
}

/// The uplink's state, for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct UplinkStatus {
    /// The destination connected to or tried next.
    pub gateway: String,
    /// Every destination, in the order they are tried.
    pub gateways: Vec<String>,
    /// Moves to the next destination after a failed session.
    pub failovers: u64,
    /// "off", "connecting", "connected" or "backoff".
    pub link: &'static str,
    /// The gateway has every reading below this offset.
    pub acked: u64,
    /// Sent up to here (not yet acked above `acked`).
    pub sent: u64,
    /// First offset not yet committed locally.
    pub head: u64,
    pub connects: u64,
    pub batches_sent: u64,
    pub bytes_sent: u64,
    /// Acks refused: impossible (beyond this log) or not an ack at all.
    pub acks_refused: u64,
    /// Acks below what the destination acked before (ignored).
    pub acks_backwards: u64,
    pub last_error: Option<String>,
}

impl UplinkStatus {
    pub fn backlog(&self) -> u64 {
        self.head.saturating_sub(self.acked)
    }

    pub fn in_flight(&self) -> u64 {
        self.sent.saturating_sub(self.acked)
    }
}

/// Shared between the uplink task, the writer (which deletes what the gateway acked) and
/// the HTTP handlers.
#[derive(Default)]
pub struct Shared {
    pub status: Mutex<UplinkStatus>,
    /// The gateway's durable ack, for the writer.
    pub acked: AtomicU64,
    pub relay: AggRelay,
}

impl Shared {
    pub(super) fn update(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    pub fn snapshot(&self) -> UplinkStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_keeps_the_newest_value_per_topic_once() {
        let r = AggRelay::default();
        r.offer("agg/d/t/10s", "1");
        r.offer("agg/d/t/10s", "2");
        r.offer("agg/d/t/60s", "3");
        let dirty = r.take_dirty(10);
        assert_eq!(
            dirty,
            vec![
                ("agg/d/t/10s".to_owned(), "2".to_owned()),
                ("agg/d/t/60s".to_owned(), "3".to_owned())
            ]
        );
        assert!(r.take_dirty(10).is_empty());
        assert_eq!(r.all().len(), 2);
    }
}

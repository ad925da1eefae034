//! The readings path, before the buffer: a publish on `sensors/<device>/<metric>` is
//! validated ([`parse`](mod@parse)), held to the device's limits ([`limits`]) and queued for the
//! writer with the ack cursor of its connection ([`queue`]); refusals are counted and
//! logged ([`reject_log`], [`Metrics`]).

pub mod config;
pub mod limits;
pub mod parse;
pub mod queue;
pub mod reject_log;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::labels::Reason;

pub use config::IngestConfig;
pub use parse::{
    parse, parse_topic, DeviceTime, Incoming, Reject, MAX_CLOCK_AHEAD_MS, SENSOR_FILTER,
    SENSOR_PREFIX,
};
pub use queue::{Commits, Done, Outcome, Queued};
pub use reject_log::RejectLog;

/// What the readings path counts (`fogline_ingest_*`). `accepted` and `duplicates` are
/// counted by the writer, which decides them.
#[derive(Default)]
pub struct Metrics {
    pub received: Counter,
    pub accepted: Counter,
    pub duplicates: Counter,
    pub clock_ahead: Counter,
    pub rejected: Family<Reason, Counter>,
    pub queue_full: Counter,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        for reject in Reject::ALL {
            let _ = self.rejected.get_or_create(&Reason {
                reason: reject.as_str(),
            });
        }
        r.register(
            "ingest_received",
            "Publishes seen on sensors/#",
            self.received.clone(),
        );
        r.register(
            "ingest_accepted",
            "Readings committed to the buffer (duplicates excluded)",
            self.accepted.clone(),
        );
        r.register(
            "ingest_duplicates",
            "Re-sent readings that were already stored and were not stored again",
            self.duplicates.clone(),
        );
        r.register(
            "ingest_clock_ahead",
            "Readings whose device time was more than 10 minutes ahead of the agent's clock: \
             stored with their arrival time",
            self.clock_ahead.clone(),
        );
        r.register(
            "ingest_rejected",
            "Publishes refused, by reason",
            self.rejected.clone(),
        );
        r.register(
            "ingest_queue_full",
            "Times the ingest queue was full and the broker had to wait",
            self.queue_full.clone(),
        );
    }

    pub fn reject(&self, reason: Reject) {
        self.rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn rejected_total(&self) -> u64 {
        Reject::ALL
            .iter()
            .map(|r| {
                self.rejected
                    .get_or_create(&Reason { reason: r.as_str() })
                    .get()
            })
            .sum()
    }
}

/// The readings path: from a connection straight to the writer's queue.
pub struct Ingest {
    queue: Mutex<Option<flume::Sender<Queued>>>,
    limiter: Mutex<limits::Limiter>,
    rejects: Mutex<RejectLog>,
    metrics: Arc<Metrics>,
    max_payload: usize,
}

/// What became of a reading handed to [`Ingest::offer`].
pub enum Offered {
    Queued,
    Rejected(Reject),
    /// The agent is stopping: no PUBACK, the client re-sends.
    Closed,
}

impl Ingest {
    pub fn new(
        queue: flume::Sender<Queued>,
        limits: limits::LimitsConfig,
        reject_log: Duration,
        metrics: Arc<Metrics>,
        max_payload: usize,
    ) -> Ingest {
        Ingest {
            queue: Mutex::new(Some(queue)),
            limiter: Mutex::new(limits::Limiter::new(limits)),
            rejects: Mutex::new(RejectLog::new(reject_log)),
            metrics,
            max_payload,
        }
    }

    /// Validates a publish on `sensors/…` and queues the reading, waiting (without holding
    /// a thread) when the writer is behind.
    pub async fn offer(&self, topic: &[u8], payload: &[u8], done: Option<Done>) -> Offered {
        self.metrics.received.inc();
        let parsed = parse(topic, payload, self.max_payload, crate::now_ms()).and_then(|r| {
            let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            limiter.admit(&r.device, Instant::now()).map(|()| r)
        });
        let reading = match parsed {
            Ok(r) => {
                if matches!(r.time, DeviceTime::Ahead(_)) {
                    self.metrics.clock_ahead.inc();
                }
                r
            }
            Err(reason) => {
                self.metrics.reject(reason);
                if let Ok(mut log) = self.rejects.lock() {
                    log.log(
                        reason,
                        &String::from_utf8_lossy(&topic[..topic.len().min(120)]),
                    );
                }
                return Offered::Rejected(reason);
            }
        };
        let Some(queue) = self.queue.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Offered::Closed;
        };
        let item = Queued { reading, done };
        match queue.try_send(item) {
            Ok(()) => Offered::Queued,
            Err(flume::TrySendError::Full(item)) => {
                self.metrics.queue_full.inc();
                // Boxed: only a connection that has to wait pays for the wait's state
                // (with a thousand publishers, a thousand of them wait at saturation).
                if Box::pin(queue.send_async(item)).await.is_ok() {
                    Offered::Queued
                } else {
                    Offered::Closed
                }
            }
            Err(flume::TrySendError::Disconnected(_)) => Offered::Closed,
        }
    }

    /// No more readings: the writer drains its queue and stops.
    /// Takes no readings at all: a front end that serves no devices (the gateway's).
    pub fn none() -> Ingest {
        Ingest {
            queue: Mutex::new(None),
            limiter: Mutex::new(limits::Limiter::new(limits::LimitsConfig::default())),
            rejects: Mutex::new(RejectLog::new(Duration::from_secs(10))),
            metrics: Arc::new(Metrics::default()),
            max_payload: 0,
        }
    }

    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

//! The writer thread: takes validated readings off the ingest queue, commits them in
//! batches (group commit: one fsync per batch, bounded by size and delay), publishes the
//! end-to-end acks after each commit (through the replicated-ack [`gate`] when acks wait
//! for replication), publishes changed aggregates, and keeps the buffer within its
//! capacity. When the queue closes it commits what is left, writes the window
//! checkpoint and publishes the last aggregates, so a clean stop loses nothing.

pub mod gate;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flume::{Receiver, RecvTimeoutError};
use fogline_firmware::wire::{self, Ack};
use tokio::sync::watch;

use crate::buffer::{Buffer, BufferError, Meta};
use crate::ingest::{Incoming, Outcome, Queued};
use crate::mqtt::Publisher;
use crate::uplink;
use gate::{Gate, Owed};
pub use metrics::Metrics;

/// How often the changed windows are written to disk (with the next commit).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often the writer looks for replication progress while acks wait for it.
const REPLICATION_POLL: Duration = Duration::from_millis(2);

/// What the writer is told by the configuration.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Readings per commit at most (`buffer.batch_max_readings`).
    pub batch_max: usize,
    /// Waiting for more readings after the first (`buffer.batch_max_delay_ms`).
    pub batch_delay: Duration,
    /// Changed aggregates are published at most this often.
    pub publish_every: Duration,
    pub quantiles: Vec<f64>,
    /// Refused readings are logged at most once per reason in this long.
    pub reject_log_every: Duration,
    /// Readings the gateway has stay this long (`uplink.retention_secs`).
    pub retention: Duration,
    pub capacity_bytes: u64,
}

/// What the writer shares with the uplink and the site.
#[derive(Default)]
pub struct Links {
    /// Where the gateway's ack of this agent's log shows up.
    pub gateway: Option<Arc<uplink::Shared>>,
    /// Every new aggregate is offered to each of these (the uplink, replication).
    pub relays: Vec<Arc<uplink::Shared>>,
    /// With `ack_after = "replicated"`: given the local head, the offset below which this
    /// agent's log is durable on enough agents. Device acks wait for it.
    pub insync: Option<Box<dyn Fn(u64) -> u64 + Send>>,
}

/// What `/status` shows about the buffer, refreshed after every commit.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BufferStatus {
    pub meta: Meta,
    pub devices: usize,
    pub open_windows: usize,
    pub capacity_bytes: u64,
}

/// The running writer thread.
pub struct WriterHandle {
    thread: std::thread::JoinHandle<()>,
}

impl WriterHandle {
    /// Waits until the writer is done: it ends once its queue has closed (the front end
    /// stopped taking readings) and everything taken from it is committed.
    pub async fn stop(self) {
        let joined = tokio::task::spawn_blocking(move || self.thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("the writer thread panicked");
        }
    }
}

/// Everything the writer works with.
pub struct WriterParts {
    pub config: WriterConfig,
    pub buffer: Buffer,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    pub ingest_metrics: Arc<crate::ingest::Metrics>,
    pub status: Arc<Mutex<BufferStatus>>,
    /// The first uncommitted offset, for the uplink and the site.
    pub head: watch::Sender<u64>,
    pub links: Links,
}

/// Starts the writer on its own thread (redb is synchronous and a commit is an fsync: it
/// must not sit on an async worker), reading `queue` until it closes.
pub fn spawn(parts: WriterParts, queue: Receiver<Queued>) -> std::io::Result<WriterHandle> {
    let writer = Writer::new(parts);
    let thread = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || writer.run(queue))?;
    Ok(WriterHandle { thread })
}

struct Writer {
    buffer: Buffer,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    ingest_metrics: Arc<crate::ingest::Metrics>,
    status: Arc<Mutex<BufferStatus>>,
    batch_max: usize,
    batch_delay: Duration,
    publish_every: Duration,
    quantiles: Vec<f64>,
    last_error_log: Option<Instant>,
    /// Readings the writer refused (dedup limits), logged at most once per reason per
    /// `ingest.reject_log_interval_ms`.
    refusals: crate::ingest::RejectLog,
    /// The first uncommitted offset, for the uplink.
    head: watch::Sender<u64>,
    links: Links,
    /// What commits owe while they wait for replication.
    gate: Gate,
    retention: Duration,
    /// (when, gateway ack) samples; blocks below an ack older than `retention` go.
    acks_seen: std::collections::VecDeque<(Instant, u64)>,
}

impl Writer {
    fn new(parts: WriterParts) -> Writer {
        let WriterParts {
            config,
            buffer,
            publisher,
            metrics,
            ingest_metrics,
            status,
            head,
            links,
        } = parts;
        let w = Writer {
            buffer,
            publisher,
            metrics,
            ingest_metrics,
            status,
            batch_max: config.batch_max,
            batch_delay: config.batch_delay,
            publish_every: config.publish_every,
            quantiles: config.quantiles.clone(),
            last_error_log: None,
            refusals: crate::ingest::RejectLog::new(config.reject_log_every),
            head,
            links,
            gate: Gate::default(),
            retention: config.retention,
            acks_seen: std::collections::VecDeque::new(),
        };
        w.metrics
            .buffer_capacity
            .set(i64::try_from(config.capacity_bytes).unwrap_or(i64::MAX));
        w.refresh_status();
        w
    }

    /// Runs until `queue` closes and everything taken from it is committed.
    fn run(mut self, mut queue: Receiver<Queued>) {
        let mut last_publish = Instant::now();
        let mut last_checkpoint = Instant::now();
        // Publish what was restored or replayed at start-up.
        self.publish_aggregates();
        loop {
            let wait = if self.gate.is_empty() {
                self.publish_every.min(CHECKPOINT_EVERY)
            } else {
                REPLICATION_POLL
            };
            let first = match queue.recv_timeout(wait) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Some(first) = first {
                let t0 = Instant::now();
                let batch =
                    crate::batch::collect(first, self.batch_max, self.batch_delay, &mut queue);
                let t1 = Instant::now();
                let n = batch.len();
                self.commit(batch);
                tracing::trace!(
                    readings = n,
                    collect_us = (t1 - t0).as_micros() as u64,
                    commit_us = t1.elapsed().as_micros() as u64,
                    "batch"
                );
            }
            self.flush_acks();
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                self.buffer.request_checkpoint();
                self.delete_delivered();
                last_checkpoint = Instant::now();
            }
            if last_publish.elapsed() >= self.publish_every {
                self.publish_aggregates();
                last_publish = Instant::now();
            }
        }
        if let Err(e) = self.buffer.checkpoint() {
            tracing::error!("final window checkpoint failed: {e}");
        }
        self.publish_aggregates();
        self.refresh_status();
        tracing::info!(
            next_offset = self.buffer.meta().next_offset,
            "buffer closed cleanly"
        );
    }

    fn commit(&mut self, batch: Vec<Queued>) {
        let n = batch.len() as u64;
        let mut dones = Vec::new();
        let batch: Vec<Incoming> = batch
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                dones.extend(q.done.map(|d| (i, d)));
                q.reading
            })
            .collect();
        let t0 = Instant::now();
        let result = match self.buffer.commit(&batch) {
            Err(e) if e.is_disk_full() => {
                self.log_error(&e, n);
                match self.buffer.free_disk() {
                    Ok(room) => self.metrics.drop_readings("disk_full", room.dropped),
                    Err(e) => tracing::error!("could not free disk space: {e}"),
                }
                self.buffer.commit(&batch)
            }
            Err(e) if e.needs_reopen() => {
                self.log_error(&e, n);
                if let Err(e) = self.buffer.reopen() {
                    tracing::error!("could not reopen the buffer: {e}");
                }
                self.buffer.commit(&batch)
            }
            other => other,
        };
        match result {
            Ok(done) => {
                if done.accepted > 0 {
                    self.metrics.commits.inc();
                }
                self.ingest_metrics.accepted.inc_by(done.accepted);
                self.ingest_metrics.duplicates.inc_by(done.duplicates);
                self.metrics.aggregates_too_late.inc_by(done.too_late);
                for &(i, why) in &done.refused {
                    self.ingest_metrics.reject(why);
                    self.refusals
                        .log(why, batch.get(i).map_or("", |r| r.device.as_str()));
                }
                let t1 = Instant::now();
                let acks = done.acks.len();
                let refused: HashMap<usize, crate::ingest::Reject> =
                    done.refused.iter().copied().collect();
                let outcomes = dones
                    .into_iter()
                    .map(|(i, done)| Outcome {
                        done,
                        refused: refused.get(&i).copied(),
                    })
                    .collect();
                self.ack(done.acks, outcomes);
                tracing::trace!(
                    readings = n,
                    acks,
                    store_us = (t1 - t0).as_micros() as u64,
                    ack_us = t1.elapsed().as_micros() as u64,
                    "committed"
                );
            }
            Err(e) => {
                self.metrics.commit_failures.inc();
                self.log_error(&e, n);
                dones.iter().for_each(|(_, d)| d.fail());
            }
        }
        match self.buffer.keep_disk_free() {
            Ok(dropped) => self.metrics.drop_readings("disk_full", dropped),
            Err(e) => self.log_error(&e, 0),
        }
        match self.buffer.make_room() {
            Ok(room) => {
                self.metrics.downsampled.inc_by(room.downsampled);
                self.metrics.drop_readings("capacity", room.dropped);
                if room.dropped > 0 {
                    tracing::warn!(
                        dropped = room.dropped,
                        "buffer full: dropped the oldest readings"
                    );
                }
            }
            Err(e) => self.log_error(&e, 0),
        }
        self.refresh_status();
    }

    /// Sends device acks and PUBACKs now, or queues them until replication catches up.
    /// Refusals wait with the acks of their batch: telling a connection about a later
    /// reading raises its cursor past the earlier ones still waiting.
    fn ack(&mut self, acks: Vec<(String, Ack)>, dones: Vec<Outcome>) {
        if acks.is_empty() && dones.is_empty() {
            return;
        }
        if self.links.insync.is_none() {
            // Acks first: a connection woken for its PUBACKs then finds its device's ack
            // queued too, and writes both at once.
            self.publish_acks(acks);
            dones.iter().for_each(Outcome::release);
            return;
        }
        let end = self.buffer.meta().next_offset;
        self.gate.hold(
            end,
            Owed {
                acks: acks.into_iter().collect(),
                outcomes: dones,
            },
        );
        self.flush_acks();
    }

    /// Publishes the acks whose readings are now durable on enough agents.
    fn flush_acks(&mut self) {
        let Some(insync) = &self.links.insync else {
            return;
        };
        if self.gate.is_empty() {
            return;
        }
        let released = self.gate.release(insync(self.buffer.meta().next_offset));
        self.publish_acks(released.acks);
        released.outcomes.iter().for_each(Outcome::release);
    }

    /// Publishes the acks of a commit in one hand-over to the router.
    fn publish_acks(&mut self, acks: impl IntoIterator<Item = (String, Ack)>) {
        let messages: Vec<(String, String)> = acks
            .into_iter()
            .filter_map(|(device, ack)| {
                let mut buf = [0u8; wire::MAX_ACK_LEN];
                let payload = ack.encode(&mut buf).ok()?;
                let payload = std::str::from_utf8(payload).ok()?.to_owned();
                Some((format!("{}{device}", wire::ACK_TOPIC_PREFIX), payload))
            })
            .collect();
        let n = messages.len() as u64;
        match self.publisher.retained_all(messages) {
            Ok(()) => {
                self.metrics.acks_published.inc_by(n);
            }
            Err(e) => tracing::warn!("could not publish {n} device acks: {e}"),
        }
    }

    /// Takes the gateway's ack and deletes what it covers once the retention has passed.
    fn delete_delivered(&mut self) {
        let Some(up) = &self.links.gateway else {
            return;
        };
        let acked = up.acked.load(std::sync::atomic::Ordering::SeqCst);
        self.buffer.set_uplink_acked(acked);
        let now = Instant::now();
        if self.acks_seen.back().is_none_or(|&(_, a)| a < acked) {
            self.acks_seen.push_back((now, acked));
        }
        let mut upto = None;
        while let Some(&(at, a)) = self.acks_seen.front() {
            if now.duration_since(at) < self.retention {
                break;
            }
            upto = Some(a);
            self.acks_seen.pop_front();
        }
        if let Some(upto) = upto {
            match self.buffer.delete_delivered(upto) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(readings = n, "deleted readings the gateway has"),
                Err(e) => self.log_error(&e, 0),
            }
            self.refresh_status();
        }
    }

    fn log_error(&mut self, e: &BufferError, readings: u64) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(5))
        {
            return;
        }
        self.last_error_log = Some(now);
        tracing::error!(
            readings,
            "buffer write failed; the batch is not acknowledged and devices will re-send: {e}"
        );
    }

    fn publish_aggregates(&mut self) {
        // A few hundred at a time: a second's aggregates of a thousand devices, rendered
        // at once, would hold thousands of JSON documents in memory.
        const CHUNK: usize = 256;
        let changed = self.buffer.changed_windows();
        for keys in changed.chunks(CHUNK) {
            let aggregates: Vec<(String, String)> = keys
                .iter()
                .filter_map(|k| self.buffer.aggregate(k, &self.quantiles))
                .collect();
            for (topic, json) in &aggregates {
                for relay in &self.links.relays {
                    relay.relay.offer(topic, json);
                }
            }
            let n = aggregates.len() as u64;
            match self.publisher.retained_all(aggregates) {
                Ok(()) => {
                    self.metrics.aggregates_published.inc_by(n);
                }
                Err(e) => tracing::warn!("could not publish {n} aggregates: {e}"),
            }
        }
        self.buffer.evict_windows();
    }

    fn refresh_status(&self) {
        let meta = self.buffer.meta();
        self.head.send_replace(meta.next_offset);
        let m = &self.metrics;
        m.buffer_bytes
            .set(i64::try_from(meta.total_bytes()).unwrap_or(i64::MAX));
        m.buffer_readings
            .set(i64::try_from(meta.raw_readings).unwrap_or(i64::MAX));
        m.devices
            .set(i64::try_from(self.buffer.devices()).unwrap_or(i64::MAX));
        if let Ok(mut s) = self.status.lock() {
            s.meta = meta;
            s.devices = self.buffer.devices();
            s.open_windows = self.buffer.open_windows();
            s.capacity_bytes = u64::try_from(m.buffer_capacity.get()).unwrap_or(0);
        }
    }
}

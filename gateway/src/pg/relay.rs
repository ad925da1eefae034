//! Other gateways' aggregates, republished here: `LISTEN fogline_aggregates`.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_agent::mqtt::Publisher;
use fogline_agent::shipping::store::StoreError;
use postgres::fallible_iterator::FallibleIterator;

use super::{all_aggregates, connect, db, CHANNEL};

/// A running relay of other gateways' aggregates.
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Relay {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the aggregate relay thread panicked");
        }
    }
}

/// Listens for the aggregates other gateways commit and republishes them retained here.
/// On every (re)connection it republishes them all, in case notifications were missed.
pub fn spawn_relay(
    url: String,
    own_pid: Arc<AtomicI32>,
    mut publisher: Publisher,
) -> std::io::Result<Relay> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("pg-relay".into())
        .spawn(move || {
            let mut delay = Duration::from_millis(100);
            while !stopping.load(Ordering::Relaxed) {
                match relay_session(&url, &own_pid, &mut publisher, &stopping) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(
                            retry_in_ms = delay.as_millis() as u64,
                            "aggregate relay: {e}"
                        );
                        let until = Instant::now() + delay;
                        while Instant::now() < until && !stopping.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        })?;
    Ok(Relay { stop, thread })
}

fn relay_session(
    url: &str,
    own_pid: &AtomicI32,
    publisher: &mut Publisher,
    stop: &AtomicBool,
) -> Result<(), StoreError> {
    // `listen` holds the LISTEN; `client` reads the aggregates it names.
    let mut listen = connect(url)?;
    listen
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(db)?;
    let mut client = connect(url)?;
    let all = all_aggregates(&mut client)?;
    let _ = publisher.retained_all(all);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut topics: Vec<String> = Vec::new();
        {
            let mut notifications = listen.notifications();
            let mut iter = notifications.timeout_iter(Duration::from_millis(250));
            while let Some(n) = iter.next().map_err(db)? {
                if n.process_id() != own_pid.load(Ordering::Relaxed) {
                    topics.push(n.payload().to_owned());
                }
                if topics.len() >= 1000 {
                    break;
                }
            }
        }
        if listen.is_closed() {
            return Err(StoreError::Database("the LISTEN connection closed".into()));
        }
        if topics.is_empty() {
            continue;
        }
        topics.sort();
        topics.dedup();
        let rows = client
            .query(
                "SELECT topic, body FROM fogline.aggregates_latest WHERE topic = ANY($1)",
                &[&topics],
            )
            .map_err(db)?;
        let messages: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        tracing::debug!(
            aggregates = messages.len(),
            "republishing other gateways' aggregates"
        );
        let _ = publisher.retained_all(messages);
    }
}

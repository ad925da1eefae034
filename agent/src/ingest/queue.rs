//! The queue between the connections and the writer: a reading with the cursor of the
//! connection that waits for its acknowledgement ([`Commits`], [`Done`]), and what the
//! writer tells it ([`Outcome`]).

use super::parse::{Incoming, Reject};

/// A reading on its way to the writer, with whom to tell once it is durable.
#[derive(Debug)]
pub struct Queued {
    pub reading: Incoming,
    pub done: Option<Done>,
}

impl From<Incoming> for Queued {
    fn from(reading: Incoming) -> Self {
        Queued {
            reading,
            done: None,
        }
    }
}

/// One MQTT connection's durable-ack cursor: the writer raises `committed` to the token
/// of each reading once it is durable (and replicated, when acks wait for that), or once
/// it is refused, in the order the connection queued them. A refused token is recorded
/// before the cursor passes it, so the connection never takes it for stored.
#[derive(Debug, Default)]
pub struct Commits {
    committed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicBool,
    refused: std::sync::Mutex<std::collections::BTreeMap<u64, Reject>>,
    pub notify: tokio::sync::Notify,
}

impl Commits {
    pub fn committed(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A batch with one of this connection's readings could not be stored: its PUBACK
    /// must never be sent, so the connection is closed and the client re-sends.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why reading `token` was refused by the writer, if it was (asked once, when its
    /// turn to be acknowledged has come).
    pub fn take_refusal(&self, token: u64) -> Option<Reject> {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        // Older entries belong to acks already sent.
        while refused.first_key_value().is_some_and(|(&t, _)| t < token) {
            refused.pop_first();
        }
        refused.remove(&token)
    }
}

/// "Reading number `token` of this connection."
#[derive(Debug, Clone)]
pub struct Done {
    pub commits: std::sync::Arc<Commits>,
    pub token: u64,
}

impl Done {
    pub fn durable(&self) {
        self.commits
            .committed
            .fetch_max(self.token, std::sync::atomic::Ordering::SeqCst);
        self.commits.notify.notify_one();
    }

    /// The writer did not store it (see [`Reject::is_temporary`]): never acknowledged as
    /// stored.
    pub fn refuse(&self, why: Reject) {
        self.commits
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.token, why);
        self.durable();
    }

    pub fn fail(&self) {
        self.commits
            .failed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.commits.notify.notify_one();
    }
}

/// What became of a reading at the writer, told to its connection in order.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub done: Done,
    /// `None`: durable (as the ack it waits for requires).
    pub refused: Option<Reject>,
}

impl Outcome {
    pub fn release(&self) {
        match self.refused {
            Some(why) => self.done.refuse(why),
            None => self.done.durable(),
        }
    }
}

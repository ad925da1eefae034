//! The receivers' queue: bounded in messages and in bytes, so a flood of large batches
//! from peers cannot take the memory of a small device. One message always fits.

use std::sync::mpsc::{Receiver as ChannelRx, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One publish on the scheme's topics.
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The bytes of the messages in a queue, held under a maximum: a batch is up to
/// `cluster.max_batch_bytes`, and a queue counted in messages alone could hold a
/// thousand of them.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Budget {
    /// Waits until `n` more bytes fit (one message always fits an empty queue), unless
    /// `wait` is false; true when taken.
    fn take(&self, n: usize, wait: bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > self.max {
            if !wait {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += n;
        true
    }

    fn give(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// The sending end of a receiver's queue.
#[derive(Clone)]
pub struct QueueTx {
    tx: SyncSender<Message>,
    budget: Arc<Budget>,
}

/// The receiving end: [`Receiver::run`](super::receiver::Receiver::run) takes it.
pub struct QueueRx {
    rx: ChannelRx<Message>,
    budget: Arc<Budget>,
}

/// A queue of at most `messages` messages and about `bytes` bytes of payload.
pub fn queue(messages: usize, bytes: usize) -> (QueueTx, QueueRx) {
    let (tx, rx) = std::sync::mpsc::sync_channel(messages);
    let budget = Arc::new(Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
        max: bytes,
    });
    (
        QueueTx {
            tx,
            budget: budget.clone(),
        },
        QueueRx { rx, budget },
    )
}

impl QueueRx {
    /// The next message, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Message, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// Messages of `bytes` bytes were handled: their room is free again.
    pub fn handled(&self, bytes: usize) {
        self.budget.give(bytes);
    }
}

impl crate::batch::Source<Message> for QueueRx {
    fn next(&mut self, wait: Option<Duration>) -> Option<Message> {
        match wait {
            None => self.rx.try_recv().ok(),
            Some(d) => self.rx.recv_timeout(d).ok(),
        }
    }
}

impl QueueTx {
    /// Queues `m`, waiting while the queue is full; false once the receiver is gone.
    pub fn send(&self, m: Message) -> bool {
        let n = m.payload.len();
        self.budget.take(n, true);
        if self.tx.send(m).is_err() {
            self.budget.give(n);
            return false;
        }
        true
    }

    /// Queues `m` if there is room now.
    pub fn try_send(&self, m: Message) -> bool {
        let n = m.payload.len();
        if !self.budget.take(n, false) {
            return false;
        }
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.budget.give(n);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Message {
        Message {
            topic: "t".into(),
            payload: vec![0; n],
        }
    }

    #[test]
    fn a_queue_holds_about_its_bytes_and_one_message_always_fits() {
        let (tx, rx) = queue(100, 1000);
        assert!(tx.try_send(msg(600)));
        assert!(!tx.try_send(msg(600)), "over the byte budget");
        assert!(tx.try_send(msg(300)));
        assert!(rx.recv(Duration::ZERO).is_ok());
        rx.handled(600);
        assert!(tx.try_send(msg(600)), "room again");
        let (tx, _rx) = queue(100, 1000);
        assert!(
            tx.try_send(msg(5000)),
            "a lone message larger than the budget passes"
        );
        assert!(!tx.try_send(msg(1)));
    }
}

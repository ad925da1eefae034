//! The one way components are told to stop: a [`Trigger`] fired once, and a [`Shutdown`]
//! each component holds — awaited by tasks, polled by threads. A component stops what
//! it does, hands on what it holds, and its handle's `stop` returns when it is done;
//! the agent stops them in order, from the edges inwards, so that nothing accepted is
//! dropped (the writer stops last, when its queue has closed and drained).

use tokio::sync::watch;

/// Fires the shutdown of every [`Shutdown`] made from it.
pub struct Trigger(watch::Sender<bool>);

/// A component's view of the shutdown.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and the shutdown it fires.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A shutdown of this trigger's.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Has it fired?
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once it fired (at once if it has).
    pub async fn fired(&mut self) {
        let _ = self.0.wait_for(|f| *f).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_holder_sees_the_shutdown_once_it_fires() {
        let (trigger, mut a) = channel();
        let mut b = trigger.subscribe();
        assert!(!a.is_fired());
        trigger.fire();
        a.fired().await;
        b.fired().await;
        assert!(a.is_fired() && b.is_fired());
        // A late holder sees it too.
        let mut c = trigger.subscribe();
        c.fired().await;
    }
}

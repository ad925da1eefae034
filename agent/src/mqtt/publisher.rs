//! [`Publisher`]: the agent's own retained messages (acks, aggregates, site traffic) into
//! the router, from a plain thread (the writer, a receiver). Behind the front end, the
//! agent's `fogline/ack/…` messages are served by the front end itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::protocol::{Packet, Publish};

use crate::router::{BrokerError, LinkTx};

/// Publishes retained messages into the broker from a plain thread.
pub struct Publisher {
    tx: LinkTx,
    rt: tokio::runtime::Handle,
    /// The agent's front end, which serves `fogline/ack/…` itself.
    local: Option<Arc<super::Server>>,
}

impl Publisher {
    /// Publishes `payload` on `topic`, retained, at QoS 0 to the router.
    pub fn retained(&mut self, topic: String, payload: String) -> Result<(), BrokerError> {
        let packet = self.packet(topic, payload);
        self.rt.block_on(self.tx.send(packet))?;
        Ok(())
    }

    /// A retained message of the agent's own. Behind the agent's front end it carries a
    /// tag (QoS 1, retained, an id), as client publishes do; rumqttd's own listeners (the
    /// gateway) get it plain.
    fn packet(&self, topic: String, payload: String) -> Packet {
        let props = self.local.as_ref().map(|_| {
            super::topic::Tag {
                retain: true,
                ..super::topic::Tag::internal(crate::now_ms())
            }
            .attach(None)
        });
        Packet::Publish(Publish::new(topic, payload, true), props)
    }

    /// Publishes many retained messages with one wake-up of the router (each
    /// [`Publisher::retained`] wakes it, which at a thousand acks per commit costs more
    /// than the messages).
    pub fn retained_all(&mut self, messages: Vec<(String, String)>) -> Result<(), BrokerError> {
        let mut messages = messages;
        if let Some(server) = &self.local {
            let (local, other): (Vec<_>, Vec<_>) = messages
                .into_iter()
                .partition(|(t, _)| t.starts_with(super::LOCAL_PREFIX));
            let wildcards = server.publish_local(&local);
            messages = other;
            if wildcards {
                messages.extend(local);
            }
        }
        // The writer thread calls this between commits: it waits for the router at most
        // this long per call, then hands over regardless (memory over acks).
        let until = Instant::now() + HANDOVER_WAIT;
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let mut packets: Vec<Packet> = messages
                .by_ref()
                .take(HANDOVER_CHUNK)
                .map(|(topic, payload)| self.packet(topic, payload))
                .collect();
            let Some(last) = packets.pop() else {
                break;
            };
            self.wait_handed_over(until);
            self.tx.buffer().extend(packets);
            self.rt.block_on(self.tx.send(last))?;
        }
        Ok(())
    }

    /// Waits, until `until` at most, for the router to take what the link holds.
    fn wait_handed_over(&self, until: Instant) {
        while !self.tx.buffer().is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Messages are handed to the router at most this many at a time. The link's buffer is a
/// queue of rumqttd packets (hundreds of bytes each) that the router swaps with its own and
/// neither ever shrinks: a second's aggregates of a thousand devices handed over at once
/// kept two 4 MiB queues for the rest of the agent's life.
const HANDOVER_CHUNK: usize = 256;
const HANDOVER_WAIT: Duration = Duration::from_millis(20);

impl Publisher {
    /// A publisher through link `tx`, to rumqttd's own listeners (the gateway).
    pub fn new(tx: LinkTx) -> Publisher {
        Publisher {
            tx,
            rt: tokio::runtime::Handle::current(),
            local: None,
        }
    }

    /// A publisher behind the agent's front end.
    pub fn behind(tx: LinkTx, server: Arc<super::Server>) -> Publisher {
        Publisher {
            local: Some(server),
            ..Publisher::new(tx)
        }
    }
}

//! The node's [`Publisher`] over an async MQTT client.
//!
//! [`Node::flush`](fogline_firmware::node::Node::flush) is synchronous: it hands frames to
//! a publisher and expects an answer at once. An async client (minimq on embassy-net)
//! cannot send inside that call, so the node publishes into this small outbox, and the
//! session sends what it holds with the client, oldest first. A full outbox refuses the
//! next frame, which the node treats as "try this reading again at the next flush": the
//! outbox is the backpressure between the two. Frames still here when the connection
//! drops are simply discarded ([`Outbox::clear`]): the node re-sends everything above the
//! agent's watermark after the next connect anyway.

use fogline_firmware::node::Publisher;
use fogline_firmware::wire::{Topic, MAX_FRAME_LEN};

/// One publish waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// `sensors/<device>/<metric>`.
    pub topic: Topic,
    /// The wire frame.
    pub payload: heapless::Vec<u8, MAX_FRAME_LEN>,
}

/// The outbox refused a frame: it already holds its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxFull;

/// Up to `N` frames between the node and the MQTT client.
#[derive(Debug, Default)]
pub struct Outbox<const N: usize> {
    frames: heapless::Deque<Frame, N>,
}

impl<const N: usize> Outbox<N> {
    /// An empty outbox.
    pub const fn new() -> Self {
        Outbox {
            frames: heapless::Deque::new(),
        }
    }

    /// The oldest frame, to send next.
    pub fn front(&self) -> Option<&Frame> {
        self.frames.front()
    }

    /// Forgets the oldest frame (it was sent).
    pub fn pop_front(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    /// Forgets every frame (the connection is gone).
    pub fn clear(&mut self) {
        self.frames.clear();
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl<const N: usize> Publisher for Outbox<N> {
    type Error = OutboxFull;

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), OutboxFull> {
        if self.frames.is_full() {
            return Err(OutboxFull);
        }
        let mut frame = Frame {
            topic: Topic::new(),
            payload: heapless::Vec::new(),
        };
        // The node builds topics and frames within these bounds; a longer one would be a
        // bug there, and is refused rather than truncated.
        frame.topic.push_str(topic).map_err(|()| OutboxFull)?;
        frame
            .payload
            .extend_from_slice(payload)
            .map_err(|()| OutboxFull)?;
        self.frames.push_back(frame).map_err(|_| OutboxFull)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::ToOwned;

    use fogline_firmware::node::{Node, NodeConfig, Now, Slot};
    use fogline_firmware::sensor::{metric, Measurement};
    use fogline_firmware::wire;

    use super::*;

    #[test]
    fn frames_leave_in_the_order_they_came() {
        let mut outbox: Outbox<3> = Outbox::new();
        for (topic, payload) in [("a/1", &b"x"[..]), ("a/2", b"yy"), ("a/3", b"")] {
            assert_eq!(outbox.publish(topic, payload), Ok(()));
        }
        assert_eq!(outbox.len(), 3);
        let mut order = std::vec::Vec::new();
        while let Some(frame) = outbox.pop_front() {
            order.push((frame.topic.as_str().to_owned(), frame.payload.to_vec()));
        }
        let want: [(&str, &[u8]); 3] = [("a/1", b"x"), ("a/2", b"yy"), ("a/3", b"")];
        let want: std::vec::Vec<_> = want
            .iter()
            .map(|(t, p)| ((*t).to_owned(), p.to_vec()))
            .collect();
        assert_eq!(order, want);
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_full_outbox_refuses_and_keeps_what_it_has() {
        let mut outbox: Outbox<2> = Outbox::new();
        assert_eq!(outbox.publish("t/1", b"1"), Ok(()));
        assert_eq!(outbox.publish("t/2", b"2"), Ok(()));
        assert_eq!(outbox.publish("t/3", b"3"), Err(OutboxFull));
        assert_eq!(outbox.front().map(|f| f.topic.as_str()), Some("t/1"));
        assert_eq!(outbox.len(), 2);
        outbox.clear();
        assert_eq!(outbox.publish("t/3", b"3"), Ok(()));
    }

    #[test]
    fn oversized_frames_are_refused_not_truncated() {
        let mut outbox: Outbox<2> = Outbox::new();
        let long_topic = "t".repeat(wire::MAX_TOPIC_LEN + 1);
        let long_payload = [0u8; MAX_FRAME_LEN + 1];
        assert_eq!(outbox.publish(&long_topic, b"x"), Err(OutboxFull));
        assert_eq!(outbox.publish("t", &long_payload), Err(OutboxFull));
        assert!(outbox.is_empty());
    }

    #[test]
    fn the_node_retries_a_refused_reading_at_the_next_flush() {
        let config = NodeConfig::new("dev-1", 7);
        let mut node = Node::new(config, [Slot::EMPTY; 8]).expect("valid config");
        let now = Now {
            uptime_ms: 1_000,
            wall_ms: None,
        };
        let readings = [
            Measurement::new(metric::TEMPERATURE, 20.0),
            Measurement::new(metric::HUMIDITY, 40.0),
            Measurement::new(metric::PRESSURE, 1000.0),
        ];
        assert_eq!(node.record(now, &readings), 3);
        node.on_connected(1_000);
        let mut outbox: Outbox<2> = Outbox::new();
        // Two fit; the third is refused. It already has its number (3), and the node
        // offers the same frame again at the next flush.
        assert_eq!(node.flush(1_000, &mut outbox), Err(OutboxFull));
        assert_eq!(node.last_seq(), 3);
        assert_eq!(node.stats().published, 2);
        let seqs = |outbox: &mut Outbox<2>| -> std::vec::Vec<(std::string::String, u32)> {
            std::iter::from_fn(|| outbox.pop_front())
                .map(|f| {
                    let r = wire::decode(&f.payload).expect("a valid frame");
                    (std::string::String::from(f.topic.as_str()), r.seq)
                })
                .collect()
        };
        assert_eq!(
            seqs(&mut outbox),
            [
                ("sensors/dev-1/temperature".into(), 1),
                ("sensors/dev-1/humidity".into(), 2)
            ]
        );
        assert_eq!(node.flush(1_001, &mut outbox), Ok(1));
        assert_eq!(seqs(&mut outbox), [("sensors/dev-1/pressure".into(), 3)]);
    }
}

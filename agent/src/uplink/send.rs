//! Sending the log: where blocks are read ([`Source`]), what they are sent through
//! ([`Link`]), and [`fill`], which sends what the window asks for. Blocks read but not
//! yet taken by a full link wait in the [`Outbox`]: a full link costs one failed
//! publish per round, not a read of the log.

use std::collections::VecDeque;

use rumqttc::{AsyncClient, QoS};

use crate::buffer::{Log, StoredBlock};
use crate::shipping::proto;

use super::window::Window;

/// Where an uplink reads the log it ships: the agent's own buffer, or a replica of a
/// peer's log that this agent holds.
pub trait Source: Send + Sync + 'static {
    /// Blocks holding offsets from `from` on, oldest first, until about `max_readings`
    /// readings or `head` (the first offset not yet stored).
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<StoredBlock>>;
}

impl Source for Log {
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<StoredBlock>> {
        Ok(Log::blocks_from(self, from, max_readings, head)?)
    }
}

/// What the uplink needs of an MQTT client: queue a QoS 1 publish, or say it is full.
pub trait Link {
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull>;
}

/// The client's queue is full: the rest goes next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFull;

impl Link for AsyncClient {
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull> {
        self.try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|_| LinkFull)
    }
}

/// What one [`fill`] sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub batches: u64,
    pub bytes: u64,
}

/// Blocks read from the log that the link has not taken yet, oldest first, and the
/// offset they continue from.
///
/// A link is full when the destination is slower than the log (a backlog after a long
/// partition); without this, every round would read and decode a batch's worth of blocks
/// again only to have the first one refused — enough work, with small blocks, to starve
/// the connection that would drain the link.
#[derive(Debug, Default)]
pub struct Outbox {
    blocks: VecDeque<StoredBlock>,
    /// `blocks` are the log's next blocks from this offset on.
    from: u64,
}

impl Outbox {
    /// Whether the waiting blocks continue the log from `from`; after a rewind or an ack
    /// past them they do not, and are dropped.
    fn continues(&mut self, from: u64) -> bool {
        if self.from != from {
            self.blocks.clear();
        }
        !self.blocks.is_empty()
    }
}

/// Sends what the window asks for, block by block, from `source` through `link`, until
/// the window, the pace, the log or the link's queue says stop. Blocks the link did not
/// take stay in `outbox` for the next call.
pub fn fill(
    window: &mut Window,
    outbox: &mut Outbox,
    source: &dyn Source,
    link: &impl Link,
    topic: &str,
    head: u64,
    now_ms: u64,
) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    while let Some(want) = window.poll_send(head, now_ms) {
        if !outbox.continues(want.from) {
            let read = source.blocks_from(want.from, want.max_readings, head)?;
            if read.is_empty() {
                break;
            }
            outbox.blocks.extend(read);
            outbox.from = want.from;
        }
        while let Some(block) = outbox.blocks.front() {
            let frame = proto::BatchFrame {
                start: window.sent(),
                first_offset: block.first_offset,
                block: &block.bytes,
            }
            .encode();
            let bytes = frame.len() as u64;
            if link.publish(topic, frame).is_err() {
                return Ok(sent);
            }
            window.sent_block(block.first_offset, block.end_offset, now_ms);
            outbox.from = window.sent();
            outbox.blocks.pop_front();
            sent.batches += 1;
            sent.bytes += bytes;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::uplink::window::WindowConfig;

    /// A log of blocks `first..end` (holes allowed), each block's bytes its range; counts
    /// its reads.
    struct FakeLog(Vec<(u64, u64)>, AtomicUsize);

    impl FakeLog {
        fn new(blocks: Vec<(u64, u64)>) -> FakeLog {
            FakeLog(blocks, AtomicUsize::new(0))
        }
    }

    impl Source for FakeLog {
        fn blocks_from(&self, from: u64, max: u64, head: u64) -> anyhow::Result<Vec<StoredBlock>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            let mut out = Vec::new();
            let mut n = 0;
            for &(first, end) in &self.0 {
                if end <= from || end > head || n >= max {
                    continue;
                }
                n += end - first;
                out.push(StoredBlock {
                    first_offset: first,
                    end_offset: end,
                    bytes: format!("{first}..{end}").into_bytes(),
                });
            }
            Ok(out)
        }
    }

    /// A link that takes `room` publishes, then is full.
    struct FakeLink {
        room: RefCell<usize>,
        frames: RefCell<Vec<(u64, u64, String)>>,
    }

    impl FakeLink {
        fn with_room(room: usize) -> FakeLink {
            FakeLink {
                room: RefCell::new(room),
                frames: RefCell::new(Vec::new()),
            }
        }

        /// (start, first_offset, block) of every frame sent, and forgets them.
        fn take(&self) -> Vec<(u64, u64, String)> {
            std::mem::take(&mut *self.frames.borrow_mut())
        }
    }

    impl Link for FakeLink {
        fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkFull> {
            assert_eq!(topic, "log");
            let mut room = self.room.borrow_mut();
            if *room == 0 {
                return Err(LinkFull);
            }
            *room -= 1;
            let f = proto::decode_batch(&payload).map_err(|_| LinkFull)?;
            let block = String::from_utf8_lossy(f.block).into_owned();
            self.frames
                .borrow_mut()
                .push((f.start, f.first_offset, block));
            Ok(())
        }
    }

    const CFG: WindowConfig = WindowConfig {
        max_inflight: 1000,
        batch: 100,
        ack_timeout_ms: 1000,
        drain_rate: 0,
    };

    #[test]
    fn fill_sends_the_log_from_the_ack_and_announces_holes() {
        // 30..40 were dropped at the edge.
        let log = FakeLog::new(vec![(0, 10), (10, 30), (40, 50), (50, 60)]);
        let link = FakeLink::with_room(100);
        let mut ob = Outbox::default();
        let mut w = Window::new(CFG, 0);
        w.on_ack(10, 60, 0);
        let sent = fill(&mut w, &mut ob, &log, &link, "log", 60, 0).expect("fill");
        assert_eq!(sent.batches, 3);
        assert_eq!(
            link.take(),
            vec![
                (10, 10, "10..30".to_owned()),
                (30, 40, "40..50".to_owned()),
                (50, 50, "50..60".to_owned()),
            ]
        );
        assert_eq!(w.sent(), 60);
        // Nothing more until the log grows.
        assert_eq!(
            fill(&mut w, &mut ob, &log, &link, "log", 60, 1).expect("fill"),
            Sent::default()
        );
    }

    #[test]
    fn fill_stops_when_the_link_is_full_and_goes_on_from_there() {
        let log = FakeLog::new(vec![(0, 10), (10, 20), (20, 30)]);
        let link = FakeLink::with_room(1);
        let mut ob = Outbox::default();
        let mut w = Window::new(CFG, 0);
        w.on_ack(0, 30, 0);
        let sent = fill(&mut w, &mut ob, &log, &link, "log", 30, 0).expect("fill");
        assert_eq!(sent.batches, 1);
        assert_eq!(w.sent(), 10, "only what the link took counts as sent");
        *link.room.borrow_mut() = 10;
        fill(&mut w, &mut ob, &log, &link, "log", 30, 1).expect("fill");
        let starts: Vec<u64> = link.take().iter().map(|f| f.0).collect();
        assert_eq!(starts, vec![0, 10, 20]);
    }

    #[test]
    fn fill_sends_nothing_beyond_the_window_or_before_the_first_ack() {
        let log = FakeLog::new((0..50).map(|i| (i * 10, i * 10 + 10)).collect());
        let link = FakeLink::with_room(1000);
        let mut ob = Outbox::default();
        let mut w = Window::new(
            WindowConfig {
                max_inflight: 35,
                batch: 10,
                ..CFG
            },
            0,
        );
        assert_eq!(
            fill(&mut w, &mut ob, &log, &link, "log", 500, 0).expect("fill"),
            Sent::default()
        );
        w.on_ack(100, 500, 0);
        fill(&mut w, &mut ob, &log, &link, "log", 500, 0).expect("fill");
        // 100..140 out: the fourth block started with 30 in flight, within the window.
        assert_eq!(w.sent(), 140);
        assert_eq!(link.take().len(), 4);
        w.on_ack(120, 500, 1);
        fill(&mut w, &mut ob, &log, &link, "log", 500, 1).expect("fill");
        assert_eq!(w.sent(), 160);
    }

    #[test]
    fn a_full_link_does_not_read_the_log_again() {
        // A backlog of small blocks behind a link that takes two publishes per round: the
        // log is read once per batch, not once per round (reading and decoding a batch
        // every round starved the connection that drains the link).
        let log = FakeLog::new((0..8).map(|i| (i * 10, i * 10 + 10)).collect());
        let link = FakeLink::with_room(2);
        let mut ob = Outbox::default();
        let mut w = Window::new(CFG, 0);
        w.on_ack(0, 80, 0);
        for round in 1..=4 {
            let sent = fill(&mut w, &mut ob, &log, &link, "log", 80, round).expect("fill");
            assert_eq!(sent.batches, 2, "round {round}");
            *link.room.borrow_mut() = 2;
        }
        assert_eq!(w.sent(), 80);
        assert_eq!(
            log.1.load(Ordering::Relaxed),
            1,
            "one read for the whole batch"
        );
        let starts: Vec<u64> = link.take().iter().map(|f| f.0).collect();
        assert_eq!(starts, (0..8).map(|i| i * 10).collect::<Vec<_>>());
    }

    #[test]
    fn blocks_waiting_for_the_link_are_dropped_after_a_rewind() {
        let log = FakeLog::new(vec![(0, 10), (10, 20), (20, 30)]);
        let link = FakeLink::with_room(1);
        let mut ob = Outbox::default();
        let mut w = Window::new(CFG, 0);
        w.on_ack(0, 30, 0);
        fill(&mut w, &mut ob, &log, &link, "log", 30, 0).expect("fill");
        assert_eq!(ob.blocks.len(), 2, "10..20 and 20..30 wait");
        // No ack for longer than the timeout: the window goes back to 0, and the blocks
        // waiting (from 10) are not what comes next.
        assert!(w.on_tick(CFG.ack_timeout_ms + 1));
        *link.room.borrow_mut() = 10;
        fill(
            &mut w,
            &mut ob,
            &log,
            &link,
            "log",
            30,
            CFG.ack_timeout_ms + 1,
        )
        .expect("fill");
        assert_eq!(log.1.load(Ordering::Relaxed), 2, "read again from the ack");
        let frames: Vec<(u64, u64)> = link.take().iter().map(|f| (f.0, f.1)).collect();
        // 0..10 once before the rewind, then the log again from the ack, not 10..20 first.
        assert_eq!(frames, vec![(0, 0), (0, 0), (10, 10), (20, 20)]);
        assert_eq!(w.sent(), 30);
    }
}
